import math

import pytest
import torch
import torch.nn.functional as F

from diga_fast.models import build_model
from diga_fast.models.small import SmallSegNet


@pytest.mark.parametrize("size", [(97, 181), (128, 256), (33, 64)])
def test_output_shapes_follow_ceil_division_by_the_stride(size):
    model = build_model("small", 19).eval()
    assert isinstance(model, SmallSegNet)
    assert model.arch == "small" and model.num_classes == 19 and model.output_stride == 4
    with torch.no_grad():
        logits, feature = model(torch.rand(2, 3, *size))
    expected = (math.ceil(size[0] / model.output_stride), math.ceil(size[1] / model.output_stride))
    assert logits.shape == (2, 19, *expected)
    assert feature.shape == (2, model.feature_dim, *expected)
    assert logits.dtype == feature.dtype == torch.float32


def test_feature_is_what_the_classifier_reads():
    model = build_model("small", 16).eval()
    assert model.feature_dim == 64
    with torch.no_grad():
        logits, feature = model(torch.rand(1, 3, 40, 72))
        assert torch.allclose(logits, model.classifier(feature), atol=1e-5)
    assert model.classifier.bias is None


def test_parameter_groups_cover_every_trainable_parameter_once():
    model = build_model("small", 19)
    backbone = [id(p) for p in model.backbone_parameters()]
    head = [id(p) for p in model.head_parameters()]
    everything = [id(p) for p in model.parameters() if p.requires_grad]
    assert len(backbone) == len(set(backbone)) and len(head) == len(set(head))
    assert not set(backbone) & set(head)
    assert sorted(backbone + head) == sorted(everything)
    assert id(model.classifier.weight) in head


def test_normalisation_is_inside_the_model():
    model = build_model("small", 19)
    image = torch.full((1, 3, 8, 8), 0.5)
    normed = model.normalize(image)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(normed[0, :, 0, 0], (0.5 - mean) / std)


def test_a_few_sgd_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build_model("small", 5)
    image = torch.rand(4, 3, 48, 64)
    label = torch.randint(0, 5, (4, 1, 6, 8)).float()
    label = F.interpolate(label, size=(48, 64), mode="nearest")[:, 0].long()
    label[:, :2] = 255
    optimizer = torch.optim.SGD(
        [{"params": list(model.backbone_parameters()), "lr": 0.01},
         {"params": list(model.head_parameters()), "lr": 0.1}],
        momentum=0.9,
    )

    def loss_now():
        logits, _ = model(image)
        logits = F.interpolate(logits, size=label.shape[-2:], mode="bilinear", align_corners=False)
        return F.cross_entropy(logits, label, ignore_index=255)

    first = None
    for _ in range(15):
        loss = loss_now()
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.8 * first


def test_exports_with_dynamic_height_and_width():
    model = build_model("small", 7).eval()
    example = torch.rand(2, 3, 64, 96)
    height, width = torch.export.Dim("height", min=16, max=2048), torch.export.Dim("width", min=16, max=2048)
    program = torch.export.export(model, (example,), dynamic_shapes={"image": {2: height, 3: width}})
    other = torch.rand(2, 3, 97, 181)
    with torch.no_grad():
        expected = model(other)
    got = program.module()(other)
    assert got[0].shape == expected[0].shape == (2, 7, 25, 46)
    assert torch.allclose(got[0], expected[0], atol=1e-4)
