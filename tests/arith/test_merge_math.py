"""ops/merge_math against peft's own merge_utils, in float64 on random tensors (peft is the reference only)."""

from __future__ import annotations

from typing import Literal

import pytest
import torch
from peft.utils import merge_utils

from adapterkit.ops import merge_math as mm


def _tasks(k: int = 3, shape: tuple[int, ...] = (6, 7), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(k)]


WEIGHTS = [0.7, -0.4, 1.3]


def test_magnitude_prune_keeps_the_largest_fraction() -> None:
    (t,) = _tasks(1)
    for density in (0.1, 0.5, 0.93):
        ours = mm.magnitude_prune(t, density)
        torch.testing.assert_close(ours, merge_utils.magnitude_based_pruning(t, density), rtol=0, atol=0)
        assert int((ours != 0).sum()) == int(density * t.numel())
        assert ours[ours != 0].abs().min() >= t[ours == 0].abs().max()  # the kept ones are the largest
    assert mm.magnitude_prune(t, 1.0) is t


def test_random_mask_is_peft_bernoulli_on_the_same_seed() -> None:
    generator = torch.Generator().manual_seed(11)
    ours = [mm.random_mask((6, 7), 0.3, generator) for _ in range(2)]
    torch.manual_seed(11)
    theirs = [torch.bernoulli(torch.full((6, 7), 0.3)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    assert not torch.equal(ours[0], ours[1])
    (t,) = _tasks(1)
    torch.manual_seed(11)
    reference = merge_utils.random_pruning(t.float(), 0.3, rescale=True)
    mask = mm.random_mask(t.shape, 0.3, torch.Generator().manual_seed(11))
    torch.testing.assert_close(mm.drop_and_rescale(t.float(), 0.3, mask), reference, rtol=0, atol=0)
    with pytest.raises(ValueError, match="keep-mask"):
        mm.drop_and_rescale(t, 0.3, None)


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_sign_election_and_disjoint_merge(method: Literal["total", "frequency"]) -> None:
    stacked = torch.stack([mm.magnitude_prune(t, 0.5) for t in _tasks()])
    stacked[:, 0, 0] = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)  # a tie: + is elected
    ours = mm.majority_sign_mask(stacked, method)
    theirs = merge_utils.calculate_majority_sign_mask(stacked, method)
    assert torch.equal(ours, theirs) and bool(ours[0, 0, 0]) and not bool(ours[2, 0, 0])
    torch.testing.assert_close(mm.disjoint_merge(stacked, ours), merge_utils.disjoint_merge(stacked, theirs))
    with pytest.raises(ValueError, match="majority sign method"):
        mm.majority_sign_mask(stacked, "mean")


@pytest.mark.filterwarnings("ignore:The density")  # peft warns that density 1 prunes nothing
@pytest.mark.parametrize("density", [0.2, 0.6, 1.0])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_each_merge_matches_peft(density: float, method: Literal["total", "frequency"]) -> None:
    tasks = _tasks()
    weights = torch.tensor(WEIGHTS, dtype=torch.float64)
    torch.testing.assert_close(mm.task_arithmetic(tasks, WEIGHTS), merge_utils.task_arithmetic(tasks, weights))
    torch.testing.assert_close(mm.magnitude_prune_sum(tasks, WEIGHTS, density),
                               merge_utils.magnitude_prune(tasks, weights, density))
    torch.testing.assert_close(mm.ties(tasks, WEIGHTS, density, method),
                               merge_utils.ties(tasks, weights, density, method))
    generator = torch.Generator().manual_seed(5)
    masks = [mm.random_mask(t.shape, density, generator) if density < 1 else None for t in tasks]
    floats = [t.float() for t in tasks]  # peft draws its bernoulli mask in the tensor's dtype: float32 here
    torch.manual_seed(5)
    reference = merge_utils.dare_linear(floats, weights.float(), density)
    torch.testing.assert_close(mm.dare_linear(floats, WEIGHTS, density, masks), reference)
    torch.manual_seed(5)
    reference = merge_utils.dare_ties(floats, weights.float(), density, method)
    torch.testing.assert_close(mm.dare_ties(floats, WEIGHTS, density, masks, method), reference)


def test_mix_dispatches_and_checks() -> None:
    tasks = _tasks()
    torch.testing.assert_close(mm.mix("ties", tasks, WEIGHTS, 0.5), mm.ties(tasks, WEIGHTS, 0.5))
    torch.testing.assert_close(mm.mix("linear", tasks, [1.0, -1.0, 0.0]), tasks[0] - tasks[1])  # negation
    with pytest.raises(ValueError, match="unknown merge"):
        mm.mix("average", tasks, WEIGHTS)
    with pytest.raises(ValueError, match="one weight per tensor"):
        mm.mix("linear", tasks, WEIGHTS[:2])
