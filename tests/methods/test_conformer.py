"""Conformer-convolution adapters (methods/conformer.py): the PETL-AST block against its equation written here in
float64 with plain tensor ops, the four PETL-AST placements on tiny BERT against a hand-computed forward, causality,
what padding tokens reach, parameter counts, and bad input."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.core.errors import AdapterKitError, SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.conformer import ParConformer, SeqConformer
from tests.conftest import make_tiny, tokens

EPS = 1e-5  # BatchNorm1d / LayerNorm defaults


def reference(z: Tensor, adapter: Any, training: bool) -> Tensor:
    """s C(z) from the paper's equation, (B, T, d_in) -> (B, T, d_out), in float64 without torch's conv / norm ops."""
    block = adapter.block
    spec = block.spec
    p = {k: v.detach().double() for k, v in block.state_dict().items() if v.is_floating_point()}
    z = z.double()
    u = z @ p["pointwise_in.weight"].T + p["pointwise_in.bias"]  # (B, T, 2r)
    r = u.shape[-1] // 2
    g = u[..., :r] * torch.sigmoid(u[..., r:])  # GLU over channels: (B, T, r)
    k, tokens_ = spec.kernel_size, z.shape[1]
    left = (k - 1) // 2 if spec.padding == "same" else k - 1
    padded = torch.cat([g.new_zeros(g.shape[0], left, r), g, g.new_zeros(g.shape[0], k - 1 - left, r)], dim=1)
    w = p["depthwise.weight"][:, 0, :]  # (r, k)
    h = p["depthwise.bias"] + sum(padded[:, j : j + tokens_, :] * w[:, j] for j in range(k))  # (B, T, r)
    if spec.norm == "batch":
        if training:
            mean, var = h.mean(dim=(0, 1)), h.var(dim=(0, 1), unbiased=False)
        else:
            mean, var = p["norm.running_mean"], p["norm.running_var"]
    else:
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
    h = (h - mean) / torch.sqrt(var + EPS) * p["norm.weight"] + p["norm.bias"]
    h = h * torch.sigmoid(h)  # SiLU
    return spec.scaling * (h @ p["pointwise_out.weight"].T + p["pointwise_out.bias"])


def _perturb(adapter: Any, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in adapter.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=generator, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            else:
                t.add_(noise * 0.3)


def _holder(spec: Any, size: int = 12, seed: int = 0) -> tuple[nn.Module, nn.Linear, Any]:
    torch.manual_seed(seed)
    base = nn.Linear(size, size).double()
    holder = nn.Sequential(base)
    ak.attach(holder, "c", spec, targets=["0"])
    adapter = placements(holder, "c")[0][2].adapter("c")
    _perturb(adapter, seed)
    return holder, base, adapter


SPECS = [
    SeqConformer(hidden=3, kernel_size=5),
    SeqConformer(reduction_factor=4, kernel_size=3, norm="layer", scaling=0.5),
    ParConformer(hidden=4, kernel_size=4, padding="causal"),
    ParConformer(hidden=2, kernel_size=7, norm="layer", padding="causal", init="petl_ast"),
]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-{s.norm}-{s.padding}-k{s.kernel_size}")
def test_the_block_is_the_paper_equation_in_float64(spec, training: bool) -> None:
    holder, base, adapter = _holder(spec)
    holder.train(training)
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    f = base.weight.detach() @ x.unsqueeze(-1)
    f = f.squeeze(-1) + base.bias.detach()  # f(x), the base output
    expected = f + reference(f if spec.method == "seq_conformer" else x, adapter, training)
    with torch.no_grad():
        got = holder(x)
    assert (got - expected).abs().max().item() < 1e-10


def test_zero_up_starts_as_the_base_and_petl_ast_does_not() -> None:
    x = torch.randn(2, 6, 12, dtype=torch.float64)
    for spec, same in ((ParConformer(hidden=3, kernel_size=3), True),
                       (ParConformer(hidden=3, kernel_size=3, init="petl_ast"), False)):
        torch.manual_seed(0)
        base = nn.Linear(12, 12).double()
        want = base(x).detach()
        holder = nn.Sequential(base)
        ak.attach(holder, "c", spec, targets=["0"])
        with torch.no_grad():
            assert torch.equal(holder(x), want) == same
        adapter = placements(holder, "c")[0][2].adapter("c")
        assert bool((adapter.block.pointwise_out.weight == 0).all()) == same


# ---- the four PETL-AST placements on (post-norm) BERT -------------------------------------------------------------

PLACEMENTS = {  # name: (spec class, targets)
    "seq_mhsa": (SeqConformer, ["attention.output.dense"]),
    "seq_ffn": (SeqConformer, [r"re:.*\.layer\.\d+\.output\.dense"]),
    "par_mhsa": (ParConformer, ["attention.self"]),
    "par_ffn": (ParConformer, ["intermediate"]),
    "seq_ffn_postnorm": (SeqConformer, [r"re:.*\.layer\.\d+\.output\.LayerNorm"]),
}


def _hand_forward(base: Any, ids: Tensor, where: str, adapters: dict[int, Any]) -> Tensor:
    """BERT's encoder written out layer by layer from an unadapted twin, the adapter added at ``where`` only."""
    bert = base.bert
    h = bert.embeddings(input_ids=ids)
    for i, layer in enumerate(bert.encoder.layer):
        def add(name: str, z: Tensor, i: int = i) -> Tensor | float:
            return reference(z, adapters[i], False) if where == name else 0.0
        ctx = layer.attention.self(h)[0] + add("par_mhsa", h)  # beside the attention core, from the layer input
        f = layer.attention.output.dense(ctx)
        f = f + add("seq_mhsa", f)
        a = layer.attention.output.LayerNorm(f + h)
        u = layer.intermediate(a) + add("par_ffn", a)  # beside the FFN's first half, from the attention output
        g = layer.output.dense(u)
        g = g + add("seq_ffn", g)
        pre = g + a
        post = layer.output.LayerNorm(pre)
        h = layer.output.LayerNorm(pre + add("seq_ffn_postnorm", post)) if where == "seq_ffn_postnorm" else post
    return h


