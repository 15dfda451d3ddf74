"""Triton shrink/expand kernels for per-example LoRA: row b of a batch uses the factors in slot ``slots[b]``.

    shrink:  h[b, t]    = x[b, t] @ A[slots[b]]^T          x: (B, T, in)   A: (slots, r_max, in)   h: (B, T, r_max) fp32
    expand:  out[b, t] += h[b, t] @ B[slots[b]]^T          B: (slots, out, r_max)                   out: (B, T, out)

Layout: SGMV over segments, where a segment is one batch row. The tokens of an example are already contiguous and
share one adapter, so the segment table is just ``slots`` (built once per ``use`` block by the SelectPlan) and no
sort or permutation of the activations is needed. A program owns a tile of tokens of ONE row, loads that row's
factors straight from the stacks by slot (nothing is gathered into per-example copies: the torch path's
``a[slots]`` writes (B, r, in) bytes per layer, which is what made decode slow) and runs tensor-core ``tl.dot``.
The token tile follows the tokens per row: prefill (512 tokens a row) uses 64-token tiles; decode (1 token a row)
uses the smallest ``tl.dot`` tile (16), whose padding rows are masked loads that cost no memory traffic, so a
decode step has the BGMV access pattern (each row streams its own A and B). BGMV proper (one program per token,
reduction without ``tl.dot``) would be a second code path for no gain on these shapes.

Two launch plans. Prefill: shrink then expand (h is (B, T, r) fp32, tiny); when the shrink grid is under about
two waves of an H100 it splits its reduction over ``in`` (split-K, fp32 atomics into a zeroed h). Decode (rows of
at most 16 tokens): ONE fused kernel per layer, grid (rows, out tiles), in which each program recomputes its
row's h (r x in, from L2 after the first out tile) before expanding; a decode step is bound by launches, not
bytes, and this saves a launch and the h buffer.

Ranks: the stacks are zero-padded to r_max, and ``ranks[slot]`` masks the loads of a slot's factors to its own
rank (masked lanes fetch nothing, so a rank-4 adapter beside a rank-64 one reads rank-4 bytes). The "no adapter"
slot has rank 0: its programs return at once, so those rows cost one scalar load and leave ``out`` untouched.

Precision: fp32 accumulation always; h is kept in fp32 and cast to the activation dtype for the expand's tensor-core
dot (bf16/fp16), as the torch path rounds it; fp32 inputs use IEEE fp32 dots (no TF32) so they match to 1e-5.

Tiles (H100, r <= 128; BLOCK_R = r_max rounded up to a power of two, at least 16): shrink 64 x r x 128 (tokens x
rank x in), expand 64 x 128 x r (tokens x out x rank), fused decode 16 x 256 out features (k-steps of 128), 4
warps, no autotuning (the interpreter must stay fast, and these shapes are bandwidth- or launch-bound).
Import this module only where triton is installed; ``adapterkit.ops.multi_lora`` picks the path.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_K = 128  # shrink: features of ``in`` per step
BLOCK_N = 128  # expand: output features per program
FUSED_BLOCK_N = 256  # fused decode kernel: output features per program (each recomputes its row's h)
FUSED_MAX_TOKENS = 16  # rows this short (decode) take the fused kernel
MAX_RANK = 128  # one rank tile per program; larger ranks take the torch path
_TARGET_PROGRAMS = 256  # about two waves on an H100's 132 SMs: below this the shrink splits its reduction


@triton.jit
def _row_slot(slots_ptr, ranks_ptr):
    """This program's batch row, its slot and that slot's rank (0: no adapter)."""
    row = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots_ptr + row).to(tl.int64)
    return row, slot, tl.load(ranks_ptr + slot)


@triton.jit
def _shrink_tile(x_ptr, a_ptr, row, slot, rank, offs_m, tokens, features, k_first, k_step,
                 stride_xb, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                 BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr):
    """(BLOCK_M, BLOCK_R) fp32: tokens ``offs_m`` of ``row`` times A[slot]^T over the k-tiles k_first, +k_step, ..."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    x_rows = x_ptr + row * stride_xb + offs_m[:, None] * stride_xt  # (BLOCK_M, 1)
    a_rows = a_ptr + slot * stride_as + offs_r[:, None] * stride_ar  # (BLOCK_R, 1)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_first, features, k_step):
        k = k0 + offs_k  # (BLOCK_K,)
        x = tl.load(x_rows + k[None, :] * stride_xk, mask=(offs_m[:, None] < tokens) & (k[None, :] < features),
                    other=0.0)  # (BLOCK_M, BLOCK_K)
        a = tl.load(a_rows + k[None, :] * stride_ak, mask=(offs_r[:, None] < rank) & (k[None, :] < features),
                    other=0.0)  # (BLOCK_R, BLOCK_K): lanes beyond the slot's rank fetch nothing
        if F32_DOT:  # exact products of the (possibly bf16-rounded) operands, IEEE fp32 sums
            acc += tl.dot(x.to(tl.float32), tl.trans(a).to(tl.float32), input_precision="ieee")
        else:  # tensor cores in the activation dtype, fp32 accumulation
            acc += tl.dot(x, tl.trans(a))
    return acc


