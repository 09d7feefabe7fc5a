"""LR schedules: closed forms and agreement with torch's own schedulers (independent implementations)."""

import math
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LambdaLR, LinearLR, StepLR

from ipu_norm.optim.schedulers import build_lr_lambda

BASE_LR = 0.4


def _lrs(scheduler_factory, steps: int) -> list[float]:
    """Learning rates seen by the optimizer at steps 0..steps-1 (one scheduler.step() per optimizer step)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=BASE_LR)
    sched = scheduler_factory(opt)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_is_linear_from_start_factor():
    f = build_lr_lambda("constant", total_steps=100, warmup_steps=8, warmup_start_factor=0.25)
    for s in range(8):
        assert f(s) == pytest.approx(0.25 + 0.75 * s / 8)
    assert f(8) == 1.0 and f(50) == 1.0
    # Same values as torch's LinearLR warmup.
    ours = _lrs(lambda o: LambdaLR(o, f), 12)
    ref = _lrs(lambda o: LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=8), 12)
    assert ours == pytest.approx(ref, rel=1e-12)


def test_cosine_closed_form_with_warmup():
    total, warm, mn = 50, 10, 0.05
    f = build_lr_lambda("cosine", total_steps=total, warmup_steps=warm, min_factor=mn)
    assert f(0) == 0.0
    assert f(5) == pytest.approx(0.5)
    assert f(warm) == pytest.approx(1.0)
    assert f(warm + (total - warm) // 2) == pytest.approx(mn + (1 - mn) * 0.5)  # cos(pi/2) = 0
    assert f(total) == pytest.approx(mn)
    assert f(total + 100) == pytest.approx(mn)  # stays at the floor past the end
    values = [f(s) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_cosine_matches_torch_cosine_annealing():
    total, mn = 40, 0.1
    f = build_lr_lambda("cosine", total_steps=total, min_factor=mn)
    ours = _lrs(lambda o: LambdaLR(o, f), total + 1)
    ref = _lrs(lambda o: CosineAnnealingLR(o, T_max=total, eta_min=mn * BASE_LR), total + 1)
    assert ours == pytest.approx(ref, rel=1e-9, abs=1e-12)


def test_exponential_matches_torch_exponential_lr():
    f = build_lr_lambda("exponential", total_steps=30, decay_rate=0.9)
    ours = _lrs(lambda o: LambdaLR(o, f), 30)
    ref = _lrs(lambda o: ExponentialLR(o, gamma=0.9), 30)
    assert ours == pytest.approx(ref, rel=1e-9)


def test_exponential_smooth_with_period_warmup_and_floor():
    f = build_lr_lambda("exponential", total_steps=1000, warmup_steps=5, decay_rate=0.97, decay_every_steps=2.5,
                        min_factor=0.5)
    assert f(5) == 1.0
    assert f(5 + 1) == pytest.approx(0.97 ** (1 / 2.5))
    assert f(5 + 25) == pytest.approx(0.97**10)
    # 0.97 ** (t / 2.5) < 0.5 once t > 2.5 * ln(0.5) / ln(0.97) ~ 56.9
    assert f(5 + 56) > 0.5 and f(5 + 58) == 0.5


def test_step_schedule_matches_torch_step_lr():
    f = build_lr_lambda("step", total_steps=50, decay_rate=0.5, decay_every_steps=7)
    ours = _lrs(lambda o: LambdaLR(o, f), 50)
    ref = _lrs(lambda o: StepLR(o, step_size=7, gamma=0.5), 50)
    assert ours == pytest.approx(ref, rel=1e-12)


def test_step_fractional_period_is_a_staircase():
    f = build_lr_lambda("step", total_steps=100, warmup_steps=2, decay_rate=0.97, decay_every_steps=2.4)
    # t = step - 2; factor = 0.97 ** floor(t / 2.4)
    for step in range(2, 40):
        assert f(step) == pytest.approx(0.97 ** math.floor((step - 2) / 2.4))


def test_lambda_is_picklable_and_scheduler_state_roundtrips():
    f = build_lr_lambda("cosine", total_steps=20, warmup_steps=3)
    g = pickle.loads(pickle.dumps(f))
    assert [f(s) for s in range(25)] == [g(s) for s in range(25)]

    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = LambdaLR(opt, f)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = LambdaLR(opt2, build_lr_lambda("cosine", total_steps=20, warmup_steps=3))
    opt2.load_state_dict(opt.state_dict())
    sched2.load_state_dict(state)
    for _ in range(5):
        opt.step()
        sched.step()
        opt2.step()
        sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "linear", "total_steps": 10},
        {"name": "cosine", "total_steps": 5, "warmup_steps": 5},
        {"name": "step", "total_steps": 10},
        {"name": "exponential", "total_steps": 10, "decay_every_steps": 0},
        {"name": "constant", "total_steps": 10, "warmup_steps": -1},
    ],
)
def test_invalid_arguments_raise(kwargs):
    with pytest.raises(ValueError):
        build_lr_lambda(**kwargs)
