"""Test-time adaptation (adapterkit.train.tta): the unlabeled stream and its refusals, the online loop (labels never
reach a method, reset, resume), Tent, ViDA and the neuro-modulated Hebbian method against their equations."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapterkit.core.blocks import Average
from adapterkit.inject.use import use
from adapterkit.train import tta
from adapterkit.train.continual.stream import Examples, StreamError
from adapterkit.train.tta.hebbian import HEBB, patches_of, soft_hebbian_update
from adapterkit.train.tta.method import entropy, norm_affine
from adapterkit.train.tta.vida import HIGH, LOW, augment, homeostatic_scales, uncertainty


class Net(nn.Module):
    """Stem conv, BatchNorm, a pointwise conv, BatchNorm, pooling and a 3-way head; random norm statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.point = nn.Conv2d(8, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.head = nn.Linear(16, 3)
        with torch.no_grad():
            for bn in (self.bn0, self.bn1):
                bn.running_mean.normal_(0.0, 0.1)  # type: ignore[union-attr]
                bn.running_var.uniform_(0.5, 1.5)  # type: ignore[union-attr]
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn0(self.stem(x)))
        h = F.relu(self.bn1(self.point(h)))
        return self.head(h.mean((2, 3)))


def net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def pictures(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> Examples:
    """Class c raises channel c (plus noise); a domain scales and shifts the picture."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n // 3 + 1)[:n]
    x = torch.randn(n, 3, 8, 8, generator=g) * 0.3
    x[torch.arange(n), labels] += 1.5
    return Examples(x * scale + shift, labels)


def stream(rounds: int = 1, batch_size: int = 8) -> tuple[tta.TestStream, dict[str, Tensor]]:
    domains = [("clean", pictures(24, 1)), ("shifted", pictures(20, 2, shift=0.5)),
               ("faint", pictures(16, 3, scale=0.5))]
    return tta.TestStream.from_labelled(domains, batch_size=batch_size, rounds=rounds)


def methods() -> dict[str, Any]:
    return {"source": lambda: tta.Source(norm="batch"),
            "tent": lambda: tta.Tent(lr=1e-2),
            "vida": lambda: tta.ViDA(["point"], high=tta.vida.LoRA(r=8, alpha=8.0, init="gaussian"), lr=1e-2,
                                     ema=0.9, augmentations=3),
            "nhl": lambda: tta.Hebbian("stem", ["bn0"], eta=1e-2, lr=1e-2)}


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


_LABELLED: Any = {"inputs": torch.zeros(4, 3, 8, 8), "labels": torch.zeros(4)}
LABELLED_DICT = tta.Domain("a", _LABELLED)


# ---- the stream: inputs only ------------------------------------------------------------------------------------
@pytest.mark.parametrize("domain", [("a", Examples(torch.zeros(4, 3, 8, 8), torch.zeros(4))),
                                    ("a", (torch.zeros(4, 3, 8, 8), torch.zeros(4))),
                                    LABELLED_DICT],
                         ids=["examples", "pair", "dict"])
def test_a_labelled_stream_is_refused(domain: Any) -> None:
    with pytest.raises(StreamError) as error:
        tta.TestStream([domain])
    assert "carries labels" in one_line(error) and "'a'" in str(error.value)


@pytest.mark.parametrize("make,words", [
    (lambda: tta.TestStream([]), "at least one domain"),
    (lambda: tta.TestStream([("a", torch.zeros(0, 3))]), "no inputs"),
    (lambda: tta.TestStream([("a", torch.zeros(2, 3)), ("a", torch.zeros(2, 3))]), "used by an earlier domain"),
    (lambda: tta.TestStream([("a", torch.zeros(2, 3))], batch_size=0), "batch_size"),
    (lambda: tta.TestStream([("a", torch.zeros(2, 3))], rounds=0), "rounds"),
    (lambda: tta.TestStream([("a", [1, 2])]), "must be a tensor"),
])
def test_bad_streams_fail_in_one_line(make: Any, words: str) -> None:
    with pytest.raises(StreamError) as error:
        make()
    assert words in one_line(error)


class Spy(tta.TTAMethod):
    """Source with a log: every batch it sees, and whether it is inside a step."""

    name = "spy"

    def __init__(self, log: list[Any]) -> None:
        self.log, self.inside = log, False

    def config(self) -> dict[str, Any]:
        return {}

    def setup(self, model: nn.Module) -> None:
        self.model = model

    @torch.no_grad()
    def step(self, x: Tensor) -> Tensor:
        assert isinstance(x, Tensor) and x.shape[1:] == (3, 8, 8)  # inputs, nothing else
        self.inside = True
        self.log.append("batch")
        out = self.model(x)
        self.inside = False
        return out


class Guarded(Mapping[str, Tensor]):
    """Labels that raise if read while the method is stepping, and log when they are read."""

    def __init__(self, labels: dict[str, Tensor], spy: Spy) -> None:
        self.labels, self.spy = labels, spy

    def __getitem__(self, name: str) -> Tensor:
        if self.spy.inside:
            raise AssertionError("labels read during a step")
        self.spy.log.append(("labels", name))
        return self.labels[name]

    def __contains__(self, name: object) -> bool:
        return name in self.labels

    def __iter__(self) -> Iterator[str]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)


def test_labels_never_reach_the_method_and_are_read_after_each_domain() -> None:
    s, labels = stream()
    log: list[Any] = []
    spy = Spy(log)
    model = net()
    result = tta.run_tta(spy, model, s, Guarded(labels, spy))
    del log[:len(s.domains)]  # check_labels: each domain's labels looked at once, before any batch
    expected: list[Any] = []
    for d in s.domains:
        expected += ["batch"] * -(-len(d.inputs) // s.batch_size) + [("labels", d.name)]
    assert log == expected
    with torch.no_grad():  # the loop's accuracy is the model's accuracy on each domain
        for record in result.steps:
            d = s.domain(record["domain"])
            truth = 100.0 * float((model(d.inputs).argmax(-1) == labels[d.name]).float().mean())
            assert record["accuracy"] == pytest.approx(truth)
    unscored = tta.run_tta(Spy([]), model, s)
    assert [r["accuracy"] for r in unscored.steps] == [None] * 3


@pytest.mark.parametrize("name", ["tent", "vida", "nhl"])
def test_labels_do_not_change_what_a_method_does(name: str) -> None:
    s, labels = stream()
    with_labels, without = methods()[name](), methods()[name]()
    tta.run_tta(with_labels, net(), s, labels)
    tta.run_tta(without, net(), s)
    a, b = with_labels.state()[0], without.state()[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---- Tent -------------------------------------------------------------------------------------------------------
def test_tent_lowers_entropy_and_changes_only_norm_affine_parameters() -> None:
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    method = tta.Tent(lr=1e-2)
    method.setup(model)
    x = pictures(24, 5, shift=0.5).inputs
    with torch.no_grad():
        start = float(entropy(tta.method.forward(model, x, "batch")).mean())
    for _ in range(20):
        method.step(x)
    with torch.no_grad():
        end = float(entropy(tta.method.forward(model, x, "batch")).mean())
    assert end < start - 0.05, (start, end)
    affine = {f"{k}" for k in norm_affine(model)}
    assert affine == {"bn0.weight", "bn0.bias", "bn1.weight", "bn1.bias"}
    after = model.state_dict()
    for key, value in before.items():  # running statistics and counters included: batch statistics left them alone
        assert torch.equal(after[key], value) == (key not in affine), key


def test_tent_refuses_a_model_without_norm_layers() -> None:
    with pytest.raises(StreamError) as error:
        tta.Tent().setup(nn.Sequential(nn.Flatten(), nn.Linear(192, 3)))
    assert "no normalisation layer" in one_line(error)


# ---- ViDA -------------------------------------------------------------------------------------------------------
def test_homeostatic_scales_follow_the_equation() -> None:
    assert homeostatic_scales(0.3, 0.2) == pytest.approx((0.7, 1.3))  # uncertain: the high-rank adapter leads
    assert homeostatic_scales(0.05, 0.2) == pytest.approx((1.05, 0.95))
    views = torch.randn(5, 4, 3, dtype=torch.float64)
    mean = views.mean(0)
    manual = 0.1 * float((((views - mean) ** 2).sum(0) / 4).mean())  # unbiased variance over the 5 copies
    assert uncertainty(views) == pytest.approx(manual, rel=1e-12)


def test_vida_mixes_both_adapters_by_the_scales_and_updates_the_teacher_by_ema() -> None:
    model = net()
    method = methods()["vida"]()
    method.setup(model)
    with torch.no_grad():  # non-zero adapters, so both branches show
        for value in method.student.values():
            value.normal_(0.0, 0.3)
        for key, value in method.teacher.items():
            value.copy_(method.student[key])
    # the mixed layer is W0 x + b + l_low dW_low x + l_high dW_high x, checked in float64
    h = torch.randn(2, 8, 4, 4)
    host: Any = model.point.adapterkit
    low, high = (host.adapter(n) for n in (LOW, HIGH))
    with torch.no_grad(), use(model.point, Average(LOW, HIGH, weights=(0.7, 1.3))):
        mixed = model.point(h).double()
    weight = (model.point.weight.double() + 0.7 * low.delta_weight().double() + 1.3 * high.delta_weight().double())
    bias: Any = model.point.bias
    reference = F.conv2d(h.double(), weight, bias.double())
    assert torch.allclose(mixed, reference, atol=1e-5)
    # one step: scales from the teacher's uncertainty, student moves, teacher = a T + (1 - a) S
    x = pictures(12, 6, shift=0.5).inputs
    start = method.state()
    teacher_before = {k: v.clone() for k, v in method.teacher.items()}
    torch.manual_seed(3)
    method.step(x)
    student_after = {k: v.clone() for k, v in method.student.items()}
    for key, value in method.teacher.items():
        assert torch.allclose(value, 0.9 * teacher_before[key] + 0.1 * student_after[key], atol=1e-6)
    assert any(not torch.equal(student_after[k], teacher_before[k]) for k in student_after)
    scales = method.scales
    method.load_state(*start)
    torch.manual_seed(3)
    with torch.no_grad():
        views = torch.stack([method.teacher_logits(augment(x)) for _ in range(method.augmentations)])
    assert scales == homeostatic_scales(uncertainty(views), 0.2)
    assert scales != (1.0, 1.0)


def test_vida_refuses_inputs_that_are_not_images() -> None:
    method = tta.ViDA(["point"], high=tta.vida.LoRA(r=4))
    method.setup(net())
    with pytest.raises(StreamError) as error:
        method.step(torch.zeros(2, 3))
    assert "(B, C, H, W)" in one_line(error)


# ---- the Hebbian method -----------------------------------------------------------------------------------------
def test_soft_hebbian_rule_matches_the_equation_in_float64() -> None:
    g = torch.Generator().manual_seed(0)
    weight, patches = torch.randn(4, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g,
                                                                                       dtype=torch.float64)
    tau = 0.5
    expected = torch.zeros_like(weight)
    for n in range(7):
        u = [float(weight[k] @ patches[n]) for k in range(4)]
        z = sum(torch.exp(torch.tensor(v / tau, dtype=torch.float64)) for v in u)
        for k in range(4):
            y = float(torch.exp(torch.tensor(u[k] / tau, dtype=torch.float64)) / z)
            expected[k] += y * (patches[n] - u[k] * weight[k]) / 7
    assert torch.allclose(soft_hebbian_update(weight, patches, tau), expected, atol=1e-12)


def test_hebbian_step_changes_the_first_layer_by_the_rule_and_runs_it() -> None:
    model = net()
    method = tta.Hebbian("stem", ["bn0"], eta=0.05, temperature=2.0)
    method.setup(model)
    x = pictures(6, 7).inputs
    w0 = model.stem.weight.detach().double().reshape(8, -1)
    expected = 0.05 * soft_hebbian_update(w0, patches_of(model.stem, x.double()), 2.0)
    method.step(x)
    change = method.change.detach().double().reshape(8, -1)
    assert torch.allclose(change, expected, atol=1e-6) and expected.abs().max() > 1e-4
    # the adapter is the change: the stem now computes conv(x, W0 + dW)
    with torch.no_grad(), use(model, HEBB):
        adapted = model.stem(x).double()
    reference = F.conv2d(x.double(), (w0 + change).reshape(model.stem.weight.shape), padding=1)
    assert torch.allclose(adapted, reference, atol=1e-5)
    assert not model.stem.weight.requires_grad and torch.equal(model.stem.weight, net().stem.weight)  # base intact


def test_hebbian_refuses_a_layer_that_is_not_a_plain_convolution() -> None:
    with pytest.raises(StreamError) as error:
        tta.Hebbian("head", ["bn0"]).setup(net())
    assert "must be a Conv2d" in one_line(error) and "Linear" in str(error.value)


# ---- the loop: reset, resume, bad input ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["tent", "vida", "nhl"])
def test_reset_restores_the_start_exactly(name: str) -> None:
    model = net()
    method = methods()[name]()
    torch.manual_seed(0)
    method.setup(model)
    start = method.state()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    x = pictures(12, 8, shift=0.5).inputs
    torch.manual_seed(1)
    first = method.step(x)
    after_first = method.state()[0]
    for _ in range(3):
        method.step(x)
    assert any(not torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    method.load_state(*start)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    torch.manual_seed(1)
    assert torch.equal(method.step(x), first)  # optimizer moments reset too: the same first step again
    again = method.state()[0]
    assert all(torch.equal(again[k], v) for k, v in after_first.items())


def test_per_domain_reset_adapts_each_domain_from_the_start() -> None:
    s, labels = stream()
    reset = tta.run_tta(tta.Tent(lr=1e-2), net(), s, labels, reset="per_domain")
    carried = tta.run_tta(tta.Tent(lr=1e-2), net(), s, labels, reset="never")
    last = s.domains[-1]
    alone = tta.run_tta(tta.Tent(lr=1e-2), net(), tta.TestStream([last], s.batch_size), {last.name: labels[last.name]})
    assert reset.steps[-1]["accuracy"] == alone.steps[0]["accuracy"]
    assert reset.steps[0] == {**carried.steps[0], "seconds": reset.steps[0]["seconds"]}


class Crash(Exception):
    pass


def interrupted(method: tta.TTAMethod, after: int) -> tta.TTAMethod:
    """The same method, killed after ``after`` batches."""
    base = type(method)

    def step(self: Any, x: Tensor) -> Tensor:
        self.seen = getattr(self, "seen", 0) + 1
        if self.seen > after:
            raise Crash
        return base.step(self, x)

    method.__class__ = type(base.__name__, (base,), {"step": step})
    return method


@pytest.mark.parametrize("name", ["tent", "vida", "nhl"])
def test_resume_mid_stream_equals_an_uninterrupted_run(name: str, tmp_path: Path) -> None:
    s, labels = stream(rounds=2)
    whole = methods()[name]()
    expected = tta.run_tta(whole, net(), s, labels, out=tmp_path / "whole")
    with pytest.raises(Crash):  # killed in the middle of the second domain: the state after the first is saved
        tta.run_tta(interrupted(methods()[name](), after=5), net(), s, labels, out=tmp_path / "cut")
    resumed_method = methods()[name]()
    resumed = tta.run_tta(resumed_method, net(), s, labels, out=tmp_path / "cut", resume=True)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in expected.steps]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.steps] == strip
    a, b = whole.state()[0], resumed_method.state()[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "cut" / "result.json").exists()


def test_resume_refuses_another_setting_or_a_damaged_file(tmp_path: Path) -> None:
    s, labels = stream()
    tta.run_tta(tta.Tent(lr=1e-2), net(), s, labels, out=tmp_path)
    with pytest.raises(StreamError) as error:
        tta.run_tta(tta.Tent(lr=1e-3), net(), s, labels, out=tmp_path, resume=True)
    assert "other settings" in one_line(error)
    with pytest.raises(StreamError) as error:
        tta.run_tta(tta.Tent(lr=1e-2), net(1), s, labels, out=tmp_path, resume=True)
    assert "different model" in one_line(error)
    (tmp_path / tta.loop.STATE_FILE).write_bytes(b"garbage")
    with pytest.raises(StreamError) as error:
        tta.run_tta(tta.Tent(lr=1e-2), net(), s, labels, out=tmp_path, resume=True)
    assert "damaged" in one_line(error)


@pytest.mark.parametrize("call,words", [
    (lambda s, y: tta.run_tta(tta.Source(), net(), s, y, reset="sometimes"), "reset='sometimes'"),
    (lambda s, y: tta.run_tta(tta.Source(), net(), s, {**y, "faint": y["faint"][:3]}), "shape (16,)"),
    (lambda s, y: tta.run_tta(tta.Source(), net(), s, {"clean": y["clean"]}), "no labels for domain 'shifted'"),
    (lambda s, y: tta.Tent(norm="train"), "norm='train'"),
    (lambda s, y: tta.Tent(optimizer="lion").setup(net()), "optimizer='lion'"),
    (lambda s, y: tta.ViDA(["point"], augmentations=1), "augmentations"),
])
def test_bad_loop_input_fails_in_one_line(call: Any, words: str) -> None:
    s, labels = stream()
    with pytest.raises(StreamError) as error:
        call(s, labels)
    assert words in one_line(error)


# ---- corrupted digits (benchmarks/vision.py) ----------------------------------------------------------------------
def _vision() -> Any:
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "vision.py"
    spec = importlib.util.spec_from_file_location("vision_benchmark", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_corruptions_are_deterministic_and_grow_with_severity() -> None:
    vision = _vision()
    g = torch.Generator().manual_seed(0)
    clean = (F.interpolate(torch.rand(4, 1, 8, 8, generator=g), size=32, mode="bilinear") * 2 - 1).repeat(1, 3, 1, 1)
    for kind in vision.CORRUPTIONS:
        distances = []
        for severity in vision.SEVERITIES:
            out = vision.corrupt(clean, kind, severity, seed=1)
            assert out.shape == clean.shape and out.min() >= -1 and out.max() <= 1
            assert torch.equal(out, vision.corrupt(clean, kind, severity, seed=1))
            distances.append(float((out - clean).abs().mean()))
        assert distances == sorted(distances) and distances[0] > 0, (kind, distances)
    assert not torch.equal(vision.corrupt(clean, "gaussian_noise", 3, seed=1),
                           vision.corrupt(clean, "gaussian_noise", 3, seed=2))
    domains = vision.corruption_domains(clean, torch.arange(4), severities=(1, 5))
    assert [name for name, _, _ in domains][:5] == ["gaussian_noise-1", "blur-1", "contrast-1", "pixelate-1",
                                                    "gaussian_noise-5"]
    with pytest.raises(ValueError, match="corruption 'fog'"):
        vision.corrupt(clean, "fog", 1)