@triton.jit
def _expand_tile(h, b_ptr, out_ptr, row, slot, rank, offs_m, tokens, features,
                 stride_bs, stride_bn, stride_br, stride_ob, stride_ot, stride_on,
                 BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """out[row, offs_m, n-block] += h @ B[slot]^T for this program's n-block; h (BLOCK_M, BLOCK_R) fp32."""
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                mask=(offs_r[:, None] < rank) & (offs_n[None, :] < features), other=0.0)  # (BLOCK_R, BLOCK_N)
    h = h.to(b.dtype)  # rounded to the activation dtype, as the torch path rounds it
    if F32_DOT:
        delta = tl.dot(h.to(tl.float32), b.to(tl.float32), input_precision="ieee")  # (BLOCK_M, BLOCK_N)
    else:
        delta = tl.dot(h, b)
    out = out_ptr + row * stride_ob + offs_m[:, None] * stride_ot + offs_n[None, :] * stride_on
    mask = (offs_m[:, None] < tokens) & (offs_n[None, :] < features)
    current = tl.load(out, mask=mask, other=0.0)
    tl.store(out, (current.to(tl.float32) + delta).to(current.dtype), mask=mask)


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, h_ptr, slots_ptr, ranks_ptr, tokens, features,
                   stride_xb, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_hb, stride_ht,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                   F32_DOT: tl.constexpr):
    """Grid (B, token tiles, SPLIT_K): h = x @ A^T; program k reduces the k-tiles k, k + SPLIT_K, ..."""
    row, slot, rank = _row_slot(slots_ptr, ranks_ptr)
    if rank == 0:  # "no adapter" row: nothing to compute (the expand skips it too)
        return
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) token index within the row
    acc = _shrink_tile(x_ptr, a_ptr, row, slot, rank, offs_m, tokens, features, tl.program_id(2) * BLOCK_K,
                       SPLIT_K * BLOCK_K, stride_xb, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                       BLOCK_M, BLOCK_R, BLOCK_K, F32_DOT)
    offs_r = tl.arange(0, BLOCK_R)
    h = h_ptr + row * stride_hb + offs_m[:, None] * stride_ht + offs_r[None, :]  # (BLOCK_M, BLOCK_R)
    mask = (offs_m[:, None] < tokens) & (offs_r[None, :] < rank)
    if SPLIT_K == 1:
        tl.store(h, acc, mask=mask)
    else:  # partial sums of the split reduction meet in the zero-initialised h
        tl.atomic_add(h, acc, mask=mask)


@triton.jit
def _expand_kernel(h_ptr, b_ptr, out_ptr, slots_ptr, ranks_ptr, tokens, features,
                   stride_hb, stride_ht, stride_bs, stride_bn, stride_br, stride_ob, stride_ot, stride_on,
                   BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, F32_DOT: tl.constexpr):
    """Grid (B, token tiles, out tiles): out += h @ B^T."""
    row, slot, rank = _row_slot(slots_ptr, ranks_ptr)
    if rank == 0:  # "no adapter" row: out is left exactly as the base model wrote it
        return
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    h = tl.load(h_ptr + row * stride_hb + offs_m[:, None] * stride_ht + offs_r[None, :],
                mask=(offs_m[:, None] < tokens) & (offs_r[None, :] < rank), other=0.0)  # (BLOCK_M, BLOCK_R) fp32
    _expand_tile(h, b_ptr, out_ptr, row, slot, rank, offs_m, tokens, features, stride_bs, stride_bn, stride_br,
                 stride_ob, stride_ot, stride_on, BLOCK_R, BLOCK_N, F32_DOT)


