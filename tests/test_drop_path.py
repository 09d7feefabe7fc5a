"""DropPath is timm's layer: checked bitwise against stochastic depth written out here (Huang et al. 2016)."""

from __future__ import annotations

import pytest
import torch

from ipu_norm.layers.drop_path import DropPath


def _reference(x: torch.Tensor, p: float, scale_by_keep: bool) -> torch.Tensor:
    # One Bernoulli(1 - p) draw per example, from the same global generator state the layer starts from.
    keep = 1.0 - p
    mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype).bernoulli_(keep)
    return x * (mask / keep if scale_by_keep else mask)


@pytest.mark.parametrize("scale_by_keep", [True, False])
@pytest.mark.parametrize("shape", [(16, 3, 4, 4), (16, 5)])
def test_drop_path_bitwise_equal_to_written_formula(scale_by_keep: bool, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    layer = DropPath(0.3, scale_by_keep=scale_by_keep).train()
    torch.manual_seed(5)
    got = layer(x)
    torch.manual_seed(5)
    want = _reference(x, 0.3, scale_by_keep)
    assert torch.equal(got, want)
    dropped = (got.flatten(1) == 0).all(1)
    assert 0 < int(dropped.sum()) < shape[0]  # some examples dropped, some kept (seed 5)
    assert torch.equal(layer.eval()(x), x)  # identity at evaluation


def test_drop_path_rate_out_of_range_is_one_clear_line() -> None:
    with pytest.raises(ValueError, match=r"^DropPath: drop_prob must be in \[0, 1\), got 1.0$"):
        DropPath(1.0)
