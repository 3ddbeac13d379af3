"""The DAFormer network (MiT encoder + context-aware fusion head): the encoder against the Hugging Face
SegFormer implementation, shapes, parameter groups, and pretrained files in both published layouts."""

import math
import re

import pytest
import torch

from diga_fast.errors import DigaError
from diga_fast.models import build_model
from diga_fast.models.daformer import DAFormer
from diga_fast.models.mit import MIT_CONFIGS, MixVisionTransformer
from diga_fast.models.mit_weights import load_mit_weights

SIZES = ((64, 96), (70, 101))  # the second is no multiple of 32 (nor of 4 or 8)


def hf_segformer(variant: str = "b0", seed: int = 0):
    """A randomly initialised Hugging Face ``SegformerModel`` of a MiT size, in eval mode, with the
    SegFormer release's LayerNorm eps (1e-6 in the blocks and stage-final norms; the port uses 1e-5)."""
    transformers = pytest.importorskip("transformers")
    config = MIT_CONFIGS[variant]
    torch.manual_seed(seed)
    hf_config = transformers.SegformerConfig(
        hidden_sizes=list(config.embed_dims), num_attention_heads=list(config.num_heads), depths=list(config.depths),
        sr_ratios=list(config.sr_ratios), mlp_ratios=list(config.mlp_ratios), drop_path_rate=config.drop_path_rate,
    )
    model = transformers.SegformerModel(hf_config).eval()
    block_or_stage_norm = re.compile(r"(layer_norm_[12]|layernorm_(before|after)|^stages\.\d\.layer_norm|"
                                     r"^encoder\.layer_norm\.\d)$")  # transformers >= 5 and 4.x names
    patched = [m for name, m in model.named_modules()
               if isinstance(m, torch.nn.LayerNorm) and block_or_stage_norm.search(name)]
    assert len(patched) == 2 * sum(config.depths) + 4
    for module in patched:
        module.eps = 1e-6
    return model


def test_encoder_matches_hugging_face_segformer_hidden_states():
    reference = hf_segformer("b0")
    encoder = MixVisionTransformer(MIT_CONFIGS["b0"]).eval()
    from diga_fast.models.mit_weights import to_release_layout

    _, state = to_release_layout(reference.state_dict(), "reference")
    encoder.load_state_dict(state, strict=True)
    for size in SIZES:
        image = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = reference(image, output_hidden_states=True).hidden_states
            ours = encoder(image)
        assert len(ours) == len(expected) == 4
        for stage, (a, b) in enumerate(zip(ours, expected)):
            assert a.shape == b.shape == (2, MIT_CONFIGS["b0"].embed_dims[stage],
                                          math.ceil(size[0] / 2 ** (stage + 2)), math.ceil(size[1] / 2 ** (stage + 2)))
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_hugging_face_hub_file_loads_through_pretrained(tmp_path):
    reference = hf_segformer("b0", seed=3)
    reference.save_pretrained(tmp_path)  # the Hub layout: encoder.block.0.0.attention.self.query.weight, ...
    model = build_model("daformer_mitb0", 19, pretrained=str(tmp_path / "model.safetensors")).eval()
    image = torch.rand(1, 3, 64, 72)
    with torch.no_grad():
        expected = reference(model.normalize(image), output_hidden_states=True).hidden_states
        ours = model.encoder(model.normalize(image))
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_segformer_release_layout_loads_key_for_key(tmp_path):
    source = MixVisionTransformer(MIT_CONFIGS["b0"])
    state = {**source.state_dict(), "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}
    torch.save(state, tmp_path / "mit_b0.pth")
    model = DAFormer("b0", num_classes=5, pretrained=tmp_path / "mit_b0.pth")
    for key, value in source.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[key], value), key


def test_a_file_of_neither_layout_or_another_size_is_one_clear_line(tmp_path):
    encoder = MixVisionTransformer(MIT_CONFIGS["b0"])
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tmp_path / "resnet.pth")
    with pytest.raises(DigaError, match="neither a SegFormer release MiT file .* nor a Hugging Face"):
        load_mit_weights(encoder, tmp_path / "resnet.pth")
    torch.save(MixVisionTransformer(MIT_CONFIGS["b1"]).state_dict(), tmp_path / "mit_b1.pth")
    with pytest.raises(DigaError, match=r"MiT-b1\) does not fit the MiT-b0 encoder"):
        load_mit_weights(encoder, tmp_path / "mit_b1.pth")
    (tmp_path / "text.pth").write_text("not weights")
    with pytest.raises(DigaError, match="is not a state dict of tensors"):
        load_mit_weights(encoder, tmp_path / "text.pth")
    with pytest.raises(DigaError, match="not found"):
        load_mit_weights(encoder, tmp_path / "missing.pth")


@pytest.mark.parametrize("size", [(64, 96), (45, 83)])
def test_logits_and_feature_at_stride_4(size):
    model = build_model("daformer_mitb0", 19).eval()
    assert model.arch == "daformer_mitb0" and model.feature_dim == 256 and model.output_stride == 4
    with torch.no_grad():
        logits, feature = model(torch.rand(2, 3, *size))
    expected = (math.ceil(size[0] / 4), math.ceil(size[1] / 4))
    assert logits.shape == (2, 19, *expected) and feature.shape == (2, 256, *expected)
    torch.testing.assert_close(logits, model.classifier(feature))


def test_parameter_groups_and_training_options():
    model = build_model("daformer_mitb0", 19)
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert not backbone & head and backbone | head == {id(p) for p in model.parameters()}
    no_decay = {id(p) for p in model.no_weight_decay_parameters()}
    assert no_decay < backbone and id(model.encoder.norm1.weight) in no_decay
    assert id(model.encoder.block1[0].attn.q.weight) not in no_decay
    model.set_training_options(dropout=0.3)
    assert model.dropout.p == 0.3
    drop_rates = [block.drop_path.p for i in range(1, 5) for block in getattr(model.encoder, f"block{i}")]
    assert drop_rates[0] == 0.0 and drop_rates[-1] == pytest.approx(0.1)


def test_one_training_step_changes_every_part():
    torch.manual_seed(0)
    model = build_model("daformer_mitb0", 4).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logits, _ = model(torch.rand(2, 3, 64, 64))
    torch.nn.functional.cross_entropy(logits, torch.randint(0, 4, (2, 16, 16))).backward()
    optimizer.step()
    after = model.state_dict()
    for key in ("encoder.patch_embed1.proj.weight", "encoder.block4.1.mlp.fc2.weight", "head.fuse.bottleneck.0.weight",
                "classifier.weight"):
        assert not torch.equal(before[key], after[key]), key
