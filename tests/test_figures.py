"""The pictures say what they show: the memory headline (BN at its micro-batch vs GN+PN at micro-batch 2 with
accumulation, per-IPU fit), the signal-propagation panels (labelled axes, one legend, zeros marked rather than
floored), and GMACs named as such in the model table."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")

from ipu_norm.experiments.signal_prop import ZERO  # noqa: E402
from ipu_norm.experiments.signal_prop import figure as signal_figure  # noqa: E402
from ipu_norm.memory.compare import figure as memory_figure  # noqa: E402
from ipu_norm.memory.compare import measure_norm  # noqa: E402
from ipu_norm.memory.estimate import IPUPlan  # noqa: E402
from ipu_norm.models.__main__ import format_table, model_rows  # noqa: E402


def test_model_table_says_gmacs() -> None:
    table = format_table(model_rows("resnet50"))
    assert "GMACs" in table.splitlines()[0] and "FLOP" not in table


def _rows(values: list[float]) -> list[dict]:
    return [{"block": i, "stream_sq_mean": v, "stream_var": 1.0 + i, "branch_sq_mean": v, "branch_var": 0.5,
             "transition": i == 2} for i, v in enumerate(values)]


def test_signal_prop_panels_are_labelled_and_zeros_are_not_floored() -> None:
    result = {"arch": "resnet50", "batch": 2, "resolution": 32, "nf_law": None,
              "models": {"bn": _rows([1e-16, 0.5, 0.0, 0.7]), "gn+pn": _rows([1.0, 1.2, 1.1, 1.3])}}
    fig = signal_figure(result)
    panels = fig.axes[:4]
    assert all(ax.get_ylabel() and ax.get_xlabel() for ax in panels)
    assert len(fig.legends) == 1
    legend_texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend_texts[:2] == ["bn", "gn+pn"] and any("zero" in t for t in legend_texts)
    for ax in (panels[0], panels[2]):
        data_lines = [ln for ln in ax.get_lines() if ln.get_label() in result["models"]]
        ys = [y for ln in data_lines for y in ln.get_ydata() if not math.isnan(y)]
        assert min(ys) > ZERO  # nothing drawn at a floor value
        markers = [ln for ln in ax.get_lines() if ln.get_marker() == "v"]
        assert [list(m.get_xdata()) for m in markers] == [[0, 2]]  # BN's two zeros, on the bottom edge


def test_memory_figure_shows_the_headline() -> None:
    kw = {"optimizer": "sgd_momentum", "fit_sizes": (1, 2), "verify_sizes": (), "peak_mb": 0}
    norms = ["bn", "gn+pn"]
    results = {"resnet18": [measure_norm("resnet18", n, 64, **kw) for n in norms]}
    bn, pn = results["resnet18"]
    base = IPUPlan(micro_batch_size=1, precision="16.32", optimizer="sgd_momentum")
    fig = memory_figure(results, norms, [1, 2, 4, 8, 16, 32], base, ipus=(1, 2))
    ax_bar, ax_fit, ax_mb = fig.axes
    assert "BN at micro-batch 32 vs batch-independent norms at 2 x 16" in ax_bar.get_title()
    labels = [t.get_text() for t in ax_bar.get_legend().get_texts()]
    assert labels == ["one IPU: 900 MB", "BN at micro-batch 32", "GN+PN at micro-batch 2 x 16 accumulation"]
    notes = [t.get_text() for t in ax_bar.texts]
    ratio = bn.train_bytes(32) / pn.train_bytes(2)
    assert f"1/{ratio:.1f} of BN" in "\n".join(notes)
    assert ax_fit.get_xlabel().startswith("IPUs") and any(abs(ln.get_ydata()[0] - 900) < 1e-9
                                                           for ln in ax_fit.get_lines() if len(ln.get_ydata()))
    assert f"{ratio:.1f}x less" in "\n".join(t.get_text() for t in ax_mb.texts)
