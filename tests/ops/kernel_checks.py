"""Checks of the Triton LoRA kernels against float64 and the torch gathered path, run in a process of their own.

On the CPU the kernels run only under TRITON_INTERPRET=1, which must be set before triton is imported, so the pytest
session runs this file as a subprocess (tests/ops/test_triton_lora.py) and never imports triton with it set. On a
GPU the same checks run natively, with larger shapes (benchmarks/device_check.py):

    TRITON_INTERPRET=1 PYTHONPATH=src:. python -m tests.ops.kernel_checks --device cpu
    PYTHONPATH=src:. python -m tests.ops.kernel_checks --device cuda

Prints one JSON object: check name -> numbers measured (relative errors, flags); the tests assert on them.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch
from torch import Tensor

from adapterkit.ops.gathered import gathered_lora, stack_factors
from adapterkit.ops.multi_lora import kernel_path, multi_lora
from adapterkit.ops.triton_lora import INTERPRETED, triton_lora_

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _problem(seed: int, batch: int, tokens: int, features: tuple[int, int], ranks: list[int], slots: list[int] | None,
             dtype: torch.dtype, device: str) -> dict[str, Any]:
    """Fresh random factors of the given ranks (slot len(ranks): no adapter), activations and a base output."""
    gen = torch.Generator().manual_seed(seed)
    f_in, f_out = features
    pairs = [(torch.randn(r, f_in, generator=gen) / f_in**0.5, torch.randn(f_out, r, generator=gen) / r**0.5)
             for r in ranks]
    x = torch.randn(batch, tokens, f_in, generator=gen)
    out = torch.randn(batch, tokens, f_out, generator=gen)
    rows = torch.tensor(slots) if slots is not None else torch.randint(0, len(ranks) + 1, (batch,), generator=gen)
    like = torch.empty(0, dtype=dtype, device=device)
    a_stack, b_stack = stack_factors([(a.to(like), b.to(like)) for a, b in pairs], like)
    return {"x": x.to(like), "out": out.to(like), "slots": rows.to(device), "a": a_stack, "b": b_stack,
            "ranks": torch.tensor([*ranks, 0], dtype=torch.int32, device=device)}


def _reference(p: dict[str, Any]) -> Tensor:
    """out + delta in float64, one einsum over the gathered factors."""
    a, b, slots = p["a"].double(), p["b"].double(), p["slots"]
    delta = torch.einsum("bti,bri,bor->bto", p["x"].double(), a[slots], b[slots])
    return p["out"].double() + delta


def _rel(got: Tensor, want: Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def _compare(p: dict[str, Any], x: Tensor | None = None, out: Tensor | None = None,
             fused: bool | None = None) -> dict[str, Any]:
    """Kernel result vs float64 and vs the torch gathered path in the same dtype."""
    x = p["x"] if x is None else x
    out = p["out"].clone() if out is None else out
    before = out.clone()
    got = triton_lora_(out, x, p["a"], p["b"], p["slots"], p["ranks"], fused)
    torch_path = p["out"] + gathered_lora(p["x"], p["a"], p["b"], p["slots"])
    none = p["slots"] == p["ranks"].numel() - 1  # rows of the "no adapter" slot
    return {"vs_float64": _rel(got, _reference(p)), "vs_torch": _rel(got, torch_path),
            "in_place": got.data_ptr() == out.data_ptr(),
            "no_adapter_rows_untouched": bool(torch.equal(got[none], before[none])), "no_adapter_rows": int(none.sum())}


def kernel_cases(device: str, dtype: torch.dtype, big: bool) -> dict[str, dict[str, Any]]:
    """Prefill / decode / one adapter / odd sizes / strided operands; ``big`` adds 1.1B Llama projection shapes.

    Rows of at most 16 tokens take the fused kernel, longer ones shrink + expand (split-K when the grid is small).
    """
    mixed = [8, 3, 16, 5]  # mixed ranks; slot 4 = no adapter
    decode = _problem(2, 9, 1, (300, 130), mixed, None, dtype, device)
    results = {
        "prefill_mixed": _compare(_problem(1, 5, 40, (70, 50), mixed, [0, 4, 2, 1, 4], dtype, device)),
        "short_prefill_split_k": _compare(_problem(12, 2, 20, (300, 40), mixed, [2, 4], dtype, device)),
        "decode_mixed": _compare(decode),
        "decode_unfused": _compare(decode, fused=False),  # split-K shrink + expand on the same rows
        "one_adapter": _compare(_problem(3, 4, 17, (33, 45), [4], [0, 0, 0, 0], dtype, device)),
        "tiny_rank_odd_sizes": _compare(_problem(4, 3, 5, (7, 3), [1, 2], [1, 2, 0], dtype, device)),
    }
    p = _problem(5, 4, 6, (40, 36), mixed, [3, 4, 0, 2], dtype, device)
    x_t = p["x"].transpose(0, 1).contiguous().transpose(0, 1)  # (B, T, in) with the token dim outermost
    wide = torch.zeros(4, 6, 50, dtype=dtype, device=device)
    wide[..., :36] = p["out"]
    results["strided_x_and_out"] = _compare(p, x=x_t, out=wide[..., :36])  # out: a view into a wider buffer
    p = _problem(6, 4, 6, (40, 36), mixed, [1, 4, 0, 3], dtype, device)
    out_t = p["out"].transpose(1, 2).contiguous().transpose(1, 2)  # no 3-d view of out: the copy-back path
    results["out_no_view"] = _compare(p, out=out_t)
    p = _problem(7, 6, 1, (64, 48), mixed, None, dtype, device)  # 2-d activations (rows, in): decode w/o a token dim
    out2 = p["out"][:, 0].clone()
    got = triton_lora_(out2, p["x"][:, 0], p["a"], p["b"], p["slots"], p["ranks"])
    results["two_dim_rows"] = {"vs_float64": _rel(got, _reference(p)[:, 0])}
    if big:  # the benchmark's projections: q (2048 -> 2048) at decode 64 x 1, down (5632 -> 2048) at prefill
        results["llama_decode_q"] = _compare(_problem(8, 64, 1, (2048, 2048), [16] * 64, None, dtype, device))
        results["llama_prefill_down"] = _compare(_problem(9, 16, 512, (5632, 2048), [16] * 16, None, dtype, device))
    return results


def rank_masking(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """NaN in a slot's padding beyond its rank and in the whole "no adapter" slot: the kernels never read them."""
    p = _problem(10, 6, 3, (24, 20), [2, 16], [0, 2, 1, 0, 2, 1], dtype, device)
    p["a"][0, 2:] = float("nan")
    p["b"][0, :, 2:] = float("nan")
    p["a"][2], p["b"][2] = float("nan"), float("nan")
    out = p["out"].clone()
    triton_lora_(out, p["x"], p["a"], p["b"], p["slots"], p["ranks"])
    p["a"], p["b"] = p["a"].nan_to_num(0.0), p["b"].nan_to_num(0.0)
    return {"finite": bool(out.isfinite().all()), "vs_float64": _rel(out, _reference(p))}


