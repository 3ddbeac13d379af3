"""DeepLabV2 (paper preset): shapes at output stride 8, frozen BN, parameter groups, pretrained
loading and the Caffe input normalisation. Small inputs keep the r101 forward cheap on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diga_fast.errors import DigaError
from diga_fast.models import build_model
from diga_fast.models.deeplabv2 import CAFFE_MEAN_BGR, DeepLabV2


@pytest.fixture(scope="module")
def r101() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(depth=101, num_classes=19).eval()


@pytest.fixture(scope="module")
def r50() -> DeepLabV2:
    torch.manual_seed(1)
    return DeepLabV2(depth=50, num_classes=16).eval()


def torchvision_state_dict(model: DeepLabV2) -> dict[str, torch.Tensor]:
    """The backbone in torchvision's naming, plus an ImageNet fc that loading must ignore."""
    state = {k: v.clone() for k, v in model.state_dict().items() if k.split(".")[0] in
             ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4")}
    state["fc.weight"] = torch.randn(1000, 2048)
    state["fc.bias"] = torch.randn(1000)
    return state


def test_output_size_formula_matches_the_official_table():
    assert DeepLabV2.output_size(512, 896) == (65, 113)
    assert DeepLabV2.output_size(512, 1024) == (65, 129)
    assert DeepLabV2.output_size(1024, 2048) == (129, 257)


@pytest.mark.parametrize("size", [(512, 896), (512, 1024), (1024, 2048)])
def test_full_size_shapes_on_meta_device(size):
    with torch.device("meta"):
        model = DeepLabV2(depth=101, num_classes=19)
        logits, feature = model(torch.empty(1, 3, *size))
    assert logits.shape[2:] == feature.shape[2:] == DeepLabV2.output_size(*size)


@pytest.mark.parametrize("size", [(64, 96), (65, 97)])
def test_r101_forward_shapes(r101, size):
    image = torch.rand(2, 3, *size)
    with torch.no_grad():
        logits, feature = r101(image)
    h, w = DeepLabV2.output_size(*size)
    assert logits.shape == (2, 19, h, w)
    assert feature.shape == (2, 256, h, w)
    assert torch.isfinite(logits).all() and torch.isfinite(feature).all()


def test_r50_variant_and_attributes(r50, r101):
    assert r101.arch == "deeplabv2_r101" and r50.arch == "deeplabv2_r50"
    assert (r50.num_classes, r50.feature_dim, r50.output_stride) == (16, 256, 8)
    assert len(r50.layer3) == 6 and len(r101.layer3) == 23
    assert [len(r50.layer1), len(r50.layer2), len(r50.layer4)] == [3, 4, 3]
    with torch.no_grad():
        logits, feature = r50(torch.rand(1, 3, 33, 47))
    assert logits.shape == (1, 16, *DeepLabV2.output_size(33, 47))
    assert feature.shape == (1, 256, *DeepLabV2.output_size(33, 47))
    assert isinstance(build_model("deeplabv2_r50", 19), DeepLabV2)


def test_caffe_style_strides_and_dilations(r50):
    first2 = r50.layer2[0]
    assert first2.conv1.stride == (2, 2) and first2.conv2.stride == (1, 1)
    assert first2.downsample[0].stride == (2, 2)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in r50.layer3)
    assert all(b.conv2.dilation == (4, 4) and b.conv2.padding == (4, 4) for b in r50.layer4)
    assert r50.maxpool.ceil_mode
    assert [b[0].dilation for b in r50.aspp.branches[1:]] == [(6, 6), (12, 12), (18, 18), (24, 24)]
    assert r50.classifier.bias is None


def test_backbone_bn_affine_frozen_and_stats_follow_mode():
    torch.manual_seed(2)
    model = DeepLabV2(depth=50, num_classes=19)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(not p.requires_grad for m in bns for p in m.parameters())
    assert all(p.requires_grad for m in model.aspp.modules() if isinstance(m, nn.GroupNorm)
               for p in m.parameters())

    model.train()  # official behaviour: batch statistics, running statistics updated
    assert all(m.training for m in bns)
    before = model.bn1.running_mean.clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert not torch.equal(before, model.bn1.running_mean)

    model.freeze_bn_stats = True
    model.train()
    assert not any(m.training for m in bns) and model.aspp.training and model.dropout.training
    before = model.bn1.running_mean.clone()
    with torch.no_grad():
        model(torch.rand(2, 3, 32, 32))
    assert torch.equal(before, model.bn1.running_mean)


