"""``diga export`` of the DAFormer network with dynamic batch, height and width: every file is verified
by the command at 1x3x67x101 and 3x3x45x83 (no multiple of 32, unlike the 64x96 export example); the ONNX
file is run once more here in ONNX Runtime at a third size."""

import pytest
import torch
from cli_helpers import run

from diga_fast.labels import CITYSCAPES19
from diga_fast.export import InferenceWrapper, OnnxSegmenter, load_pt2
from diga_fast.models import build_model
from diga_fast.models.io import save_weights


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = build_model("daformer_mitb0", 19)
    with torch.no_grad():
        model.classifier.weight.mul_(100)  # logits of a realistic scale
    path = tmp_path_factory.mktemp("daformer") / "student.safetensors"
    save_weights(path, model, CITYSCAPES19.name)
    return path, model.eval()


def _ort_matches_torch(path, model, shape, atol):
    image = torch.rand(*shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = InferenceWrapper(model)(image)
    got = OnnxSegmenter(path, device="cpu")(image)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=atol * max(1.0, expected.abs().max().item()), rtol=0)


def test_onnx_fp32_fp16_and_torchscript(tmp_path, capsys, checkpoint):
    path, model = checkpoint
    code, stdout, err = run(capsys, "export", "--checkpoint", path, "--onnx", tmp_path / "m.onnx", "--legacy",
                            "--torchscript", tmp_path / "m.pt")
    assert code == 0, err
    assert "2 file(s) written and verified" in stdout and "1x3x67x101, 3x3x45x83" in stdout
    _ort_matches_torch(tmp_path / "m.onnx", model, (2, 3, 99, 130), 1e-4)
    code, stdout, err = run(capsys, "export", "--checkpoint", path, "--onnx", tmp_path / "half.onnx", "--legacy", "--fp16")
    assert code == 0, err
    assert "fp16" in stdout
    _ort_matches_torch(tmp_path / "half.onnx", model, (1, 3, 99, 130), 1e-2)


@pytest.mark.slow
def test_torch_export_based_onnx_and_pt2(tmp_path, capsys, checkpoint):
    """The torch.export-based exporters trace the MiT with symbolic sizes (about a minute on 2 cores)."""
    path, model = checkpoint
    code, stdout, err = run(capsys, "export", "--checkpoint", path, "--onnx", tmp_path / "m.onnx", "--pt2",
                            tmp_path / "m.pt2")
    assert code == 0, err
    assert "2 file(s) written and verified" in stdout
    _ort_matches_torch(tmp_path / "m.onnx", model, (2, 3, 99, 130), 1e-4)
    program, _ = load_pt2(tmp_path / "m.pt2")
    image = torch.rand(1, 3, 99, 130)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(image), InferenceWrapper(model)(image), atol=1e-4, rtol=0)
