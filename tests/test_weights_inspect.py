"""``diga weights inspect``: every accepted weight format, made here in its real key layout (zeros of the
right shapes, built from the project's own networks on the meta device), is recognised with its network
and the options that take it; where cheap, the loader then loads the same file. A file of no known
format, an unreadable one and a missing one are each one error line naming the file."""

from __future__ import annotations

import hashlib
import json
import re

import pytest
import torch
from safetensors.torch import save_file

from cli_helpers import assert_one_line_error, run
from test_deeplabv2 import torchvision_state_dict
from diga_fast.errors import DigaError
from diga_fast.models import build_model
from diga_fast.models.daformer import DAFormer
from diga_fast.models.deeplabv2 import DeepLabV2
from diga_fast.models.io import load_model, load_translator_generator, load_vgg_features, save_translator, save_weights
from diga_fast.models.mit import MIT_CONFIGS, MixVisionTransformer
from diga_fast.models.translator import ImageTranslator, VGGFeatures
from diga_fast.models.weights_inspect import _pretrained_uses, inspect_weights


def zeros_like_meta(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in state.items()}


def resnet_file(depth: int) -> dict[str, torch.Tensor]:
    """A torchvision ResNet state dict (backbone names, plus the ImageNet fc) of real shapes, all zeros."""
    with torch.device("meta"):
        model = DeepLabV2(depth=depth, num_classes=19)
    return zeros_like_meta(torchvision_state_dict(model))


