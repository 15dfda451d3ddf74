"""Triton shrink/expand LoRA kernels against float64 and the torch gathered path, and the path dispatch.

The kernel checks run in a subprocess (tests/ops/kernel_checks.py): on the CPU under TRITON_INTERPRET=1, which must
be set before triton is imported and would otherwise leak into every later test; on a GPU natively. Each check
draws fresh seeded inputs; the tests below assert on the relative errors it measured.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from adapterkit.ops import multi_lora as dispatch
from adapterkit.ops.gathered import gathered_lora, stack_factors

ROOT = Path(__file__).resolve().parents[2]
HAS_TRITON = importlib.util.find_spec("triton") is not None
BOUND = {"fp32": 1e-5, "bf16": 1e-2, "fp16": 2e-3}  # relative L2 error of out + delta vs float64
CASES = ["prefill_mixed", "short_prefill_split_k", "decode_mixed", "decode_unfused", "one_adapter",
         "tiny_rank_odd_sizes", "strided_x_and_out", "out_no_view", "two_dim_rows"]


@pytest.fixture(scope="module", params=["cpu", "cuda"])
def checks(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The numbers measured by kernel_checks.py: interpreted on the CPU, native on a GPU (when there is one)."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (pip install 'adapterkit[gpu]' or requirements-ci.txt)")
    device = request.param
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device: the native kernel run needs a GPU")
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    env.pop("ADAPTERKIT_KERNELS", None)
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "tests.ops.kernel_checks", "--device", device], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results: dict[str, Any] = json.loads(run.stdout.strip().splitlines()[-1])
    assert results["interpreted"] == (device == "cpu")
    return results


@pytest.mark.parametrize("dtype", sorted(BOUND))
@pytest.mark.parametrize("case", CASES)
def test_kernels_match_float64_and_torch_path(checks: dict[str, Any], case: str, dtype: str) -> None:
    numbers = checks[f"{case}/{dtype}"]
    assert numbers["vs_float64"] < BOUND[dtype]
    if "vs_torch" in numbers:  # the torch path rounds too: the two differ by at most both errors
        assert numbers["vs_torch"] < 2 * BOUND[dtype]
        assert numbers["in_place"]
        assert numbers["no_adapter_rows_untouched"]


def test_no_adapter_rows_were_exercised(checks: dict[str, Any]) -> None:
    for dtype in BOUND:
        assert checks[f"prefill_mixed/{dtype}"]["no_adapter_rows"] == 2
        assert checks[f"one_adapter/{dtype}"]["no_adapter_rows"] == 0


def test_bigger_llama_shapes_on_gpu(checks: dict[str, Any]) -> None:
    if checks["interpreted"]:
        pytest.skip("1.1B Llama projection shapes run only natively on a GPU (the interpreter is too slow)")
    for case in ("llama_decode_q", "llama_prefill_down"):
        for dtype in BOUND:
            assert checks[f"{case}/{dtype}"]["vs_float64"] < BOUND[dtype], (case, dtype)


@pytest.mark.parametrize("dtype", sorted(BOUND))
def test_kernels_read_only_each_slots_rank(checks: dict[str, Any], dtype: str) -> None:
    """NaN beyond a slot's rank and in the no-adapter slot never reaches the output (torch would propagate it)."""
    assert checks[f"rank_masking/{dtype}"]["finite"]
    assert checks[f"rank_masking/{dtype}"]["vs_float64"] < BOUND[dtype]


def test_select_through_kernels_equals_rows_alone(checks: dict[str, Any]) -> None:
    assert checks["select_end_to_end/fp32"]["rows_alone_max_rel"] < 1e-5
    if "select_end_to_end/bf16" in checks:
        assert checks["select_end_to_end/bf16"]["rows_alone_max_rel"] < 1e-2


def test_forced_triton_runs_the_kernels(checks: dict[str, Any]) -> None:
    """ADAPTERKIT_KERNELS=triton: interpreted on a CPU (TRITON_INTERPRET=1), native on CUDA; auto: CUDA only."""
    assert checks["dispatch_triton"]["path"] == "triton"
    assert checks["dispatch_triton"]["auto_path"] == ("torch" if checks["interpreted"] else "triton")
    assert checks["dispatch_triton"]["vs_torch"] < 1e-5


# --- dispatch, in this process (triton, if imported here, is never interpreted) --------------------------------


