"""Benchmark harness: timing mechanics, FLOP counting, clip factories and the CLI on tiny models."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from torch import nn

from ipu_norm.bench import cases, harness, run
from ipu_norm.bench.cases import Group
from ipu_norm.bench.harness import TrainStep, Variant, forward_flops, time_interleaved


class TinyNet(nn.Module):
    """conv 3->8 (3x3, pad 1) -> ReLU -> global pool -> Linear 8->5, with a get_classifier()."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.fc = nn.Linear(8, 5)

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def test_forward_flops_matches_hand_count() -> None:
    # conv: 8x8 outputs x 8 channels x (3 x 3 x 3) MACs; linear: 8 x 5 MACs; FLOPs = 2 x MACs.
    expected = 2 * (8 * 8 * 8 * 27 + 8 * 5)
    flops, source = forward_flops(TinyNet(), 8)
    assert flops == expected
    assert "ipu_norm.models.flops" in source


def test_train_step_times_and_clip_called() -> None:
    calls = []
    model = TinyNet()
    step = TrainStep(model, lambda: calls.append(1), batch=2, resolution=8, num_classes=5,
                     device=torch.device("cpu"))
    before = model.conv.weight.detach().clone()
    total, fwd_bwd, clip, opt = step()
    assert len(calls) == 1
    assert total >= fwd_bwd + clip + opt - 1e-6 and min(total, fwd_bwd, clip, opt) >= 0
    assert not torch.equal(before, model.conv.weight)  # the optimizer stepped


def test_time_interleaved_alternates_and_collects() -> None:
    log: list[str] = []

    def fake(name: str):  # noqa: ANN202
        def step() -> tuple[float, float, float, float]:
            log.append(name)
            return 1.0, 0.5, 0.1, 0.4

        return step

    res = time_interleaved([fake("a"), fake("b")], timed_steps=3, warmup=2)
    assert log[:4] == ["a", "a", "b", "b"]  # warm-up per variant first
    assert log[4:] == ["a", "b", "b", "a", "a", "b"]  # then round-robin, order reversed every other round
    assert [len(r.step) for r in res] == [3, 3]
    assert res[0].median() == 1.0 and res[0].median("clip") == 0.1


def test_gemm_peak_positive() -> None:
    assert harness.gemm_peak_flops(torch.device("cpu"), 64, reps=2) > 0


def _grads_after(clip_factory, seed: int = 0) -> list[torch.Tensor]:  # noqa: ANN001
    torch.manual_seed(seed)
    model = TinyNet()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    (nn.functional.cross_entropy(model(x), y) * 100).backward()  # large grads so clipping is active
    clip_factory(model)()
    return [p.grad.clone() for p in model.parameters()]


def test_agc_factories_agree_and_skip_classifier() -> None:
    # timm's adaptive_clip_grad and ipu_norm's AGC implement the same formula: same clipped gradients.
    ref = _grads_after(lambda m: (lambda: None))
    ours = _grads_after(cases.ipu_norm_agc(0.01))
    theirs = _grads_after(cases.timm_agc(0.01))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(ours[0], ref[0])  # the conv gradient was clipped
    torch.testing.assert_close(ours[1], ref[1])  # classifier weight untouched
    torch.testing.assert_close(ours[2], ref[2])  # classifier bias untouched


def test_agc_step_overhead_pairs_rounds() -> None:
    # Round r of the two rows was stepped back to back: the paired figure is the median of per-round differences
    # (here a constant 10 ms, while the unpaired medians' difference also carries the drift between rounds).
    with_agc = {"step_ms": 120.0, "fwd_bwd_ms": 80.0, "steps_raw_ms": [110.0, 120.0, 200.0],
                "fwd_bwd_raw_ms": [70.0, 80.0, 150.0]}
    without = {"step_ms": 100.0, "fwd_bwd_ms": 79.0, "steps_raw_ms": [100.0, 110.0, 190.0],
               "fwd_bwd_raw_ms": [69.0, 79.0, 149.0]}
    out = run.agc_step_overhead(with_agc, without)
    assert out["overhead_ms"] == 20.0 and out["paired_overhead_ms"] == 10.0
    assert out["overhead_share"] == pytest.approx(20 / 120) and out["paired_overhead_share"] == pytest.approx(10 / 120)
    assert out["fwd_bwd_overhead_ms"] == 1.0 and out["fwd_bwd_paired_overhead_ms"] == 1.0


