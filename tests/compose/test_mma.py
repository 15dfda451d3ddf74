"""MMA (compose/mma.py): task routing runs each example's adapter alone (and equals Select), learned routing is
LaVIN's formula in float64 (first-token and masked-mean pooling, parallel / LoRA / post-norm children), generation
reuses the prompt's weights, save/load, bad task ids, training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import adapterkit as ak
from adapterkit.compose.mma import MMA
from adapterkit.core.errors import AdapterKitError, SpecError
from adapterkit.inject.engine import placements
from tests.conftest import make_tiny, randomize, tokens

NAMES = ("m0", "m1", "m2")


def _children(model: nn.Module, spec: Any, targets: list[str], names: tuple[str, ...] = NAMES) -> None:
    for index, name in enumerate(names):
        torch.manual_seed(10 + index)
        ak.attach(model, name, spec, targets)
        randomize(model, name, scale=0.3, seed=20 + index)


def _bert(routing: str, child: Any = None, targets: list[str] | None = None) -> nn.Module:
    model = make_tiny("bert").double()
    targets = targets or [r"re:.*layer\.\d+\.output\.LayerNorm"]
    _children(model, child or ak.SeqBottleneck(reduction_factor=4), targets)
    ak.attach(model, "mma", MMA(experts=3, routing=routing), targets)
    if routing == "learned":
        randomize(model, "mma", scale=2.0, seed=5)
    return model


# ---- task routing ---------------------------------------------------------------------------------------------

def test_task_routing_gives_each_example_exactly_its_adapters_output() -> None:
    model = _bert("task")
    ids = tokens(batch=5, length=7)
    task_ids = [2, 0, 1, 2, 0]
    with torch.no_grad():
        with ak.use(model, ak.Mix(*NAMES, name="mma"), task_ids=task_ids) as routing:
            got = model(input_ids=ids).logits
        alone = {}
        for name in NAMES:
            with ak.use(model, name):
                alone[name] = model(input_ids=ids).logits
        with ak.use(model, ak.Select(tuple(NAMES[t] for t in task_ids))):
            selected = model(input_ids=ids).logits
        with ak.use(model):
            bare = model(input_ids=ids).logits
    for row, task in enumerate(task_ids):
        assert (got[row] - alone[NAMES[task]][row]).abs().max().item() < 1e-12, row
        assert (got[row] - bare[row]).abs().max().item() > 1e-3  # the adapter acts
    assert (got - selected).abs().max().item() < 1e-12  # what Select does, by task id
    recorded = next(iter(routing.weights["mma"].values()))
    assert torch.equal(recorded, torch.eye(3)[task_ids])


def test_task_routing_nests_in_a_stack() -> None:
    model = _bert("task")
    ak.attach(model, "lang", ak.LoRA(r=2), ["query", "value"])
    randomize(model, "lang", scale=0.3, seed=9)
    ids = tokens(batch=3, length=6)
    with torch.no_grad(), ak.use(model, ak.Stack("lang", ak.Mix(*NAMES, name="mma")), task_ids=[1, 2, 0]):
        got = model(input_ids=ids).logits
    for row, task in enumerate([1, 2, 0]):
        with torch.no_grad(), ak.use(model, ak.Stack("lang", NAMES[task])):
            want = model(input_ids=ids).logits[row]
        assert (got[row] - want).abs().max().item() < 1e-12


@pytest.mark.parametrize("bad", [[0, 3], [-1, 0]])
def test_a_task_id_out_of_range_is_a_one_line_error(bad: list[int]) -> None:
    model = _bert("task")
    with pytest.raises(AdapterKitError, match=rf"mma at '.*': task id {max(bad, key=abs)} is out of range; 'mma' "
                                              r"routes 3 children, ids 0\.\.2") as info:
        with ak.use(model, ak.Mix(*NAMES, name="mma"), task_ids=bad):
            model(input_ids=tokens())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="pass task_ids="), ak.use(model, ak.Mix(*NAMES, name="mma")):
        model(input_ids=tokens())


# ---- learned routing: LaVIN's formula ---------------------------------------------------------------------------

def _holder(child: Any, spec: MMA, base: nn.Module) -> tuple[Any, list[Any], Any]:
    torch.manual_seed(0)
    holder = nn.Sequential(base).double()
    _children(holder, child, ["0"])
    ak.attach(holder, "mma", spec, ["0"])
    randomize(holder, "mma", scale=2.0, seed=5)
    host = placements(holder, "mma")[0][2]
    return holder, [host.adapter(n) for n in NAMES], host.adapter("mma")


def _delta(child: Any, z: Tensor) -> Tensor:
    """A child's change written out: LoRA s B A z, or a bottleneck s (U act(D z + b_d) + b_u)."""
    if hasattr(child, "lora_a"):
        return child.scale * z @ child.lora_a.double().T @ child.lora_b.double().T
    block = child.block
    down = z @ block.down.weight.double().T + block.down.bias.double()
    return child.spec.scaling * (block.act(down) @ block.up.weight.double().T + block.up.bias.double())