@pytest.mark.parametrize("where", sorted(PLACEMENTS))
def test_each_placement_on_bert_changes_exactly_its_sub_layer(where: str) -> None:
    cls, targets = PLACEMENTS[where]
    model: Any = make_tiny("bert").double()
    twin: Any = make_tiny("bert").double()
    ids = tokens(batch=2, length=8)
    torch.testing.assert_close(twin.bert(input_ids=ids).last_hidden_state, _hand_forward(twin, ids, "", {}),
                               atol=1e-10, rtol=0)  # the hand forward is BERT's own
    paths = ak.attach(model, "c", cls(hidden=4, kernel_size=5), targets)
    assert len(paths) == 2  # one per layer, the intended module only
    adapters = {}
    for index, (path, _, host) in enumerate(placements(model, "c")):
        _perturb(host.adapter("c"), seed=index)
        adapters[int(path.split(".")[3])] = host.adapter("c")
    with torch.no_grad():
        got = model.bert(input_ids=ids).last_hidden_state
        expected = _hand_forward(twin, ids, where, adapters)
        bare = twin.bert(input_ids=ids).last_hidden_state
    assert (got - bare).abs().max() > 1e-2  # the adapter acts
    assert (got - expected).abs().max().item() < 1e-10


def test_causal_padding_keeps_a_decoder_causal_and_same_does_not() -> None:
    ids = tokens(batch=2, length=8)
    later = ids.clone()
    later[:, 5:] = (later[:, 5:] + 7) % 100  # change tokens 5.. only
    for padding, causal in (("causal", True), ("same", False)):
        model = make_tiny("llama")
        ak.attach(model, "c", ParConformer(hidden=4, kernel_size=3, padding=padding), ["mlp"])
        for index, (_, _, host) in enumerate(placements(model, "c")):
            _perturb(host.adapter("c"), seed=index)
        with torch.no_grad():
            a, b = model(input_ids=ids).logits, model(input_ids=later).logits
        assert torch.allclose(a[:, :5], b[:, :5], atol=1e-6) == causal, padding


# ---- padding tokens: what reaches real tokens (documented in the module) -----------------------------------------

