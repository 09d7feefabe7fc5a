"""timm -> ipu_norm weight import: identical logits prove the NF architectures are timm's/DeepMind's.

Randomly initialised timm models (pretrained=False, no download). Skip gains, WS gains, biases and the
classifier are randomised first: at init the skip gains are 0 (branches off) and the N(0, 0.01) classifier
makes every logit tiny, which would make a logit comparison nearly vacuous.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ipu_norm.layers.weight_std import ScaledStdConv2d
from ipu_norm.models import create_model
from ipu_norm.models.import_timm import convert_timm_state_dict, load_timm_weights, timm_key_to_ipu_norm
from ipu_norm.models.nfnet import NormFreeNet, nf_resnet_cfg

timm = pytest.importorskip("timm")


def _randomise(model: nn.Module) -> None:
    torch.manual_seed(123)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("skipinit_gain"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("conv3.gain"):  # nf_resnet50's zero-init last gain
                p.uniform_(0.5, 1.5)
            elif name.endswith(".gain"):
                p.mul_(torch.empty_like(p).uniform_(0.7, 1.3))
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
            elif name == "head.fc.weight":
                p.normal_(0.0, p.shape[1] ** -0.5)


@pytest.fixture(scope="module")
def f0_pair() -> tuple[nn.Module, NormFreeNet]:
    torch.manual_seed(0)
    src = timm.create_model("dm_nfnet_f0", pretrained=False).eval()
    _randomise(src)
    ours = create_model("nfnet_f0").eval()
    load_timm_weights(ours, src)
    return src, ours


@pytest.fixture(scope="module")
def r50_pair() -> tuple[nn.Module, NormFreeNet]:
    torch.manual_seed(0)
    src = timm.create_model("nf_resnet50", pretrained=False).eval()
    _randomise(src)
    ours = create_model("nf_resnet50").eval()
    load_timm_weights(ours, src)
    return src, ours


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (1, 3, 35, 35)])  # odd size: asymmetric SAME padding
def test_dm_nfnet_f0_logits_match(f0_pair: tuple[nn.Module, NormFreeNet], shape: tuple[int, ...]) -> None:
    src, ours = f0_pair
    x = torch.randn(shape)
    with torch.no_grad():
        ref, got = src(x), ours(x)
    assert ref.std() > 0.1  # logits of order one: the comparison is meaningful
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_nf_resnet50_logits_match(r50_pair: tuple[nn.Module, NormFreeNet]) -> None:
    src, ours = r50_pair
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref, got = src(x), ours(x)
    assert ref.std() > 0.1
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_weight_std_form_matters(f0_pair: tuple[nn.Module, NormFreeNet]) -> None:
    # Same tensors, DeepMind's eps form instead of timm's: logits move by far more than the tolerance,
    # so the form switch in load_timm_weights is what the parity above rests on.
    src, ours = f0_pair
    convs = [m for m in ours.modules() if isinstance(m, ScaledStdConv2d)]
    assert all(c.form == "timm" and c.eps == 1e-5 for c in convs)
    x = torch.randn(1, 3, 32, 32)
    try:
        for c in convs:
            c.set_form("deepmind")
        with torch.no_grad():
            diff = (ours(x) - src(x)).abs().max().item()
    finally:
        for c in convs:
            c.set_form("timm", 1e-5)
    assert diff > 1e-3


def test_state_dict_source_equals_module_source(r50_pair: tuple[nn.Module, NormFreeNet]) -> None:
    src, ours = r50_pair
    other = create_model("nf_resnet50").eval()
    load_timm_weights(other, src.state_dict())
    for (k, a), (k2, b) in zip(ours.state_dict().items(), other.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_key_mapping() -> None:
    offsets = {0: 0, 1: 1, 2: 3, 3: 9}
    assert timm_key_to_ipu_norm("stages.2.4.conv2b.gain", offsets) == "blocks.7.conv2b.gain"
    assert timm_key_to_ipu_norm("stages.1.0.downsample.conv.weight", offsets) == "blocks.1.shortcut.conv.weight"
    assert timm_key_to_ipu_norm("stages.3.2.attn_last.fc1.bias", offsets) == "blocks.11.se.fc1.bias"
    assert timm_key_to_ipu_norm("stages.0.0.skipinit_gain", offsets) == "blocks.0.skip_gain"
    assert timm_key_to_ipu_norm("final_conv.weight", offsets) == "head.conv.weight"
    assert timm_key_to_ipu_norm("stem.conv4.bias", offsets) == "stem.conv4.bias"
    assert timm_key_to_ipu_norm("head.fc.weight", offsets) == "head.fc.weight"
    sd = {"stages.0.0.conv1.weight": torch.zeros(1), "stages.1.1.conv1.weight": torch.zeros(1),
          "stages.1.0.conv1.weight": torch.zeros(1)}
    assert set(convert_timm_state_dict(sd)) == {"blocks.0.conv1.weight", "blocks.1.conv1.weight",
                                                "blocks.2.conv1.weight"}


def test_wrong_architecture_is_rejected(r50_pair: tuple[nn.Module, NormFreeNet]) -> None:
    src, _ = r50_pair
    # Same parameter names and shapes, but the ReLU gamma applied in the activations instead of the convs:
    # the imported network would compute something else, so the structural check refuses it.
    with torch.device("meta"):
        gamma_in_act = NormFreeNet(nf_resnet_cfg(gamma_in_act=True))
    with pytest.raises(ValueError, match="gamma"):
        load_timm_weights(gamma_in_act, src)
    with torch.device("meta"):
        f0 = create_model("nfnet_f0")
    with pytest.raises(KeyError):
        load_timm_weights(f0, src.state_dict())


def test_import_without_classifier(r50_pair: tuple[nn.Module, NormFreeNet]) -> None:
    src, ours = r50_pair
    other = create_model("nf_resnet50", num_classes=7)
    fc_before = other.get_classifier().weight.clone()
    load_timm_weights(other, src, include_classifier=False)
    assert torch.equal(other.get_classifier().weight, fc_before)
    torch.testing.assert_close(other.blocks[5].conv2.weight, ours.blocks[5].conv2.weight)


@pytest.mark.parametrize("variant", ["f1", "f6"])
def test_bigger_variants_map_one_to_one(variant: str) -> None:
    # F1+ are too big to run on the CPU test budget; on the meta device check that every timm tensor lands on
    # an ipu_norm parameter of the same shape and nothing is left over (the forward is F0's, tested above).
    with torch.device("meta"):
        src = timm.create_model(f"dm_nfnet_{variant}", pretrained=False)
        ours = create_model(f"nfnet_{variant}")
    converted = convert_timm_state_dict(src.state_dict())
    target = ours.state_dict()
    assert set(converted) == set(target)
    assert all(converted[k].shape == target[k].shape for k in target)
    load_timm_weights(ours, src)  # structural checks: gamma placement, padding and stride of every conv
    assert all(m.form == "timm" for m in ours.modules() if isinstance(m, ScaledStdConv2d))
