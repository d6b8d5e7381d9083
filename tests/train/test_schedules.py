"""CLR and CALR against direct transcriptions of Smith's triangle and of the paper's Algorithm 1; resume; factory."""

from __future__ import annotations

import math

import pytest
import torch

from embcompress.errors import InputError
from embcompress.train.schedules import CALR, CLR, ConstantLR, make_schedule


def algorithm_1(lr_lb: float, lr_ub: float, step_size: int, decay: float, steps_per_epoch: int, epochs: int) -> list:
    """Acharya et al. (2019), Algorithm 1 (CALR), written out line by line: the rate of every iteration."""
    initial_ub = lr_ub
    iteration = 0
    rates = []
    for _epoch in range(epochs):
        for _batch in range(steps_per_epoch):
            cycle = math.floor(1 + iteration / (2 * step_size))
            x = abs(iteration / step_size - 2 * cycle + 1)
            rates.append(lr_lb + (lr_ub - lr_lb) * max(0, 1 - x))
            iteration += 1
        lr_ub = lr_ub * math.exp(decay)
        if lr_ub <= lr_lb:
            lr_ub = initial_ub
    return rates


def optimizer(lr: float = 0.5, groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=lr)


def run(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[float]:
    """The rate each of ``steps`` iterations trains with (read before the step, as the training loop does)."""
    rates = []
    for _ in range(steps):
        rates.append(scheduler.optimizer.param_groups[0]["lr"])
        scheduler.optimizer.step()
        scheduler.step()
    return rates


@pytest.mark.parametrize(
    ("lb", "ub", "step_size", "decay", "spe", "epochs"),
    [
        (0.01, 0.1, 3, -0.7, 10, 9),  # the bound falls below lb after epoch 4: reset, and again after epoch 8
        (1e-4, 1e-3, 5, math.log(0.5), 10, 7),  # the module's defaults: lb = ub/10, half-epoch steps, halving
        (0.2, 1.0, 7, -0.05, 4, 6),  # slow decay, a cycle longer than an epoch
    ],
)
def test_calr_matches_algorithm_1(lb: float, ub: float, step_size: int, decay: float, spe: int, epochs: int) -> None:
    expected = algorithm_1(lb, ub, step_size, decay, spe, epochs)
    got = run(CALR(optimizer(), lb, ub, step_size, decay, spe), spe * epochs)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_calr_resets_the_upper_bound() -> None:
    sched = CALR(optimizer(), 0.01, 0.1, 5, -0.7, 10)
    peaks = []
    for _ in range(6):
        peaks.append(max(run(sched, 10)))
    assert peaks[0] == pytest.approx(0.1)
    assert peaks[1] < peaks[0] and peaks[2] < peaks[1] and peaks[3] < peaks[2]
    assert peaks[4] == pytest.approx(0.1)  # 0.1 * exp(-2.8) < 0.01 after epoch 4: back to the initial bound
    assert peaks[5] == pytest.approx(0.1 * math.exp(-0.7))
    # after 60 steps the next iteration is epoch 7's first: two decays past the reset
    assert sched.lr_ub_current == pytest.approx(0.1 * math.exp(-0.7) ** 2)


def test_clr_triangle() -> None:
    rates = run(CLR(optimizer(), 0.1, 0.5, 4), 17)
    assert rates[0] == pytest.approx(0.1)
    assert rates[2] == pytest.approx(0.3)
    assert rates[4] == pytest.approx(0.5)
    assert rates[8] == pytest.approx(0.1)
    assert rates[12] == pytest.approx(0.5)
    assert rates == pytest.approx(algorithm_1(0.1, 0.5, 4, -1e-300, 17, 1))


def test_every_param_group_gets_the_rate() -> None:
    sched = CALR(optimizer(groups=3), 0.1, 1.0, 2, -0.5, 3)
    run(sched, 5)
    assert len({g["lr"] for g in sched.optimizer.param_groups}) == 1


@pytest.mark.parametrize("name", ["calr", "clr", "constant", "warmup-cosine"])
def test_state_dict_round_trip_resumes_exactly(name: str) -> None:
    straight = run(make_schedule(name, optimizer(), steps_per_epoch=6, lr_lb=0.05, decay=-0.9), 40)
    first = make_schedule(name, optimizer(), steps_per_epoch=6, lr_lb=0.05, decay=-0.9)
    head = run(first, 17)
    opt = optimizer()
    second = make_schedule(name, opt, steps_per_epoch=6, lr_lb=0.05, decay=-0.9)
    opt.load_state_dict(first.optimizer.state_dict())
    second.load_state_dict(first.state_dict())
    assert head + run(second, 23) == straight


def test_make_schedule_defaults() -> None:
    sched = make_schedule("calr", optimizer(lr=2e-3), steps_per_epoch=11)
    assert isinstance(sched, CALR)
    assert sched.lr_ub == pytest.approx(2e-3) and sched.lr_lb == pytest.approx(2e-4)
    assert sched.step_size == 5 and sched.decay == pytest.approx(math.log(0.5))
    assert make_schedule("clr", optimizer(), steps_per_epoch=1).step_size == 1
    constant = make_schedule("constant", optimizer(lr=0.3), steps_per_epoch=5)
    assert isinstance(constant, ConstantLR)
    assert run(constant, 12) == [0.3] * 12
    with pytest.raises(InputError):
        make_schedule("cosine", optimizer(), steps_per_epoch=5)


@pytest.mark.parametrize(
    "args",
    [
        (0.0, 1.0, 2, -0.5, 4),
        (-0.1, 1.0, 2, -0.5, 4),
        (0.5, 0.5, 2, -0.5, 4),
        (0.5, 0.4, 2, -0.5, 4),
        (0.1, 1.0, 0, -0.5, 4),
        (0.1, 1.0, 2, 0.0, 4),
        (0.1, 1.0, 2, 0.3, 4),
        (0.1, 1.0, 2, -0.5, 0),
    ],
)
def test_calr_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(InputError):
        CALR(optimizer(), *args)


def test_clr_rejects_bad_arguments() -> None:
    for args in [(0.0, 1.0, 2), (0.5, 0.5, 2), (0.1, 1.0, 0)]:
        with pytest.raises(InputError):
            CLR(optimizer(), *args)
