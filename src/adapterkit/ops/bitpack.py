"""Bit packing: k-bit integer codes (k = 1..8) stored as bits, not bytes, in one self-describing uint8 tensor.

Layout of a packed tensor (all little-endian), so a file alone says what it holds and a damaged one is caught:

    byte 0         MAGIC (0xB1)
    byte 1         bits k, 1..8
    byte 2         ndim, 0..8
    bytes 3..      ndim dimensions, 4 bytes each (uint32)
    payload        ceil(numel * k / 8) bytes; code i occupies bits [i*k, (i+1)*k) of the stream, least
                   significant bit first; the padding bits of the last byte are zero

A 1-bit (384, 1536) mask is 73,728 payload bytes instead of 2,359,296 as float32 (32x). ``unpack`` checks every
field and raises ``BitpackError`` (a ValueError) with one line saying what is wrong; callers add the file and
tensor name. Used by the low-bit adapters, mask tuning and SPLoRA (methods/), read by ``adapterkit inspect``.
"""

from __future__ import annotations

import math
import struct

import torch
from torch import Tensor

MAGIC = 0xB1
_MAX_NDIM = 8


class BitpackError(ValueError):
    """A packed tensor that is truncated, too long, or has an impossible header."""


def payload_bytes(numel: int, bits: int) -> int:
    """Bytes needed for ``numel`` codes of ``bits`` bits."""
    return math.ceil(numel * bits / 8)


def pack(codes: Tensor, bits: int) -> Tensor:
    """Integer ``codes`` in [0, 2**bits) of any shape -> one uint8 tensor (header + bit stream)."""
    if not 1 <= bits <= 8:
        raise BitpackError(f"bits must be 1..8, got {bits}")
    if codes.is_floating_point() or codes.is_complex():
        raise BitpackError(f"codes must be an integer or bool tensor, got {codes.dtype}")
    if codes.dim() > _MAX_NDIM:
        raise BitpackError(f"at most {_MAX_NDIM} dimensions, got {codes.dim()}")
    flat = codes.detach().reshape(-1).to("cpu", torch.int64)  # (n,)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise BitpackError(f"codes must lie in [0, {1 << bits}) for {bits} bits")
    stream = ((flat[:, None] >> torch.arange(bits)) & 1).reshape(-1)  # (n * bits,) LSB first
    stream = torch.nn.functional.pad(stream, (0, (-stream.numel()) % 8))  # zero padding bits
    payload = (stream.view(-1, 8) << torch.arange(8)).sum(1).to(torch.uint8)  # (ceil(n * bits / 8),)
    header = struct.pack(f"<BBB{codes.dim()}I", MAGIC, bits, codes.dim(), *codes.shape)
    return torch.cat([torch.frombuffer(bytearray(header), dtype=torch.uint8), payload])


def describe(packed: Tensor) -> tuple[int, tuple[int, ...]]:
    """(bits, shape) from a packed tensor's header, checking the header and the total length."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise BitpackError(f"not a packed tensor (expected 1-D uint8, got {packed.dim()}-D {packed.dtype})")
    raw = packed[: 3 + 4 * _MAX_NDIM].detach().cpu().numpy().tobytes()  # the header is at most this long
    if len(raw) < 3:
        raise BitpackError(f"header truncated ({len(raw)} bytes)")
    if raw[0] != MAGIC:
        raise BitpackError("not a packed tensor (bad magic byte)")
    bits, ndim = raw[1], raw[2]
    if not 1 <= bits <= 8:
        raise BitpackError(f"header says {bits} bits (must be 1..8)")
    if ndim > _MAX_NDIM or len(raw) < 3 + 4 * ndim:
        raise BitpackError(f"header truncated or says {ndim} dimensions")
    shape = struct.unpack_from(f"<{ndim}I", raw, 3)
    expected = 3 + 4 * ndim + payload_bytes(math.prod(shape), bits)
    if packed.numel() != expected:
        raise BitpackError(f"{packed.numel()} bytes, but a {bits}-bit tensor of shape {tuple(shape)} needs {expected} "
                           "(truncated or corrupted)")
    return bits, tuple(shape)


def is_packed(tensor: Tensor) -> bool:
    """True if ``tensor`` is a well-formed packed tensor."""
    try:
        describe(tensor)
    except BitpackError:
        return False
    return True


def unpack(packed: Tensor, bits: int | None = None, shape: tuple[int, ...] | None = None) -> Tensor:
    """Packed tensor -> int64 codes of the stored shape; ``bits``/``shape``, when given, must match the header."""
    stored_bits, stored_shape = describe(packed)
    if bits is not None and stored_bits != bits:
        raise BitpackError(f"stored with {stored_bits} bits, expected {bits}")
    if shape is not None and tuple(shape) != stored_shape:
        raise BitpackError(f"stored shape {stored_shape}, expected {tuple(shape)}")
    numel = math.prod(stored_shape)
    payload = packed[3 + 4 * len(stored_shape):].detach().to("cpu", torch.int64)  # (ceil(n * k / 8),)
    stream = ((payload[:, None] >> torch.arange(8)) & 1).reshape(-1)  # (8 * bytes,)
    if stream[numel * stored_bits:].any():
        raise BitpackError("non-zero padding bits (corrupted)")
    per_code = stream[: numel * stored_bits].view(numel, stored_bits)  # (n, k)
    codes = (per_code << torch.arange(stored_bits)).sum(1)  # (n,)
    return codes.view(stored_shape)