@triton.jit
def _fused_kernel(x_ptr, a_ptr, b_ptr, out_ptr, slots_ptr, ranks_ptr, tokens, features_in, features_out,
                  stride_xb, stride_xt, stride_xk, stride_as, stride_ar, stride_ak,
                  stride_bs, stride_bn, stride_br, stride_ob, stride_ot, stride_on,
                  BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  F32_DOT: tl.constexpr):
    """Grid (B, token tiles, out tiles), decode: each program recomputes its row's h (r x in, from L2 after the first
    out tile) and expands it, so a decode step costs one launch and no h buffer."""
    row, slot, rank = _row_slot(slots_ptr, ranks_ptr)
    if rank == 0:
        return
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = _shrink_tile(x_ptr, a_ptr, row, slot, rank, offs_m, tokens, features_in, 0, BLOCK_K,
                     stride_xb, stride_xt, stride_xk, stride_as, stride_ar, stride_ak, BLOCK_M, BLOCK_R, BLOCK_K,
                     F32_DOT)
    _expand_tile(h, b_ptr, out_ptr, row, slot, rank, offs_m, tokens, features_out, stride_bs, stride_bn, stride_br,
                 stride_ob, stride_ot, stride_on, BLOCK_R, BLOCK_N, F32_DOT)


# the kernels above are plain Python under TRITON_INTERPRET=1 (set before triton was imported): they run on CPU tensors
INTERPRETED = type(_shrink_kernel).__name__ == "InterpretedFunction"


def _f32_dot(dtype: torch.dtype) -> bool:
    """fp32 dots for fp32 inputs; also for bf16 under the interpreter, whose ``tl.dot`` multiplies bf16 bit patterns
    as integers (triton-lang/triton#11584, not supported upstream): bf16 products are exact in fp32, so only the
    summation order differs from the tensor-core path that runs on a GPU."""
    return dtype == torch.float32 or (INTERPRETED and dtype == torch.bfloat16)


def _token_tile(tokens: int) -> int:
    """64-token tiles for prefill; the smallest tl.dot tile (16) for decode and short rows."""
    return 16 if tokens <= 16 else 64


def _rank_tile(r_max: int) -> int:
    return max(16, triton.next_power_of_2(r_max))


def lora_shrink(x: Tensor, a_stack: Tensor, slots: Tensor, ranks: Tensor) -> Tensor:
    """h (B, T, r_max) fp32 with h[b] = x[b] @ A[slots[b]]^T, written only where the expand reads it (columns below
    the row's rank; rows of rank-0 slots not at all).

    Args:
        x: (B, T, in) activations, any strides.
        a_stack: (slots, r_max, in) stacked A factors.
        slots: (B,) int64 slot of each row.
        ranks: (slots,) int32 rank of each slot (0: no adapter).
    """
    batch, tokens, features = x.shape
    r_max = a_stack.shape[1]
    block_m = _token_tile(tokens)
    tiles = batch * triton.cdiv(tokens, block_m)
    # powers of two only: SPLIT_K is a compile-time constant, so this bounds the compiled variants at five
    k_tiles = triton.cdiv(features, BLOCK_K)
    split = min(triton.next_power_of_2(triton.cdiv(_TARGET_PROGRAMS, tiles)), 16, 1 << (k_tiles.bit_length() - 1))
    # split partial sums meet by atomic adds in a zeroed h; unsplit, every entry the expand reads is stored
    h = (torch.zeros if split > 1 else torch.empty)(batch, tokens, r_max, dtype=torch.float32, device=x.device)
    grid = (batch, triton.cdiv(tokens, block_m), split)
    _shrink_kernel[grid](x, a_stack, h, slots, ranks, tokens, features,
                         x.stride(0), x.stride(1), x.stride(2), *a_stack.stride(), h.stride(0), h.stride(1),
                         BLOCK_M=block_m, BLOCK_R=_rank_tile(r_max), BLOCK_K=BLOCK_K, SPLIT_K=split,
                         F32_DOT=_f32_dot(x.dtype), num_warps=4)
    return h


