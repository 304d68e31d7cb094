"""Shapes, sizes, insightface naming and export behaviour of trainers.backbones."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from marginsearch.trainers.backbones import (
    BACKBONES,
    EmbeddingModel,
    IResNet,
    MobileFaceNet,
    TinyCNN,
    build_backbone,
    iresnet50,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:DeprecationWarning")


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


SHAPE_CASES = [
    ("tiny", (32, 32)),
    ("tiny", (48, 48)),
    ("tiny", (64, 64)),
    ("mobilefacenet", (112, 112)),
    ("mobilefacenet", (112, 96)),
    ("mobilefacenet", (32, 32)),
    ("iresnet18", (112, 112)),
    ("iresnet18", (64, 64)),
    ("iresnet18", (32, 32)),
    ("iresnet34", (64, 64)),
    ("iresnet34", (32, 32)),
    ("iresnet50", (96, 96)),
    ("iresnet50", (32, 32)),
    ("iresnet100", (32, 32)),
]


@pytest.mark.parametrize(("name", "size"), SHAPE_CASES)
def test_output_shape_train_and_eval(name: str, size: tuple[int, int]) -> None:
    model = build_backbone(name, embedding_size=64, input_size=size)
    x = torch.randn(2, 3, *size)
    out = model.train()(x)
    assert out.shape == (2, 64)
    assert torch.isfinite(out).all()
    with torch.no_grad():
        out = model.eval()(x)
    assert out.shape == (2, 64)
    # embeddings are NOT normalised (margin heads / MagFace / AdaFace read the norm)
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))


def test_registry_and_defaults() -> None:
    assert set(BACKBONES) == {"tiny", "mobilefacenet", "iresnet18", "iresnet34", "iresnet50", "iresnet100"}
    tiny = TinyCNN()
    assert tiny.embedding_size == 128 and tiny.input_size == (32, 32)
    assert tiny(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert isinstance(build_backbone("iresnet18", 32, (32, 32)), IResNet)
    assert isinstance(build_backbone("tiny", 16, 40, width=8), TinyCNN)  # int size, extra kwargs


def test_unknown_backbone_error() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet9000'; choose one of .*iresnet50.*tiny"):
        build_backbone("resnet9000", 128, (32, 32))


def test_wrong_input_size_fails_loudly() -> None:
    model = TinyCNN(input_size=(32, 32))
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 64, 64))


def test_iresnet50_matches_insightface_size_and_names() -> None:
    model = iresnet50(embedding_size=512, input_size=(112, 112))
    # insightface r50 (arcface_torch) has 43,590,848 parameters at 112x112 / 512-d
    assert _n_params(model) == pytest.approx(43.59e6, rel=0.005)
    assert model.fc.in_features == 512 * 7 * 7
    keys = set(model.state_dict())
    for key in [
        "conv1.weight", "bn1.weight", "prelu.weight",
        "layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.running_var", "layer1.0.prelu.weight",
        "layer1.0.conv2.weight", "layer1.0.bn3.bias", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.weight",
        "layer3.13.conv2.weight", "layer4.2.conv2.weight",
        "bn2.weight", "fc.weight", "fc.bias", "features.weight", "features.bias", "features.running_mean",
    ]:
        assert key in keys, key
    assert "layer3.14.conv1.weight" not in keys and "layer4.3.conv1.weight" not in keys
    assert len(keys) == 475
    assert not model.features.weight.requires_grad
    assert torch.equal(model.features.weight, torch.ones(512))


def test_iresnet_features_weight_stays_frozen_under_training() -> None:
    model = build_backbone("iresnet18", 16, (32, 32))
    model(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
    assert model.features.weight.grad is None
    assert model.conv1.weight.grad is not None and model.features.bias.grad is not None
    assert model.fc.in_features == 512 * 2 * 2


def test_mobilefacenet_size() -> None:
    # Chen et al. report 0.99M parameters for the 128-d model; 512-d adds 512 * 384 to the last linear
    assert _n_params(MobileFaceNet(128, (112, 112))) == pytest.approx(1.0e6, rel=0.02)
    model = MobileFaceNet(512, (112, 112))
    assert 1.15e6 < _n_params(model) < 1.25e6
    gdc = model.gdc[0]
    assert gdc.kernel_size == (7, 7) and gdc.groups == 512
    assert MobileFaceNet(512, (112, 96)).gdc[0].kernel_size == (7, 6)


def test_tiny_gradients_reach_first_conv() -> None:
    model = TinyCNN(embedding_size=32, width=8, input_size=(48, 48))
    model(torch.randn(4, 3, 48, 48)).pow(2).sum().backward()
    first = model.stages[0][0]
    assert isinstance(first, nn.Conv2d)
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
def test_embedding_model_unit_norm_trace_script_pickle(name: str) -> None:
    model = EmbeddingModel(build_backbone(name, 32, (32, 32))).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 32)
        torch.testing.assert_close(out.norm(dim=1), torch.ones(3))

        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), out)
        y = torch.randn(5, 3, 32, 32)  # another batch size through the same trace
        torch.testing.assert_close(traced(y), model(y))

        scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), out)

        clone = pickle.loads(pickle.dumps(model))
        torch.testing.assert_close(clone(x), out)


@pytest.mark.parametrize("name", ["tiny", "mobilefacenet", "iresnet18"])
def test_channels_last_matches_contiguous(name: str) -> None:
    model = build_backbone(name, 16, (32, 32)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.to(memory_format=torch.channels_last))
    scale = ref.abs().max()  # eval-mode IResNet outputs at init reach ~1e5: compare relative to that
    torch.testing.assert_close(out / scale, ref / scale, rtol=0, atol=1e-5)
