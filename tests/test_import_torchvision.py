"""torchvision -> ipu_norm weight import: identical logits on random weights and random BN statistics."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from ipu_norm.models import create_model
from ipu_norm.models.import_torchvision import WeightImportError, load_torchvision_weights, map_state_dict


def _randomise_bn(model: nn.Module) -> None:
    # Default BN (gain 1, shift 0, mean 0, var 1) is nearly the identity: randomise everything so that a
    # wrong pairing of BN layers, or a wrong eps, shows up in the logits.
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.data = 0.5 + torch.rand(c, generator=g)
            m.bias.data = 0.2 * torch.randn(c, generator=g)
            m.running_mean.data = 0.2 * torch.randn(c, generator=g)
            m.running_var.data = 0.5 + torch.rand(c, generator=g)


@pytest.mark.parametrize(
    "name,size", [("resnet18", 64), ("resnet50", 64), ("efficientnet_b0", 64)]
)
def test_logits_match_torchvision(name: str, size: int) -> None:
    tv = getattr(torchvision.models, name)(weights=None).eval()
    _randomise_bn(tv)
    ours = create_model(name, norm="bn").eval()
    pairs = load_torchvision_weights(ours, tv)
    assert len(pairs) == len(tv.state_dict())
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref, out = tv(x), ours(x)
    assert ref.abs().max() > 1e-2  # the comparison is not between two near-zero outputs
    assert (ref - out).abs().max().item() <= 1e-4


def test_state_dict_source_and_bn_stats_copied() -> None:
    tv = torchvision.models.resnet18(weights=None).eval()
    _randomise_bn(tv)
    ours = create_model("resnet18", norm="bn").eval()
    load_torchvision_weights(ours, tv.state_dict())
    assert torch.equal(ours.stem.norm.running_var, tv.bn1.running_var)
    assert torch.equal(ours.blocks[2].downsample.conv.weight, tv.layer2[0].downsample[0].weight)
    assert torch.equal(ours.get_classifier().weight, tv.fc.weight)


def test_eps_mismatch_is_reported() -> None:
    tv = torchvision.models.resnet18(weights=None)
    ours = create_model("resnet18", norm="bn", eps=1e-3)
    with pytest.raises(WeightImportError, match="eps"):
        load_torchvision_weights(ours, tv)


def test_b5_uses_torchvision_eps() -> None:
    with torch.device("meta"):
        tv = torchvision.models.efficientnet_b5(weights=None)
        ours = create_model("efficientnet_b5", norm="bn")
    tv_eps = {m.eps for m in tv.modules() if isinstance(m, nn.BatchNorm2d)}
    our_eps = {m.eps for m in ours.modules() if isinstance(m, nn.BatchNorm2d)}
    assert tv_eps == our_eps == {1e-3}
    map_state_dict(tv.state_dict(), ours.state_dict())  # structure matches for B5 too


def test_wrong_architecture_lists_unmapped_keys() -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet34(weights=None)
        ours = create_model("resnet18", norm="bn")
    with pytest.raises(WeightImportError) as err:
        map_state_dict(tv.state_dict(), ours.state_dict())
    assert "differ" in str(err.value) and "unmapped source modules" in str(err.value)


def test_num_classes_mismatch_is_reported() -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None)
        ours = create_model("resnet18", norm="bn", num_classes=10)
    with pytest.raises(WeightImportError, match="fc"):
        map_state_dict(tv.state_dict(), ours.state_dict())


def test_non_bn_model_rejected() -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None)
        ours = create_model("resnet18", norm="gn")
    with pytest.raises(WeightImportError, match="BatchNorm"):
        load_torchvision_weights(ours, tv)


def test_target_missing_modules_reported() -> None:
    with torch.device("meta"):
        tv = torchvision.models.resnet18(weights=None)
        ours = create_model("resnet34", norm="bn")
    with pytest.raises(WeightImportError, match="missing from the source"):
        map_state_dict(tv.state_dict(), ours.state_dict())