def test_padding_reaches_real_tokens_only_within_the_kernel_unless_batch_norm_trains() -> None:
    k, real = 5, 6  # tokens 0..5 real, 6..9 padding
    x = torch.randn(2, 10, 12, dtype=torch.float64)
    other = x.clone()
    other[:, real:] = torch.randn(2, 4, 12, dtype=torch.float64)  # different padding content
    for norm, training, reach in (("layer", True, k // 2), ("batch", False, k // 2), ("batch", True, real)):
        holder, _, _ = _holder(ParConformer(hidden=3, kernel_size=k, norm=norm))
        holder.train(training)
        with torch.no_grad():
            moved = (holder(x) - holder(other))[:, :real].abs().amax(dim=(0, 2))  # per real token
        assert (moved[: real - reach] == 0).all(), (norm, training)  # out of reach: bit-identical
        assert (moved[real - reach :] > 1e-6).all(), (norm, training)  # within reach: changed


# ---- sizes ----------------------------------------------------------------------------------------------------------

def _count(d_in: int, d_out: int, r: int, k: int) -> int:
    return 2 * r * (d_in + 1) + r * (k + 1) + 2 * r + d_out * (r + 1)


def test_parameter_counts_at_the_papers_setting() -> None:
    holder = nn.Sequential(nn.Linear(768, 768))
    ak.attach(holder, "c", ParConformer(), ["0"])  # RR 96, k 31: r = 8
    assert ak.train_only(holder, "c") == _count(768, 768, 8, 31) == 19_488


def test_parameter_counts_on_minilm() -> None:
    from tests.conftest import make_minilm

    model = make_minilm()
    counts = {}
    for where, (cls, targets) in PLACEMENTS.items():
        ak.attach(model, where, cls(), targets)  # RR 96, k 31 on d = 384: r = 4
        counts[where] = sum(p.numel() for p in placements(model, where)[0][2].adapter(where).parameters())
    assert counts == {"seq_mhsa": 5136, "seq_ffn": 5136, "par_mhsa": 5136, "par_ffn": _count(384, 1536, 4, 31),
                      "seq_ffn_postnorm": 5136}
    assert counts["seq_mhsa"] == _count(384, 384, 4, 31)


# ---- bad input ------------------------------------------------------------------------------------------------------

def test_a_kernel_longer_than_the_sequence_is_a_one_line_error_naming_kernel_length_and_path() -> None:
    model = make_tiny("bert")
    ak.attach(model, "c", SeqConformer(hidden=4, kernel_size=9), ["attention.output.dense"])
    with pytest.raises(AdapterKitError) as info:
        model(input_ids=tokens(length=8))
    text = str(info.value)
    assert "kernel_size 9" in text and "8 tokens" in text and "bert.encoder.layer.0.attention.output.dense" in text
    assert "\n" not in text
    model(input_ids=tokens(length=9))  # long enough: runs


def test_bad_specs_and_targets_are_one_line_errors() -> None:
    with pytest.raises(SpecError, match="kernel_size 4 is even; padding='same'"):
        SeqConformer(kernel_size=4)
    assert ParConformer(kernel_size=4, padding="causal").kernel_size == 4  # causal takes any size
    for bad in ({"kernel_size": 0}, {"reduction_factor": 0}, {"hidden": 0}, {"norm": "group"},
                {"padding": "valid"}, {"dropout": 1.0}, {"init": "xavier"}):
        with pytest.raises(SpecError):
            SeqConformer(**bad)  # type: ignore[arg-type]
    model = make_tiny("bert")  # d = 32
    with pytest.raises(TargetError, match=r"reduction_factor 96.0 leaves round\(32 / 96.0\) = 0 channels at "
                                          r"bert.encoder.layer.0.attention.output.dense"):
        ak.attach(model, "c", SeqConformer(), ["attention.output.dense"])
    with pytest.raises(TargetError, match="normalisation layer"):
        ak.attach(model, "c", ParConformer(hidden=2, kernel_size=3), ["output.LayerNorm"])
    with pytest.raises(TargetError, match="channels exceed the feature size 32"):
        ak.attach(model, "c", SeqConformer(hidden=40, kernel_size=3), ["attention.output.dense"])
    assert "c" not in ak.adapters(model)


def test_a_flat_input_is_a_one_line_error() -> None:
    holder, _, _ = _holder(ParConformer(hidden=2, kernel_size=3))
    with pytest.raises(AdapterKitError, match=r"at '0': needs a \(batch, tokens, features\) sequence, got shape "
                                              r"\(5, 12\)"):
        holder(torch.randn(5, 12, dtype=torch.float64))