def dispatch_forced(device: str) -> dict[str, Any]:
    """ADAPTERKIT_KERNELS=triton takes the kernels (interpreted on a CPU) and matches the torch path; unset (auto),
    the kernels take CUDA tensors only."""
    p = _problem(11, 3, 4, (20, 12), [4, 2], [1, 2, 0], torch.float32, device)
    os.environ.pop("ADAPTERKIT_KERNELS", None)
    auto = kernel_path(p["x"], p["a"])
    os.environ["ADAPTERKIT_KERNELS"] = "triton"
    path = kernel_path(p["x"], p["a"])
    via = multi_lora(p["x"], p["a"], p["b"], p["slots"], p["ranks"])
    os.environ["ADAPTERKIT_KERNELS"] = "torch"
    plain = multi_lora(p["x"], p["a"], p["b"], p["slots"], p["ranks"])
    del os.environ["ADAPTERKIT_KERNELS"]
    return {"path": path, "auto_path": auto, "vs_torch": _rel(via, plain)}


@torch.no_grad()
def select_end_to_end(device: str, dtype: torch.dtype) -> dict[str, Any]:
    """A tiny Llama, mixed ranks, rows without an adapter: Select through the kernels vs each row alone."""
    import adapterkit as ak
    from tests.conftest import make_tiny, randomize, tokens

    model = make_tiny("llama").to(device=device, dtype=dtype)
    ak.attach(model, "a", ak.LoRA(r=2), ["q_proj", "v_proj", "down_proj"])
    ak.attach(model, "b", ak.LoRA(r=8), ["q_proj", "o_proj"])
    for i, name in enumerate("ab"):
        randomize(model, name, scale=0.2, seed=i)
    names = ["b", None, "a", "a", None, "b"]
    ids = tokens(batch=len(names), length=5).to(device)
    os.environ["ADAPTERKIT_KERNELS"] = "triton"
    with ak.use(model, ak.Select(names)):
        mixed = model(input_ids=ids).logits
    del os.environ["ADAPTERKIT_KERNELS"]
    worst = 0.0
    for row, name in enumerate(names):
        with ak.use(model, *([name] if name else [])):
            alone = model(input_ids=ids[row:row + 1]).logits[0]
        worst = max(worst, float((mixed[row].double() - alone.double()).abs().max() / alone.double().abs().max()))
    return {"rows_alone_max_rel": worst}


def run(device: str, dtypes: list[str], big: bool) -> dict[str, Any]:
    results: dict[str, Any] = {"interpreted": INTERPRETED}
    for name in dtypes:
        for case, numbers in kernel_cases(device, DTYPES[name], big).items():
            results[f"{case}/{name}"] = numbers
        results[f"rank_masking/{name}"] = rank_masking(device, DTYPES[name])
    results["dispatch_triton"] = dispatch_forced(device)
    results["select_end_to_end/fp32"] = select_end_to_end(device, torch.float32)
    if device == "cuda":
        results["select_end_to_end/bf16"] = select_end_to_end(device, torch.bfloat16)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16", "fp16"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(json.dumps(run(args.device, args.dtypes, big=args.device == "cuda")))


if __name__ == "__main__":
    main()
