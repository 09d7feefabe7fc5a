"""RMSpropTF: TensorFlow's RMSprop (PopTorch's use_tf_variant=True) against float64 references written here."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TinyNet
from torch import nn

from ipu_norm.config import load_config
from ipu_norm.optim.rmsprop_tf import RMSpropTF
from ipu_norm.train.builders import build_optimizer


def tf_rmsprop_reference(
    w0: list[float], grads: list[list[float]], lrs: list[float], *, rho: float, eps: float, momentum: float, wd: float
) -> list[float]:
    """TF1 ApplyRMSProp in plain Python floats (float64), with L2 weight decay added to the gradient as PopART does.

    ms <- rho*ms + (1-rho)*g^2 (ms starts at 1); mom <- momentum*mom + lr*g/sqrt(ms+eps); var <- var - mom.
    """
    w = list(w0)
    ms = [1.0] * len(w)
    mom = [0.0] * len(w)
    for g_raw, lr in zip(grads, lrs):
        for i in range(len(w)):
            g = g_raw[i] + wd * w[i]
            ms[i] = rho * ms[i] + (1.0 - rho) * g * g
            step = lr * g / math.sqrt(ms[i] + eps)
            if momentum > 0:
                mom[i] = momentum * mom[i] + step
                w[i] -= mom[i]
            else:
                w[i] -= step
    return w


@pytest.mark.parametrize(("momentum", "wd"), [(0.9, 1e-2), (0.0, 0.0), (0.9, 0.0), (0.0, 1e-3)])
def test_matches_tensorflow_formula(momentum: float, wd: float) -> None:
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(7, generator=gen, dtype=torch.float64)
    grads = [torch.randn(7, generator=gen, dtype=torch.float64) * 0.1 for _ in range(6)]
    lrs = [0.05, 0.05, 0.02, 0.02, 0.01, 0.03]  # the lr changes between steps: it must enter the momentum buffer
    p = nn.Parameter(w0.clone())
    opt = RMSpropTF([p], lr=lrs[0], alpha=0.953125, eps=1e-3, momentum=momentum, weight_decay=wd)
    for g, lr in zip(grads, lrs):
        opt.param_groups[0]["lr"] = lr
        p.grad = g.clone()
        opt.step()
    ref = tf_rmsprop_reference(
        w0.tolist(), [g.tolist() for g in grads], lrs, rho=0.953125, eps=1e-3, momentum=momentum, wd=wd
    )
    assert torch.allclose(p.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-14)


def test_differs_from_pytorch_rmsprop() -> None:
    """The three TF differences are visible: same hyper-parameters, different weights after a few steps."""
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(5)), None
    b = nn.Parameter(a.detach().clone())
    opt_tf = RMSpropTF([a], lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    opt_pt = torch.optim.RMSprop([b], lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9)
    for _ in range(3):
        g = torch.randn(5)
        a.grad, b.grad = g.clone(), g.clone()
        opt_tf.step()
        opt_pt.step()
    assert not torch.allclose(a, b, atol=1e-4)


def test_matches_timm_rmsprop_tf() -> None:
    """timm's RMSpropTF (lr_in_momentum, coupled decay: its defaults) is a second, independent implementation."""
    timm_optim = pytest.importorskip("timm.optim")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    twin = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    twin.load_state_dict(model.state_dict())
    kw = dict(lr=0.02, alpha=0.953125, eps=1e-3, momentum=0.9, weight_decay=1e-3)
    ours = RMSpropTF(model.parameters(), **kw)
    theirs = timm_optim.RMSpropTF(twin.parameters(), **kw)
    for _ in range(5):
        x = torch.randn(8, 4, dtype=torch.float64)
        for m, opt in ((model, ours), (twin, theirs)):
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


def test_state_dict_resume_continues_the_same_trajectory() -> None:
    torch.manual_seed(2)
    p = nn.Parameter(torch.randn(4, dtype=torch.float64))
    q = nn.Parameter(p.detach().clone())
    grads = [torch.randn(4, dtype=torch.float64) for _ in range(4)]
    opt = RMSpropTF([p], lr=0.1, eps=1e-3, momentum=0.9)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    first = RMSpropTF([q], lr=0.1, eps=1e-3, momentum=0.9)
    for g in grads[:2]:
        q.grad = g.clone()
        first.step()
    resumed = RMSpropTF([q], lr=0.1, eps=1e-3, momentum=0.9)
    resumed.load_state_dict(first.state_dict())
    for g in grads[2:]:
        q.grad = g.clone()
        resumed.step()
    assert torch.equal(p, q)


def test_bad_hyperparameters_name_the_culprit() -> None:
    with pytest.raises(ValueError, match="invalid eps"):
        RMSpropTF([nn.Parameter(torch.zeros(1))], eps=0.0)


def test_config_builds_rmsprop_tf_and_maps_to_poptorch() -> None:
    from ipu_norm.core.plan import build_plan
    from ipu_norm.ipu import poptorch_adapter as pa
    from ipu_norm.ipu.backend import _optimizer_name_and_hparams

    cfg = load_config(
        None,
        flags={"optim.name": "rmsprop_tf", "optim.alpha": 0.953125, "optim.eps": 1e-3, "optim.momentum": 0.9,
               "optim.weight_decay": 1e-5, "optim.lr": 0.016},
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(1, 4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.zeros(1, 3, 5, 5))
    opt = build_optimizer(cfg.optim, model, global_batch_size=768)
    assert isinstance(opt, RMSpropTF)
    assert opt.defaults["alpha"] == 0.953125 and opt.defaults["eps"] == 1e-3 and opt.defaults["momentum"] == 0.9
    assert opt.param_groups[0]["weight_decay"] == 1e-5 and opt.param_groups[1]["weight_decay"] == 0.0
    name, hp = _optimizer_name_and_hparams(opt)
    assert name == "rmsprop_tf"
    plan = build_plan({"device": "ipu", "precision": "16.32"}, TinyNet(), {"micro_batch_size": 2})
    cls, kw = pa.optimizer_spec(name, hp, plan)
    assert cls == "RMSprop" and kw["use_tf_variant"] is True
    assert (kw["alpha"], kw["eps"], kw["momentum"]) == (0.953125, 1e-3, 0.9)
    # Plain rmsprop keeps PyTorch's variant on the IPU too.
    assert "use_tf_variant" not in pa.optimizer_spec("rmsprop", hp, plan)[1]