def test_paired_ratio_is_the_median_of_within_round_ratios() -> None:
    # Row a is 5% slower than b in every round while the machine slows whole rounds down by up to 40%.
    phase = [1.0, 1.4, 1.0, 1.2, 1.4]
    b = {"steps_raw_ms": [100.0 * f for f in phase]}
    assert run.paired_ratio({"steps_raw_ms": [105.0 * f for f in phase]}, b) == pytest.approx(1.05)
    # Per-round ratios 1.0, 2.0, 0.75: median 1.0, where the ratio of the medians (200 / 100) would be 2.0.
    assert run.paired_ratio({"steps_raw_ms": [100.0, 200.0, 300.0]}, {"steps_raw_ms": [100.0, 100.0, 400.0]}) == 1.0


def test_build_groups_selection() -> None:
    names = [g.name for g in cases.build_groups()]
    assert tuple(names) == cases.GROUP_NAMES
    assert [g.name for g in cases.build_groups(names=["resnet50_gn"])] == ["resnet50_gn"]
    with pytest.raises(ValueError, match="unknown benchmark group"):
        cases.build_groups(names=["nope"])


def test_timm_gn_peer_uses_ipu_norm_gn_settings() -> None:
    # The timm GN peer must use ipu_norm's 'gn' groups and eps, else the ratio compares different norms.
    group = cases.build_groups(names=["resnet50_gn"])[0]
    peer = next(v for v in group.variants if v.source == "timm")
    with torch.device("meta"):
        model = peer.build()
    gns = [m for m in model.modules() if isinstance(m, nn.GroupNorm)]
    assert gns and all(m.num_groups == 4 and m.eps == 1e-3 for m in gns)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_cli_end_to_end_with_tiny_group(monkeypatch, tmp_path, capsys) -> None:  # noqa: ANN001
    from ipu_norm.models import create_model

    def tiny_resnet(norm: str) -> nn.Module:
        from ipu_norm.models.resnet import BasicBlock, ResNet

        return ResNet(BasicBlock, (1, 1), widths=(8, 16), stem_width=8, norm=norm, num_classes=10)

    group = Group(
        "tiny",
        [
            Variant("a gn+pn", "ipu_norm", functools.partial(tiny_resnet, "gn+pn"), clip=cases.ipu_norm_agc()),
            Variant("a gn", "ipu_norm", functools.partial(tiny_resnet, "gn")),
            Variant("b timm", "timm", functools.partial(tiny_resnet, "gn"), clip=cases.timm_agc()),
            Variant("broken", "ipu_norm", functools.partial(create_model, "no_such_model")),
        ],
        ratios=[("a gn", "b timm", "a vs b", ">=1.0")],
        pn_pair=("a gn+pn", "a gn"),
        agc_pair=("a gn+pn", "a gn"),
    )
    monkeypatch.setattr(run, "build_groups", lambda num_classes, names: [group])
    out = tmp_path / "bench.json"
    result = run.main(["--batch", "2", "--resolution", "16", "20", "--steps", "2", "--warmup", "1",
                       "--num-classes", "10", "--threads", "1", "--modes", "eager",
                       "--gemm-size", "64", "--json", str(out)])
    text = capsys.readouterr().out
    rows = {r["variant"]: r for r in result["groups"][0]["rows"]}
    assert "skipped" in rows["broken"] and "no_such_model" in rows["broken"]["skipped"]
    assert rows["a gn"]["img_per_s"] == pytest.approx(2 / (rows["a gn"]["step_ms"] / 1e3))
    summary = result["groups"][0]["summary"]
    assert summary["ratios"][0]["ratio"] == pytest.approx(rows["a gn"]["img_per_s"] / rows["b timm"]["img_per_s"])
    assert summary["pn_overhead"]["overhead"] == pytest.approx(rows["a gn+pn"]["step_ms"] / rows["a gn"]["step_ms"] - 1)
    assert summary["agc"]["share_of_step"] == pytest.approx(rows["a gn+pn"]["clip_ms"] / rows["a gn+pn"]["step_ms"])
    agc = summary["agc"]
    assert agc["overhead_ms"] == pytest.approx(rows["a gn+pn"]["step_ms"] - rows["a gn"]["step_ms"])
    assert agc["overhead_share"] == pytest.approx(agc["overhead_ms"] / rows["a gn+pn"]["step_ms"])
    assert "PN overhead" in text and "AGC clip call share" in text and "skipped" in text
    assert "AGC overhead from step difference" in text
    # Each --resolution is a group run of its own, labelled with its size.
    assert [g["resolution"] for g in result["runs"][0]["groups"]] == [16, 20]
    assert "| tiny @ 16 px | a gn |" in text and "| tiny @ 20 px | a gn |" in text
    saved = json.loads(out.read_text())
    assert saved["groups"][0]["rows"][0]["variant"] == "a gn+pn" and saved["gemm_peak_flops"] > 0
