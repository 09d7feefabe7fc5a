"""Model EMA (a thin subclass of timm's ModelEmaV3): checked against per-tensor formulas written here."""

import copy

import pytest
import torch
import torch.nn as nn

from ipu_norm.train.ema import ModelEma


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    model.train()
    x = torch.randn(4, 3, 6, 6, dtype=next(model.parameters()).dtype)
    loss = model(x).square().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("warmup", [True, False])
def test_update_matches_formula_params_averaged_buffers_copied(warmup):
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ModelEma(model, decay=0.9, warmup=warmup)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    param_names = {n for n, _ in model.named_parameters()}
    for step in range(6):
        _train_step(model, opt)
        used = ema.update(model, step)
        d = min(0.9, (1 + step) / (10 + step)) if warmup else 0.9
        assert used == pytest.approx(d)
        for k, v in model.state_dict().items():
            ref[k] = d * ref[k] + (1 - d) * v if k in param_names else v.clone()
    ema_sd = ema.module.state_dict()
    for k, v in ref.items():
        torch.testing.assert_close(ema_sd[k], v, rtol=1e-12, atol=1e-12, msg=k)
    # The BN running stats were copied, not averaged: identical to the live model's.
    assert torch.equal(ema_sd["1.running_mean"], model.state_dict()["1.running_mean"])
    assert int(ema_sd["1.num_batches_tracked"]) == 6
    # And the parameters really are averages, not copies.
    assert not torch.allclose(ema_sd["0.weight"], model.state_dict()["0.weight"])


def test_ema_buffers_option_averages_float_buffers():
    model = _model().double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ModelEma(model, decay=0.5, warmup=False, ema_buffers=True)
    ref_mean = model[1].running_mean.clone()
    for step in range(3):
        _train_step(model, opt)
        ema.update(model, step)
        ref_mean = 0.5 * ref_mean + 0.5 * model[1].running_mean
    torch.testing.assert_close(ema.module[1].running_mean, ref_mean, rtol=1e-12, atol=1e-12)
    assert int(ema.module[1].num_batches_tracked) == 3  # integer buffers are always copied


def test_warmup_decay_values():
    ema = ModelEma(nn.Linear(2, 2), decay=0.999)
    assert ema.get_decay(0) == pytest.approx(0.1)
    assert ema.get_decay(10) == pytest.approx(11 / 20)
    assert ema.get_decay(10**6) == pytest.approx(0.999)
    assert ModelEma(nn.Linear(2, 2), decay=0.999, warmup=False).get_decay(0) == 0.999


def test_copy_is_frozen_eval_and_independent():
    model = _model()
    ema = ModelEma(model, decay=0.9)
    assert not ema.module.training
    assert all(not p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema.module[0].weight, model[0].weight)
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_state_dict_roundtrip_and_resume_is_exact():
    torch.manual_seed(1)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = ModelEma(model, decay=0.95)
    for step in range(3):
        _train_step(model, opt)
        ema.update(model, step)
    saved_model, saved_ema = copy.deepcopy(model.state_dict()), copy.deepcopy(ema.module.state_dict())
    for step in range(3, 6):
        ema.update(model, step)
    model2 = _model()
    model2.load_state_dict(saved_model)
    ema2 = ModelEma(_model(), decay=0.95)
    ema2.module.load_state_dict(saved_ema)
    for step in range(3, 6):
        ema2.update(model2, step)
    for k, v in ema.module.state_dict().items():
        assert torch.equal(v, ema2.module.state_dict()[k]), k


def test_unwraps_data_parallel_and_calls_the_averaged_model_in_eval_mode():
    torch.manual_seed(0)
    model = _model()
    ema = ModelEma(nn.DataParallel(model), decay=0.9, warmup=False)
    assert isinstance(ema.module, nn.Sequential)
    start = copy.deepcopy(model.state_dict())
    _train_step(model, torch.optim.SGD(model.parameters(), lr=0.5))
    ema.update(nn.DataParallel(model), 0)
    # Independent reference: a fresh model holding 0.9 * start + 0.1 * trained weights, the trained model's BN
    # statistics, evaluated in eval mode.
    reference = _model()
    params = {n for n, _ in model.named_parameters()}
    reference.load_state_dict(
        {k: 0.9 * start[k] + 0.1 * v if k in params else v for k, v in model.state_dict().items()}
    )
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(ema(x), reference.eval()(x), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(ema(x), model.eval()(x), rtol=1e-3, atol=1e-3)  # it is the average, not the live model


def test_bitwise_equal_to_per_tensor_lerp():
    # The update before timm: ``e.lerp_(p, 1 - d)`` per floating-point parameter, buffers copied; the subclass of
    # timm's ModelEmaV3 must give the same bits.
    torch.manual_seed(3)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEma(model, decay=0.97)
    ref = copy.deepcopy(model)
    params = dict(ref.named_parameters())
    bufs = dict(ref.named_buffers())
    for step in range(5):
        _train_step(model, opt)
        ema.update(model, step)
        with torch.no_grad():
            d = min(0.97, (1.0 + step) / (10.0 + step))
            for name, p in model.named_parameters():
                params[name].lerp_(p, 1.0 - d)
            for name, b in model.named_buffers():
                bufs[name].copy_(b)
    for k, v in ref.state_dict().items():
        assert torch.equal(ema.module.state_dict()[k], v), k
