"""Hyperformer: the generated weights and the adapted outputs against the paper's equations in float64 (written
here, independently of the module), per-row task routing, task ids through use / blocks / MultiTaskClassifier,
save/load, parameter counts, and one-line errors."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

import adapterkit as ak
from adapterkit.core.errors import SpecError, TargetError
from adapterkit.inject.engine import placements
from adapterkit.methods.hyperformer import Hyperformer
from adapterkit.train.loop import TrainConfig
from adapterkit.train.multitask import MultiTaskClassifier, train_multitask
from tests.conftest import logits, make_tiny, randomize, tokens
from tests.train.test_multitask import _encoder, _synthetic, _Tokenizer

FULL = Hyperformer(n_tasks=3, reduction_factor=4, positions=2, norm="conditional", init="normal", task_dim=6,
                   hyper_hidden=10, projected_dim=5)


def _norm(v: torch.Tensor, eps: float) -> torch.Tensor:
    return (v - v.mean(-1, keepdim=True)) / torch.sqrt(v.var(-1, unbiased=False, keepdim=True) + eps)


def reference(state: dict[str, torch.Tensor], task: int, layer: int, position: int, d: int, h: int
              ) -> dict[str, torch.Tensor]:
    """The paper's generation for one task at (layer, position), from the first placement's saved tensors."""
    s = {k.removeprefix("block.net."): v.double() for k, v in state.items()}
    e = torch.cat([s["task"][task], s["layer"][layer]] + ([s["position"][position]] if "position" in s else []))
    hidden = torch.relu(s["projector.0.weight"] @ e + s["projector.0.bias"])
    z = _norm(s["projector.2.weight"] @ hidden + s["projector.2.bias"], 1e-6) * s["z_norm.weight"] + s["z_norm.bias"]
    gen = {n.split(".")[1]: s[f"generators.{n.split('.')[1]}.weight"] @ z + s[f"generators.{n.split('.')[1]}.bias"]
           for n in s if n.startswith("generators.") and n.endswith(".weight")}
    gen["down"], gen["up"] = gen["down"].reshape(h, d), gen["up"].reshape(d, h)
    return gen


def adapter_out(w: dict[str, torch.Tensor], v: torch.Tensor) -> torch.Tensor:
    """A(v) = U gelu(D v + b_D) + b_U, then the conditional LayerNorm when gamma / beta are generated."""
    down = v @ w["down"].T + w["down_bias"]
    out = 0.5 * down * (1 + torch.erf(down / math.sqrt(2))) @ w["up"].T + w["up_bias"]
    return out if "gamma" not in w else _norm(out, 1e-5) * w["gamma"] + w["beta"]


def _attached(spec: Hyperformer = FULL, kind: str = "bert", double: bool = False, scale: float = 0.3):
    model = make_tiny(kind)
    model = model.double() if double else model
    ak.attach(model, "h", spec, ["output.LayerNorm"])
    randomize(model, "h", scale=scale)
    return model


def test_generated_weights_and_outputs_follow_the_equations_in_float64() -> None:
    model = _attached(double=True)
    found = placements(model, "h")
    assert len(found) == 4  # 2 layers x (attention output norm, FFN output norm)
    state = found[0][2].adapter("h").state_dict()
    net = found[0][2].adapter("h").block.net
    for index in range(4):
        layer, position = divmod(index, 2)
        for task in range(3):
            got = net.weights(torch.tensor([task]), layer, position)
            want = reference(state, task, layer, position, d=32, h=8)
            assert sorted(got) == sorted(want) == ["beta", "down", "down_bias", "gamma", "up", "up_bias"]
            for key in want:
                torch.testing.assert_close(got[key][0], want[key], atol=1e-12, rtol=0)
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, module, _ in found:  # registered after the host's: sees the input and the adapted output
        module.register_forward_hook(lambda m, a, out, path=path: seen.__setitem__(path, (a[0], out)))
    tasks = [2, 0, 1]
    with ak.use(model, "h", task_ids=tasks):
        model(input_ids=tokens(batch=3))
    for index, (path, module, _) in enumerate(found):
        x, y = seen[path]
        base = _norm(x, module.eps) * module.weight + module.bias  # the target LayerNorm
        for row, task in enumerate(tasks):
            w = reference(state, task, *divmod(index, 2), d=32, h=8)
            expected = _norm(x[row] + adapter_out(w, base[row]), module.eps) * module.weight + module.bias
            torch.testing.assert_close(y[row], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("n_tasks", [3, 10])  # 10 > rows: only the tasks present are generated
def test_each_row_runs_its_own_tasks_adapter(n_tasks: int) -> None:
    model = _attached(Hyperformer(n_tasks=n_tasks, reduction_factor=4))
    ids = tokens(batch=4)
    tasks = [0, 2, 0, 1]
    with ak.use(model, "h", task_ids=tasks):
        mixed = logits(model, ids)
    for task in set(tasks):
        rows = [r for r, t in enumerate(tasks) if t == task]
        with ak.use(model, "h", task_ids=[task] * len(rows)):  # a single-task batch: the plain-linear path
            alone = logits(model, ids[rows])
        torch.testing.assert_close(mixed[rows], alone, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(mixed[0], mixed[1]) and not torch.allclose(mixed[1], mixed[3])
    with ak.use(model, ak.Stack("h"), task_ids=tasks):  # a block's task ids reach the adapter the same way
        assert torch.equal(logits(model, ids), mixed)


def test_only_the_tasks_present_get_gradients() -> None:
    model = _attached()
    ak.train_only(model, "h")
    with ak.use(model, "h", task_ids=[0, 2]):
        model(input_ids=tokens()).logits.pow(2).sum().backward()
    grad = placements(model, "h")[0][2].adapter("h").block.net.task.grad
    assert grad[0].abs().sum() > 0 and grad[2].abs().sum() > 0 and not grad[1].any()


def test_one_hypernetwork_counted_and_stored_once_and_load_resumes(tmp_path) -> None:
    spec = Hyperformer(n_tasks=3, reduction_factor=4, task_dim=6, hyper_hidden=10, projected_dim=5)
    model = _attached(spec)
    d, h, k, q, hh = 32, 8, 6, 5, 10
    expected = (3 + 4) * k + (2 * k * hh + hh) + (hh * q + q) + 2 * q + (q + 1) * (2 * h * d + h + d)
    assert ak.explain(make_tiny("bert"), ["output.LayerNorm"], spec).adapter_params == expected
    assert ak.train_only(model, "h") == expected  # 4 placements = 4 layer embeddings, no position embedding
    record, _ = ak.read(ak.save(model, tmp_path / "h"))
    keys = load_file(tmp_path / "h" / record["weights"]).keys()
    assert {k.split(".block.")[0] for k in keys} == {f"adapter.{record['targets'][0]}"}
    fresh = make_tiny("bert")
    ak.load(fresh, tmp_path / "h")
    ids, tasks = tokens(batch=3), [1, 0, 2]
    with ak.use(model, "h", task_ids=tasks), ak.use(fresh, "h", task_ids=tasks):
        before = logits(model, ids)
        assert torch.equal(logits(fresh, ids), before)
        for each in (model, fresh):  # one identical step on both
            ak.train_only(each, "h")
            optimizer = torch.optim.SGD([p for p in each.parameters() if p.requires_grad], lr=0.1)
            each(input_ids=ids).logits.pow(2).sum().backward()
            optimizer.step()
        after = logits(model, ids)
        assert torch.equal(logits(fresh, ids), after) and not torch.equal(after, before)


def test_one_task_needs_no_ids_and_several_do() -> None:
    single = _attached(Hyperformer(reduction_factor=4))
    ids = tokens()
    with ak.use(single, "h", task_ids=[0, 0]):
        zero = logits(single, ids)
    assert torch.equal(logits(single, ids), zero)  # n_tasks = 1: a call without ids is task 0
    model = _attached(Hyperformer(n_tasks=3, reduction_factor=4))
    cases = [(None, r"hyperformer at '.*attention\.output\.LayerNorm' generates each row's adapter from its task "
                    r"\(n_tasks=3\): pass task_ids= to use"),
             ([0, 3], r"task id 3 is out of range: n_tasks=3 \(ids 0..2\)"),
             ([-1, 0], r"task id -1 is out of range: n_tasks=3")]
    for tasks, message in cases:
        with pytest.raises(ak.AdapterKitError, match=message) as exc:
            with ak.use(model, "h", task_ids=tasks) if tasks is not None else ak.use(model, "h"):
                logits(model, ids)
        assert "\n" not in str(exc.value)


def test_bad_specs_and_targets_are_one_line_errors() -> None:
    spec_cases = [(dict(n_tasks=0), "n_tasks must be a positive integer"), (dict(norm="post"), "norm must be one of"),
                  (dict(activation="elu"), "activation must be one of"), (dict(init="xavier"), "init must be one of"),
                  (dict(projected_dim=-2), "projected_dim"), (dict(init_std=-1.0), "init_std must be >= 0")]
    for fields, message in spec_cases:
        with pytest.raises(SpecError, match=message):
            Hyperformer(**fields)
    target_cases = [(Hyperformer(positions=3), ["output.LayerNorm"], "positions=3 but 4 modules were selected"),
                    (Hyperformer(), ["output.LayerNorm", "intermediate.dense"],
                     r"intermediate\.dense has output feature size 64, .*attention\.output\.LayerNorm has 32; one"),
                    (Hyperformer(hidden=64), ["output.LayerNorm"], "hidden size 64 exceeds the feature size 32")]
    for spec, targets, message in target_cases:
        model = make_tiny("bert")
        with pytest.raises(TargetError, match=message) as exc:
            ak.attach(model, "h", spec, targets)
        assert "\n" not in str(exc.value) and ak.adapters(model) == []
    model = make_tiny("bert")  # Houlsby's placements: inputs of 32 and 64, outputs of 32 everywhere
    assert len(ak.attach(model, "h", Hyperformer(positions=2), ["attention.output.dense", "output.dense"])) == 4


def test_multitask_training_passes_each_rows_task() -> None:
    encoder = _encoder()
    ak.attach(encoder, "h", Hyperformer(n_tasks=2, reduction_factor=4), ["output.LayerNorm"])
    randomize(encoder, "h")
    model = MultiTaskClassifier(encoder, {"plain": 2, "flip": 2}, dropout=0.0).eval()  # block=None: active ones
    ids, mask, tasks = tokens(batch=4), torch.ones(4, 8, dtype=torch.long), torch.tensor([0, 1, 1, 0])
    with ak.use(encoder, "h", task_ids=tasks):
        pooled = encoder(input_ids=ids, attention_mask=mask).pooler_output
    out = model(ids, mask, tasks)
    torch.testing.assert_close(out.logits[1], model.heads["flip"](pooled[1]))
    torch.testing.assert_close(out.logits[0], model.heads["plain"](pooled[0]))
    ak.train_only(encoder, "h")  # the heads stay frozen: only the generated adapters can fit the batch
    for head in model.heads.parameters():
        head.requires_grad_(False)
    optimizer = torch.optim.Adam([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    labels = torch.tensor([1, 1, 0, 0])
    losses = []
    for _ in range(40):
        loss = model(ids, mask, tasks, labels).loss
        assert loss is not None
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert losses[-1] < 0.75 * losses[0], losses[::10]  # (frozen random heads on a tanh pooler bound the margin)
    assert torch.equal(model(ids, mask, tasks).logits.argmax(-1), labels)
    data = {"plain": (_synthetic(0, 64, False), _synthetic(1, 32, False)),
            "flip": (_synthetic(2, 64, True), _synthetic(3, 32, True))}
    result = train_multitask(model, _Tokenizer(), data, TrainConfig(epochs=1, lr=1e-3, batch_size=16, seed=0))
    assert result["steps"] == 8 and set(result["dev_accuracy"]) == {"plain", "flip"}  # mixed batches, 2 tasks


@pytest.mark.parametrize("reentrant", [True, False])
def test_task_ids_reach_a_checkpointing_recompute_after_the_use_block(reentrant: bool) -> None:
    """A Trainer calls backward outside the ``use`` block: the recompute must still see each row's task."""
    grads = []
    for checkpointing in (False, True):
        model = _attached(Hyperformer(n_tasks=3, reduction_factor=4))
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        ak.train_only(model, "h")
        with ak.use(model, "h", task_ids=[2, 0]):
            loss = model(input_ids=tokens()).logits.pow(2).sum()
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)


def test_a_bf16_base_keeps_a_float32_hypernetwork_and_bf16_activations() -> None:
    spec = Hyperformer(n_tasks=3, reduction_factor=4, init="normal")
    model = make_tiny("bert").to(torch.bfloat16)
    ak.attach(model, "h", spec, ["output.LayerNorm"])
    owner = placements(model, "h")[0][2].adapter("h")
    assert {p.dtype for p in owner.parameters()} == {torch.float32}  # the precision policy's float32 master
    reference = make_tiny("bert")
    ak.attach(reference, "h", spec, ["output.LayerNorm"])
    placements(reference, "h")[0][2].adapter("h").load_state_dict(owner.state_dict())
    ids = tokens(batch=3)
    with ak.use(model, "h", task_ids=[2, 0, 1]), ak.use(reference, "h", task_ids=[2, 0, 1]):
        got, want = logits(model, ids), logits(reference, ids)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