def test_parameter_groups_cover_trainable_parameters_once(r101):
    backbone = list(r101.backbone_parameters())
    head = list(r101.head_parameters())
    ids = [id(p) for p in backbone + head]
    assert len(ids) == len(set(ids))
    trainable = {id(p) for p in r101.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert all(p.requires_grad for p in backbone + head)
    assert id(r101.conv1.weight) in {id(p) for p in backbone}
    assert id(r101.classifier.weight) in {id(p) for p in head}


def test_feature_is_the_classifier_input(r50):
    with torch.no_grad():
        logits, feature = r50(torch.rand(1, 3, 40, 40))
        assert torch.allclose(r50.classifier(feature), logits, atol=1e-6)


def test_normalize_is_the_caffe_transform(r50):
    image = torch.rand(2, 3, 7, 9, dtype=torch.float64).float()
    rgb255 = image.double() * 255.0
    bgr = rgb255.flip(1)
    expected = (bgr - torch.tensor(CAFFE_MEAN_BGR, dtype=torch.float64).view(1, 3, 1, 1)) / 128.0
    assert torch.allclose(r50.normalize(image).double(), expected, atol=1e-5, rtol=0)
    # A pure-red pixel becomes (b, g, r) = (-104.0, -116.7, 255 - 122.7) / 128.
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    out = r50.normalize(red).flatten()
    assert torch.allclose(out, torch.tensor([-104.00698793, -116.66876762, 255 - 122.67891434]) / 128)


def test_pretrained_round_trip(tmp_path, r50):
    path = tmp_path / "resnet50.pth"
    state = torchvision_state_dict(r50)
    for key in [k for k in state if k.endswith("num_batches_tracked")][:3]:
        del state[key]  # old torchvision files have none
    torch.save(state, path)
    torch.manual_seed(123)
    loaded = DeepLabV2(depth=50, num_classes=16, pretrained=str(path)).eval()
    got = loaded.state_dict()
    for key, value in state.items():
        if not key.startswith("fc.") and key not in ("conv1.weight", "bn1.running_mean"):  # those two are folded
            assert torch.equal(got[key], value), key
    assert not torch.equal(loaded.classifier.weight, r50.classifier.weight)  # head not loaded
    assert all(not p.requires_grad for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)
               for p in m.parameters())


def test_torchvision_weights_are_converted_to_the_caffe_input(tmp_path, r50):
    """A torchvision state dict expects RGB ImageNet-normalised input; converted on load, the model's
    own Caffe-BGR input gives the logits that torchvision's normalisation gives the unconverted weights
    (up to conv1's zero padding at the border, see fold_torchvision_input)."""
    from diga_fast.models.deeplabv2 import IMAGENET_MEAN_RGB, IMAGENET_STD_RGB

    state = torchvision_state_dict(r50)
    with torch.no_grad():  # a realistic stem: conv1 weights of ImageNet-trained size, BN statistics to match
        state["conv1.weight"] = torch.randn(64, 3, 7, 7) * 0.05
        state["bn1.running_mean"] = torch.randn(64) * 0.2
        state["bn1.running_var"] = torch.rand(64) + 0.5
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    converted = DeepLabV2(depth=50, num_classes=16, pretrained=path).eval()
    reference = DeepLabV2(depth=50, num_classes=16).eval()
    reference.load_state_dict({**converted.state_dict(), **{k: v for k, v in state.items() if not k.startswith("fc.")}})
    mean = torch.tensor(IMAGENET_MEAN_RGB).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD_RGB).view(1, 3, 1, 1)
    reference.normalize = lambda x: (x - mean) / std  # torchvision's own normalisation, RGB
    image = torch.rand(1, 3, 61, 83)
    with torch.no_grad():
        stem = lambda m: m.bn1(m.conv1(m.normalize(image)))  # noqa: E731
        inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # away from conv1's zero padding
        torch.testing.assert_close(stem(converted)[inner], stem(reference)[inner], rtol=1e-4, atol=1e-4)
        got, want = converted(image)[0], reference(image)[0]
    assert (got - want).abs().max() <= 1e-2 * want.abs().max()
    # the unconverted weights on the Caffe input are far off: the conversion is what makes them agree
    reference.normalize = converted.normalize
    with torch.no_grad():
        assert (stem(reference) - stem(converted))[inner].abs().max() > 0.1


def test_pretrained_deeplab_scale_prefix(tmp_path, r50):
    state = {f"Scale.{k}": v for k, v in torchvision_state_dict(r50).items() if not k.startswith("fc.")}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 2048, 3, 3)
    path = tmp_path / "deeplab_init.pth"
    torch.save(state, path)
    loaded = DeepLabV2(depth=50, num_classes=16, pretrained=path)
    assert torch.equal(loaded.layer4[2].conv3.weight, r50.layer4[2].conv3.weight)


def test_pretrained_r50_file_into_r101_names_a_key(tmp_path, r50):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision_state_dict(r50), path)
    with pytest.raises(DigaError, match=r"layer3\.6\.conv1\.weight") as info:
        DeepLabV2(depth=101, num_classes=19, pretrained=path)
    assert "ResNet-50" in str(info.value)


def test_pretrained_wrong_shape_names_the_key(tmp_path, r50):
    state = torchvision_state_dict(r50)
    state["layer1.0.conv2.weight"] = torch.zeros(64, 64, 1, 1)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(DigaError, match=r"layer1\.0\.conv2\.weight.*\(64, 64, 1, 1\)"):
        DeepLabV2(depth=50, num_classes=19, pretrained=path)


def test_pretrained_bad_files(tmp_path):
    with pytest.raises(DigaError, match="not found"):
        DeepLabV2(depth=50, pretrained=tmp_path / "missing.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(DigaError, match="not a PyTorch state dict"):
        DeepLabV2(depth=50, pretrained=text)
    listing = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listing)
    with pytest.raises(DigaError, match="not a ResNet state dict"):
        DeepLabV2(depth=50, pretrained=listing)
    extra = tmp_path / "extra.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "layer9.weight": torch.zeros(1)}, extra)
    with pytest.raises(DigaError, match="missing key bn1.weight"):
        DeepLabV2(depth=50, pretrained=extra)


def test_torchvision_resnet_keys_load_if_available(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    path = tmp_path / "tv50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    DeepLabV2(depth=50, num_classes=19, pretrained=path)
