"""ipu_norm.compat: each newer-torch API and its torch 2.0.1 equivalent give the same answer (the suite runs in both
environments; here the 2.0.1 branch is also forced in the newer one)."""

import warnings

import pytest
import torch
from torch import nn

from ipu_norm import compat


def test_is_compiling_false_in_eager() -> None:
    assert compat.is_compiling() is False


def test_flop_counter_matches_hand_count_and_both_branches() -> None:
    # conv: 2 x (out elements) x (c_in/groups x kh x kw); linear: 2 x batch x in x out.
    conv, fc = nn.Conv2d(3, 8, 3, padding=1, groups=1), nn.Linear(8, 5)
    x = torch.randn(2, 3, 6, 6)
    expected = 2 * (2 * 8 * 6 * 6) * (3 * 3 * 3) + 2 * 2 * 8 * 5
    fallback = compat._make_dispatch_flop_counter()()
    counter = compat.flop_counter_mode()
    with torch.no_grad():
        for c in (counter, fallback):
            with c:
                fc(conv(x).mean((2, 3)))
    assert counter.get_total_flops() == fallback.get_total_flops() == expected
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    fallback = compat._make_dispatch_flop_counter()()
    with torch.no_grad(), fallback:
        depthwise(torch.randn(1, 8, 4, 4))
    assert fallback.get_total_flops() == 2 * (8 * 4 * 4) * 9


def test_total_norm_matches_closed_form() -> None:
    ts = [torch.tensor([3.0, -4.0]), torch.tensor([[12.0]])]
    assert float(compat.total_norm(ts)) == pytest.approx(13.0)
    assert float(compat.total_norm(ts, float("inf"))) == 12.0


def test_mark_optimizer_stepped_silences_the_scheduler_order_warning() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1)
    compat.mark_optimizer_stepped(opt)  # the step ran on the device
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)