def _operands(requires_grad: bool = False) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(12)
    pairs = [(torch.randn(3, 10, generator=gen), torch.randn(6, 3, generator=gen)) for _ in range(2)]
    x = torch.randn(3, 4, 10, generator=gen, requires_grad=requires_grad)
    a_stack, b_stack = stack_factors(pairs, x)
    return x, a_stack, b_stack, torch.tensor([1, 2, 0])


def test_auto_takes_torch_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, a_stack, b_stack, slots = _operands()
    assert dispatch.kernel_path(x, a_stack) == "torch"  # CPU tensors: torch, with or without an interpreter
    out = torch.randn(3, 4, 6)
    expected = out + gathered_lora(x, a_stack, b_stack, slots)
    got = dispatch.multi_lora(x, a_stack, b_stack, slots, into=out)
    assert got.data_ptr() == out.data_ptr()  # the delta went into ``into`` in place
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET")), reason="TRITON_INTERPRET is set in this session")
def test_forced_triton_on_cpu_is_a_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV, "triton")
    x, a_stack, b_stack, slots = _operands()
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1") as error:
        dispatch.multi_lora(x, a_stack, b_stack, slots)
    assert "\n" not in str(error.value) and "ADAPTERKIT_KERNELS=triton" in str(error.value)


def test_unknown_kernel_choice_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(dispatch.ENV, "cuda")
    x, a_stack, _, _ = _operands()
    with pytest.raises(ValueError, match="expected one of auto, torch, triton"):
        dispatch.kernel_path(x, a_stack)
    monkeypatch.setenv(dispatch.ENV, " Torch ")
    assert dispatch.kernel_path(x, a_stack) == "torch"


def test_without_triton_auto_falls_back_and_forcing_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dispatch, "_kernels", lambda: "triton is not installed (pip install 'adapterkit[gpu]')")
    x, a_stack, b_stack, slots = _operands()
    monkeypatch.setenv(dispatch.ENV, "auto")
    torch.testing.assert_close(dispatch.multi_lora(x, a_stack, b_stack, slots), gathered_lora(x, a_stack, b_stack,
                                                                                                slots))
    monkeypatch.setenv(dispatch.ENV, "triton")
    with pytest.raises(ValueError, match="triton is not installed"):
        dispatch.multi_lora(x, a_stack, b_stack, slots)


def test_gradients_and_unsupported_operands_take_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    """With kernels that could run (a stand-in that says it is interpreted), the conditions that rule them out."""
    monkeypatch.setattr(dispatch, "_kernels", lambda: SimpleNamespace(MAX_RANK=128, INTERPRETED=True))
    monkeypatch.delenv(dispatch.ENV, raising=False)
    x, a_stack, _, _ = _operands()
    assert dispatch.kernel_path(x, a_stack) == "torch"  # auto: CPU tensors never go to the interpreter
    monkeypatch.setenv(dispatch.ENV, "triton")
    assert dispatch.kernel_path(x, a_stack) == "triton"
    for bad_x, bad_a, why in [(x.double(), a_stack.double(), "dtype torch.float64"),
                              (x, torch.zeros(3, 129, 10), "rank 129"),
                              (_operands(requires_grad=True)[0], a_stack, "no backward")]:
        with pytest.raises(ValueError, match=why):
            dispatch.kernel_path(bad_x, bad_a)
    with torch.no_grad():  # no gradient is needed under no_grad
        assert dispatch.kernel_path(_operands(requires_grad=True)[0], a_stack) == "triton"


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.skipif(bool(os.environ.get("TRITON_INTERPRET")), reason="TRITON_INTERPRET is set: kernels are interpreted")
@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernel checks compile and run them natively")
@pytest.mark.parametrize("kernel", ["_shrink_kernel", "_expand_kernel", "_fused_kernel"])
def test_kernels_compile_for_h100_without_a_gpu(kernel: str) -> None:
    """The interpreter accepts code the compiler rejects: compile each bf16 kernel to H100 (sm_90) machine code."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from adapterkit.ops import triton_lora

    fn = getattr(triton_lora, kernel)
    consts = {"BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 128, "BLOCK_N": 128, "SPLIT_K": 2, "F32_DOT": False}
    consts = {k: v for k, v in consts.items() if k in fn.arg_names}
    pointers = {"h_ptr": "*fp32", "slots_ptr": "*i64", "ranks_ptr": "*i32"}
    signature = {name: "constexpr" if name in consts else pointers.get(name, "*bf16") if name.endswith("_ptr")
                 else "i32" for name in fn.arg_names}
    compiled = compile(ASTSource(fn, signature, consts), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert "mma" in compiled.asm["ptx"]  # the dots run on tensor cores
    assert compiled.asm["cubin"]  # ptxas accepted it