def _weights(router: Any, z: Tensor, pool: str, mask: Tensor | None, t: float) -> Tensor:
    if pool == "first":
        pooled = z[:, 0]
    else:
        m = torch.ones(z.shape[:2], dtype=z.dtype) if mask is None else mask.double()
        pooled = (z * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    logits = pooled @ router.router.weight.double().T + router.router.bias.double()
    return torch.softmax(logits / t, dim=-1)  # (B, K)


@pytest.mark.parametrize("pool", ["first", "mean"])
@pytest.mark.parametrize("kind", ["repadapter", "lora"])
def test_learned_routing_is_lavins_formula_in_float64(kind: str, pool: str) -> None:
    child = ak.ParBottleneck(hidden=3, activation="identity", scaling=1.0) if kind == "repadapter" \
        else ak.LoRA(r=2, alpha=4)
    spec = MMA(experts=3, pool=pool, temperature=10.0)
    holder, children, router = _holder(child, spec, nn.Linear(12, 10))
    x = torch.randn(4, 6, 12, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[0, 4:] = 0  # row 0: two padding tokens, left out of the mean
    mask[2, 1:] = 0
    with torch.no_grad(), ak.use(holder, ak.Mix(*NAMES, name="mma"), token_mask=mask) as routing:
        got = holder(x)
    base = holder[0]
    w = _weights(router, x, pool, mask if pool == "mean" else None, 10.0)  # from the input x (reads="input")
    want = x @ base.weight.double().T + base.bias.double()
    want = want + sum(w[:, None, k : k + 1] * _delta(c, x) for k, c in enumerate(children))
    assert (got - want).abs().max().item() < 1e-12
    assert (routing.weights["mma"]["0"] - w).abs().max().item() < 1e-14  # what it reports
    assert w.std(dim=0).max() > 1e-3  # the examples are routed differently


def test_learned_routing_on_a_post_norm_mixes_the_deltas_before_the_norm() -> None:
    spec = MMA(experts=3, reads="output", temperature=2.0)
    holder, children, router = _holder(ak.SeqBottleneck(hidden=4), spec, nn.LayerNorm(12))
    norm = holder[0]
    x = torch.randn(3, 5, 12, dtype=torch.float64)
    with torch.no_grad(), ak.use(holder, ak.Mix(*NAMES, name="mma")):
        got = holder(x)
    z = nn.functional.layer_norm(x, (12,), norm.weight.double(), norm.bias.double(), norm.eps)
    w = _weights(router, z, "first", None, 2.0)  # from the output, LN(x)
    mixed = x + sum(w[:, None, k : k + 1] * _delta(c, z) for k, c in enumerate(children))
    want = nn.functional.layer_norm(mixed, (12,), norm.weight.double(), norm.bias.double(), norm.eps)
    assert (got - want).abs().max().item() < 1e-12


def test_generation_steps_reuse_the_prompts_weights() -> None:
    model: Any = make_tiny("llama")
    _children(model, ak.ParBottleneck(hidden=4), ["self_attn"])
    ak.attach(model, "mma", MMA(experts=3), ["self_attn"])
    randomize(model, "mma", scale=2.0, seed=5)
    prompt = tokens(batch=2, length=5)
    block = ak.Mix(*NAMES, name="mma")
    with torch.no_grad(), ak.use(model, block) as routing:
        model(input_ids=prompt)
        on_prompt = {p: w.clone() for p, w in routing.weights["mma"].items()}
        out = model.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0)
        at_last_step = routing.weights["mma"]
    with torch.no_grad(), ak.use(model, block) as fresh:
        model(input_ids=out[:, -2:-1])  # the last step's token on its own, in a new use block
    assert out.shape[1] == 8
    for path, weights in on_prompt.items():
        assert torch.equal(at_last_step[path], weights), path
        assert (fresh.weights["mma"][path] - weights).abs().max() > 1e-4  # not what the new token alone gives


# ---- save / load, training, bad specs --------------------------------------------------------------------------

@pytest.mark.parametrize("routing", ["learned", "task"])
def test_save_load_round_trip(tmp_path: Path, routing: str) -> None:
    model = _bert(routing)
    ids = tokens(batch=3, length=6)
    block = ak.Mix(*NAMES, name="mma")
    with torch.no_grad(), ak.use(model, block, task_ids=[2, 1, 0]):
        expected = model(input_ids=ids).logits
    for name in (*NAMES, "mma"):
        ak.save(model, tmp_path / name, name)
    fresh = make_tiny("bert").double()
    for name in (*NAMES, "mma"):
        assert ak.load(fresh, tmp_path / name) == name
    with torch.no_grad(), ak.use(fresh, block, task_ids=[2, 1, 0]):
        assert torch.equal(fresh(input_ids=ids).logits, expected)
    record, _ = ak.read(tmp_path / "mma")
    assert ak.spec_from_dict(record["spec"]) == MMA(experts=3, routing=routing)


@pytest.mark.parametrize("routing", ["learned", "task"])
def test_trains_on_a_tiny_fixed_batch(routing: str) -> None:
    torch.manual_seed(0)
    model = make_tiny("bert")
    _children(model, ak.LoRA(r=4), ["query", "value"], NAMES[:2])
    ak.attach(model, "mma", MMA(experts=2, routing=routing), ["query", "value"])
    ak.train_only(model, [*NAMES[:2], "mma"], also=["classifier"])
    model.train()
    ids, labels = tokens(batch=8, length=8, seed=3), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=3e-2)
    losses = []
    for _ in range(20):
        with ak.use(model, ak.Mix(*NAMES[:2], name="mma"), task_ids=[0, 1] * 4):
            loss = nn.functional.cross_entropy(model(input_ids=ids).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0] and losses[-1] < min(losses[:5]), losses
    router = placements(model, "mma")[0][2].adapter("mma").router
    assert (router is None) == (routing == "task")
    if router is not None:
        assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_bad_specs_and_blocks_are_one_line_errors() -> None:
    for bad, field in (({"experts": 1}, "experts"), ({"routing": "topk"}, "routing"), ({"temperature": 0}, "temp"),
                       ({"pool": "last"}, "pool"), ({"reads": "both"}, "reads")):
        with pytest.raises(SpecError, match=field):
            MMA(**bad)  # type: ignore[arg-type]
    model = _bert("learned")
    with pytest.raises(AdapterKitError, match="combiner 'mma' was built for 3 children, the Mix block has 2"):
        with ak.use(model, ak.Mix(*NAMES[:2], name="mma")):
            pass
