import pytest
import torch

from embcompress.errors import InputError
from embcompress.rank import (
    achieved_reduction,
    break_even_rank,
    check_rank,
    choose_rank,
    rank_for_energy,
    rank_for_reduction,
)


def test_eq5_on_minilm_shape() -> None:
    assert rank_for_reduction(30522, 384, 0.9) == 37
    assert rank_for_reduction(30522, 384, 0.5) == 189


def test_rank_never_exceeds_the_kept_fraction() -> None:
    for V, d in [(1000, 50), (30522, 384), (250002, 768), (17, 3)]:
        for r in (0.1, 0.3, 0.5, 0.7, 0.9, 0.99):
            k = rank_for_reduction(V, d, r)
            assert k * (V + d) <= (1 - r) * V * d + 1e-6
            assert (k + 1) * (V + d) > (1 - r) * V * d - 1e-6
            if k >= 1:
                assert achieved_reduction(V, d, k) >= r - 1e-9


@pytest.mark.parametrize("r", [0.0, 1.0, -0.1, 1.5])
def test_reduction_outside_open_interval_is_refused(r: float) -> None:
    with pytest.raises(InputError, match="between 0 and 1"):
        rank_for_reduction(100, 10, r)


def test_k_below_one_and_break_even() -> None:
    with pytest.raises(InputError, match="below 1"):
        choose_rank(20, 4, reduction=0.99)
    be = break_even_rank(100, 10)
    with pytest.raises(InputError, match="break-even"):
        check_rank(100, 10, int(be) + 1)
    assert check_rank(100, 10, 10, force=True) == 10
    with pytest.raises(InputError, match="exceeds"):
        check_rank(100, 10, 11, force=True)


def test_energy_rank() -> None:
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 0.9) == 2
    assert rank_for_energy(s, 1.0) == 3
    with pytest.raises(InputError):
        rank_for_energy(s, 0.0)


def test_exactly_one_rule() -> None:
    with pytest.raises(InputError, match="exactly one"):
        choose_rank(100, 10, reduction=0.5, rank=3)
