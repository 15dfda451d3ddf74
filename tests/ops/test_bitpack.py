"""Bit packing: exact round trips for every bit width and awkward sizes; damaged tensors fail with one line."""

from __future__ import annotations

import pytest
import torch

from adapterkit.ops.bitpack import BitpackError, describe, is_packed, pack, payload_bytes, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (13, 3), (5, 1, 9), (384, 8)])
def test_round_trip_is_exact(bits, shape) -> None:
    codes = torch.randint(0, 1 << bits, shape, generator=torch.Generator().manual_seed(bits))
    packed = pack(codes, bits)
    assert packed.dtype == torch.uint8 and packed.dim() == 1
    numel = codes.numel()
    assert packed.numel() == 3 + 4 * len(shape) + payload_bytes(numel, bits)  # bits, not bytes
    assert describe(packed) == (bits, tuple(shape))
    out = unpack(packed, bits, tuple(shape))
    assert out.shape == codes.shape and torch.equal(out, codes)


def test_one_bit_is_32x_smaller_than_float32() -> None:
    mask = torch.rand(384, 1536) > 0.5
    packed = pack(mask, 1)
    assert 384 * 1536 * 4 / packed.numel() > 31.99
    assert torch.equal(unpack(packed).bool(), mask)


def test_bits_are_least_significant_first() -> None:
    assert pack(torch.tensor([1, 0, 1, 1]), 1)[-1].item() == 0b1101
    assert pack(torch.tensor([3, 1]), 2)[-1].item() == 0b0111


@pytest.mark.parametrize("bad,match", [
    (lambda p: p[:-1], "truncated or corrupted"),
    (lambda p: torch.cat([p, torch.zeros(1, dtype=torch.uint8)]), "truncated or corrupted"),
    (lambda p: torch.cat([p[:1], torch.tensor([9], dtype=torch.uint8), p[2:]]), "9 bits"),
    (lambda p: torch.cat([torch.tensor([0], dtype=torch.uint8), p[1:]]), "magic"),
    (lambda p: p.float(), "1-D uint8"),
    (lambda p: p[:2], "truncated"),
])
def test_damaged_tensors_raise_one_line(bad, match) -> None:
    packed = bad(pack(torch.randint(0, 8, (5, 3)), 3))
    with pytest.raises(BitpackError, match=match) as exc:
        unpack(packed)
    assert "\n" not in str(exc.value)
    assert not is_packed(packed)


def test_expected_bits_and_shape_are_checked() -> None:
    packed = pack(torch.zeros(4, 4, dtype=torch.long), 2)
    with pytest.raises(BitpackError, match="stored with 2 bits, expected 1"):
        unpack(packed, 1)
    with pytest.raises(BitpackError, match=r"stored shape \(4, 4\), expected \(4, 5\)"):
        unpack(packed, 2, (4, 5))


def test_nonzero_padding_bits_are_corruption() -> None:
    packed = pack(torch.ones(3, dtype=torch.long), 1).clone()
    packed[-1] |= 0x80
    with pytest.raises(BitpackError, match="padding"):
        unpack(packed)


def test_codes_out_of_range_are_refused() -> None:
    with pytest.raises(BitpackError, match=r"\[0, 4\)"):
        pack(torch.tensor([4]), 2)
    with pytest.raises(BitpackError, match="1..8"):
        pack(torch.tensor([0]), 9)