def lora_expand_(out: Tensor, h: Tensor, b_stack: Tensor, slots: Tensor, ranks: Tensor) -> Tensor:
    """out[b] += h[b] @ B[slots[b]]^T in place (rows of rank-0 slots untouched); returns ``out``.

    Args:
        out: (B, T, out) accumulator, any strides, written in place.
        h: (B, T, r_max) fp32 from ``lora_shrink``.
        b_stack: (slots, out, r_max) stacked B factors (scale folded in).
        slots: (B,) int64 slot of each row.
        ranks: (slots,) int32 rank of each slot.
    """
    batch, tokens, features = out.shape
    block_m = _token_tile(tokens)
    grid = (batch, triton.cdiv(tokens, block_m), triton.cdiv(features, BLOCK_N))
    _expand_kernel[grid](h, b_stack, out, slots, ranks, tokens, features, h.stride(0), h.stride(1),
                         *b_stack.stride(), *out.stride(),
                         BLOCK_M=block_m, BLOCK_R=_rank_tile(b_stack.shape[2]), BLOCK_N=BLOCK_N,
                         F32_DOT=_f32_dot(b_stack.dtype), num_warps=4)
    return out


def lora_fused_(out: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, ranks: Tensor) -> Tensor:
    """out[b] += x[b] @ A[slots[b]]^T @ B[slots[b]]^T in one launch (each out tile recomputes its row's h): for
    decode, where launches, not bytes, are the cost. x (B, T, in), out (B, T, out), any strides; returns ``out``."""
    batch, tokens, features_in = x.shape
    block_m = _token_tile(tokens)
    grid = (batch, triton.cdiv(tokens, block_m), triton.cdiv(out.shape[2], FUSED_BLOCK_N))
    _fused_kernel[grid](x, a_stack, b_stack, out, slots, ranks, tokens, features_in, out.shape[2], *x.stride(),
                        *a_stack.stride(), *b_stack.stride(), *out.stride(),
                        BLOCK_M=block_m, BLOCK_R=_rank_tile(a_stack.shape[1]), BLOCK_K=BLOCK_K,
                        BLOCK_N=FUSED_BLOCK_N, F32_DOT=_f32_dot(x.dtype), num_warps=4)
    return out


def _add(out: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, ranks: Tensor,
         fused: bool) -> None:
    if fused:
        lora_fused_(out, x, a_stack, b_stack, slots, ranks)
    else:
        lora_expand_(out, lora_shrink(x, a_stack, slots, ranks), b_stack, slots, ranks)


def triton_lora_(out: Tensor, x: Tensor, a_stack: Tensor, b_stack: Tensor, slots: Tensor, ranks: Tensor,
                 fused: bool | None = None) -> Tensor:
    """out += the per-example LoRA delta, in place; returns ``out``.

    Args:
        out: (B, ..., out) base output, batch first.
        x: (B, ..., in) activations.
        a_stack, b_stack, slots, ranks: as in ``lora_shrink`` / ``lora_expand_``.
        fused: one fused launch (default for decode: at most 16 tokens a row) or shrink + expand (prefill).
    """
    batch = x.shape[0]
    flat_x = x.reshape(batch, -1, x.shape[-1])  # (B, T, in): a view where strides allow
    if fused is None:
        fused = flat_x.shape[1] <= FUSED_MAX_TOKENS
    try:
        flat_out = out.view(batch, -1, out.shape[-1])  # (B, T, out): must alias ``out``
    except RuntimeError:  # strides that no 3-d view expresses: work on a copy, write it back
        work = out.reshape(batch, -1, out.shape[-1]).contiguous()
        _add(work, flat_x, a_stack, b_stack, slots, ranks, fused)
        return out.copy_(work.view(out.shape))
    _add(flat_out, flat_x, a_stack, b_stack, slots, ranks, fused)
    return out