def hub_layout(release: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The SegFormer release's MiT keys in the Hugging Face Hub layout (what ``SegformerModel.save_pretrained``
    writes with transformers 4.x): the inverse of mit_weights' renaming, ``kv`` split into key and value."""
    stage = (
        (r"^patch_embed(\d)\.proj\.", lambda m: f"encoder.patch_embeddings.{int(m[1]) - 1}.proj."),
        (r"^patch_embed(\d)\.norm\.", lambda m: f"encoder.patch_embeddings.{int(m[1]) - 1}.layer_norm."),
        (r"^norm(\d)\.", lambda m: f"encoder.layer_norm.{int(m[1]) - 1}."),
        (r"^block(\d)\.(\d+)\.", lambda m: f"encoder.block.{int(m[1]) - 1}.{m[2]}."),
    )
    block = (
        (r"\.norm1\.", ".layer_norm_1."), (r"\.norm2\.", ".layer_norm_2."), (r"\.attn\.q\.", ".attention.self.query."),
        (r"\.attn\.sr\.", ".attention.self.sr."), (r"\.attn\.norm\.", ".attention.self.layer_norm."),
        (r"\.attn\.proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".mlp.dense1."),
        (r"\.mlp\.fc2\.", ".mlp.dense2."),
    )
    hub = {}
    for key, tensor in release.items():
        for pattern, replacement in (*stage, *block):
            key = re.sub(pattern, replacement, key)
        if ".attn.kv." in key:
            k, v = tensor.chunk(2)
            hub[key.replace(".attn.kv.", ".attention.self.key.")] = k.clone()
            hub[key.replace(".attn.kv.", ".attention.self.value.")] = v.clone()
        else:
            hub[key] = tensor
    return hub


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One file (or folder) of every format; built once, a few hundred MB of zeros in all."""
    root = tmp_path_factory.mktemp("weights")
    r101 = resnet_file(101)
    torch.save(r101, root / "resnet101-63fe2227.pth")
    official = {f"Scale.{k}": v for k, v in r101.items() if not k.startswith("fc.")}
    official["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 2048, 3, 3)  # its VOC head: not used
    torch.save(official, root / "DeepLab_resnet_pretrained_init-f81d91e8.pth")
    torch.save(resnet_file(50), root / "resnet50.pth")

    torch.manual_seed(0)
    mit_b0 = MixVisionTransformer(MIT_CONFIGS["b0"]).state_dict()
    torch.save({**mit_b0, "head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)}, root / "mit_b0.pth")
    hub = {f"segformer.{k}": v for k, v in hub_layout(mit_b0).items()}
    hub["decode_head.classifier.weight"] = torch.zeros(19, 256, 1, 1)  # SegformerForSemanticSegmentation's head
    (root / "hf-mit-b0").mkdir()
    save_file(hub, str(root / "hf-mit-b0" / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "segformer", "architectures": ["SegformerForSemanticSegmentation"]}
    (root / "hf-mit-b0" / "config.json").write_text(json.dumps(config))
    torch.save({"state_dict": hub_layout(mit_b0)}, root / "pytorch_model.bin")  # wrapped, no prefix: read too

    with torch.device("meta"):
        vgg19 = VGGFeatures("vgg19").state_dict()
        vgg16 = VGGFeatures("vgg16").state_dict()
    torch.save({**zeros_like_meta(vgg19), "classifier.6.bias": torch.zeros(1000)}, root / "vgg19-dcbb9e9d.pth")
    torch.save({"state_dict": zeros_like_meta(vgg16)}, root / "vgg16-397923af.pth")

    save_weights(root / "model.safetensors", build_model("small", 19), "cityscapes19")
    save_translator(root / "translator.safetensors", ImageTranslator(8, 1))
    return root


CASES = {  # file -> (format, network, a fragment of some accepted_by line)
    "resnet101-63fe2227.pth": ("torchvision-resnet101", "deeplabv2_r101",
                               "--pretrained for --preset paper (deeplabv2_r101"),
    "DeepLab_resnet_pretrained_init-f81d91e8.pth": ("deeplab-official-init", "deeplabv2_r101",
                                                    "--pretrained for --preset paper (deeplabv2_r101"),
    "resnet50.pth": ("torchvision-resnet50", "deeplabv2_r50", "--model deeplabv2_r50"),
    "mit_b0.pth": ("segformer-mit", "daformer_mitb0", "--model daformer_mitb0"),
    "hf-mit-b0": ("huggingface-segformer", "daformer_mitb0", "--model daformer_mitb0"),
    "pytorch_model.bin": ("huggingface-segformer", "daformer_mitb0", "--model daformer_mitb0"),
    "vgg19-dcbb9e9d.pth": ("torchvision-vgg19", "vgg19", "translator.vgg_weights"),
    "vgg16-397923af.pth": ("torchvision-vgg16", "vgg16", "translator.vgg_weights"),
    "model.safetensors": ("diga-fast-model", "small", "--checkpoint of diga eval"),
    "translator.safetensors": ("diga-fast-translator", "cyclegan translator (width 8, n_res 1)",
                               "translator.checkpoint"),
}


@pytest.fixture(scope="module")
def reports(files):
    return {name: inspect_weights(files / name) for name in CASES}


@pytest.mark.parametrize("name", CASES)
def test_every_format_is_recognised_with_its_network_and_options(files, reports, name):
    fmt, network, use = CASES[name]
    report = reports[name]
    assert (report["format"], report["network"]) == (fmt, network)
    assert any(use in line for line in report["accepted_by"]), report["accepted_by"]
    weight_file = files / name / "model.safetensors" if name == "hf-mit-b0" else files / name
    assert report["file"] == str(weight_file)
    assert report["file_bytes"] == weight_file.stat().st_size
    assert report["sha256"] == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    assert report["parameters"] > 0 and report["tensors"] > 0


def test_parameter_counts_are_the_networks_own(reports):
    with torch.device("meta"):
        r101 = DeepLabV2(depth=101)
    backbone = sum(p.numel() for n, p in r101.named_parameters() if not n.startswith(("aspp.", "classifier.")))
    assert reports["resnet101-63fe2227.pth"]["parameters"] == backbone  # fc.* and BN statistics not counted
    assert reports["DeepLab_resnet_pretrained_init-f81d91e8.pth"]["parameters"] == backbone
    mit = sum(p.numel() for p in MixVisionTransformer(MIT_CONFIGS["b0"]).parameters())
    assert reports["mit_b0.pth"]["parameters"] == reports["hf-mit-b0"]["parameters"] == mit  # key + value as kv
    assert reports["vgg16-397923af.pth"]["tensors"] == 26  # inside its {"state_dict": ...}: 13 convs
    assert reports["model.safetensors"]["parameters"] == sum(p.numel() for p in build_model("small", 19).parameters())


def test_what_inspect_accepts_the_loaders_load(files):
    DeepLabV2(depth=50, num_classes=16, pretrained=files / "resnet50.pth")
    DAFormer("b0", num_classes=5, pretrained=files / "mit_b0.pth")
    DAFormer("b0", num_classes=5, pretrained=files / "hf-mit-b0" / "model.safetensors")
    DAFormer("b0", num_classes=5, pretrained=files / "pytorch_model.bin")
    assert load_vgg_features(files / "vgg16-397923af.pth").variant == "vgg16"
    assert load_model(files / "model.safetensors")[0].arch == "small"
    assert load_translator_generator(files / "translator.safetensors").width == 8


def test_a_folder_names_its_weight_file_and_config(files, reports):
    report = reports["hf-mit-b0"]
    assert report["config"]["architectures"] == ["SegformerForSemanticSegmentation"]
    assert all(str(files / "hf-mit-b0" / "model.safetensors") in use for use in report["accepted_by"]
               if use.startswith("--pretrained"))
    assert "paper-daformer" not in " ".join(report["accepted_by"])  # the paper-daformer preset is mitb5


def test_the_presets_of_each_network(reports):
    uses = reports["resnet101-63fe2227.pth"]["accepted_by"]
    assert uses == ["--pretrained for --preset paper (deeplabv2_r101; --source gta5 / synthia / cityscapes)",
                    "--pretrained with --model deeplabv2_r101 (model.pretrained=FILE), any preset"]
    assert reports["resnet50.pth"]["accepted_by"] == [
        "--pretrained with --model deeplabv2_r50 (model.pretrained=FILE), any preset"]
    # A MiT-b5 file (330 MB, and a MiT is built on the CPU) is not made here: its network's uses are these.
    assert _pretrained_uses("daformer_mitb5")[0].startswith("--pretrained for --preset paper-daformer (daformer_mitb5;")


def one_line(match: str, path) -> None:
    with pytest.raises(DigaError, match=match) as caught:
        inspect_weights(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_unknown_unreadable_and_missing_files_are_one_line(files, tmp_path):
    torch.save({"weight": torch.randn(3, 4), "bias": torch.randn(3)}, tmp_path / "random.pth")
    one_line(r"no weight file diga-fast knows \(2 tensors; first keys 'weight', 'bias'\)", tmp_path / "random.pth")
    one_line("no such file or folder", tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_text("not weights")
    one_line("is not a PyTorch file of tensors", tmp_path / "notes.pth")
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 10)
    one_line("is not a readable safetensors file", tmp_path / "broken.safetensors")
    torch.save(torch.zeros(3), tmp_path / "tensor.pth")
    one_line("holds no state dict", tmp_path / "tensor.pth")
    (tmp_path / "empty").mkdir()
    one_line("folder with no weight file", tmp_path / "empty")


def test_a_file_of_a_known_layout_that_does_not_fit_is_the_loaders_line(tmp_path):
    r50 = resnet_file(50)
    torch.save({k: v for k, v in r50.items() if k != "layer4.2.conv3.weight"}, tmp_path / "truncated.pth")
    one_line("does not fit deeplabv2_r50: missing key layer4.2.conv3.weight", tmp_path / "truncated.pth")
    torch.save({**r50, "layer3.6.conv1.weight": torch.zeros(1)}, tmp_path / "odd.pth")
    one_line(r"looks like a net with 7 layer3 blocks; deeplabv2_r101 needs ResNet-101\): key layer3.6",
             tmp_path / "odd.pth")
    save_file(r50, str(tmp_path / "resnet50.safetensors"))  # the ResNet loader reads .pth only
    one_line("as safetensors; --pretrained of deeplabv2 takes a PyTorch .pth", tmp_path / "resnet50.safetensors")
    torch.save({"model": r50}, tmp_path / "wrapped.pth")
    one_line("under 'model'; --pretrained takes the bare state dict", tmp_path / "wrapped.pth")
    with torch.device("meta"):
        odd = VGGFeatures("vgg16").state_dict()
    torch.save({k: v for k, v in zeros_like_meta(odd).items() if not k.startswith("features.28.")},
               tmp_path / "vgg.pth")  # a conv short of vgg16
    one_line("not a torchvision vgg16/vgg19 state dict", tmp_path / "vgg.pth")


def test_cli_table_json_and_error(files, tmp_path, capsys):
    code, out, err = run(capsys, "weights", "inspect", files / "mit_b0.pth")
    assert code == 0, err
    assert "segformer-mit" in out and "daformer_mitb0" in out
    assert hashlib.sha256((files / "mit_b0.pth").read_bytes()).hexdigest() in out  # on one line, whole
    code, out, err = run(capsys, "weights", "inspect", files / "hf-mit-b0", "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "huggingface-segformer"
    torch.save({"x": torch.zeros(1)}, tmp_path / "x.pth")
    code, _, err = run(capsys, "weights", "inspect", tmp_path / "x.pth")
    assert_one_line_error(code, err, "x.pth", "no weight file diga-fast knows", "'x'")
    code, _, err = run(capsys, "weights", "inspect", tmp_path / "nothing")
    assert_one_line_error(code, err, "no such file or folder")


def test_hugging_face_save_pretrained_folder(tmp_path):
    from test_daformer import hf_segformer

    hf_segformer("b0").save_pretrained(tmp_path)
    report = inspect_weights(tmp_path)
    assert (report["format"], report["network"]) == ("huggingface-segformer", "daformer_mitb0")
