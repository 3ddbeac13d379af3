"""``diga export`` (ONNX, TorchScript, .pt2) round trips with verified parity; ``diga predict/eval --onnx``
match the PyTorch path; no custom (Triton) op reaches an exported graph; bad input is one line."""

import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from diga_fast.cli.main import main
from diga_fast.labels import CITYSCAPES19
from diga_fast.models.io import save_weights
from diga_fast.errors import DigaError
from diga_fast.export import (
    OnnxSegmenter,
    export_model,
    foreign_fx_targets,
    foreign_onnx_ops,
    foreign_torchscript_ops,
    load_pt2,
    load_torchscript,
)
from diga_fast.models import build_model

from cli_helpers import assert_one_line_error, run

RECIPE_DIGEST = "0123abcd"


def confident_model():
    """A random small net with logits of a realistic scale (the default init gives |logit| ~ 0.05,
    where argmax is decided by rounding)."""
    torch.manual_seed(0)
    model = build_model("small", 19)
    with torch.no_grad():
        model.classifier.weight.mul_(100)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_weights(path, confident_model(), "cityscapes19", RECIPE_DIGEST)
    return path


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    """One `diga export` of all three formats, shared by the tests below (export is the slow part)."""
    out = tmp_path_factory.mktemp("export")
    argv = ["export", "--checkpoint", str(checkpoint), "--onnx", str(out / "model.onnx"),
            "--torchscript", str(out / "model.pt"), "--pt2", str(out / "model.pt2")]
    try:
        main(argv)
    except SystemExit as stop:  # pragma: no cover - shows up in the assertions
        assert not stop.code
    return out


def test_export_writes_three_verified_files(exported):
    assert sorted(p.name for p in exported.iterdir()) == ["model.onnx", "model.pt", "model.pt2"]  # no temp files


def test_onnx_contract(exported):
    path = exported / "model.onnx"
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path))
    assert [(o.domain, o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")] == [("", 18)]
    (image,), (logits,) = model.graph.input, model.graph.output
    dims = lambda value: [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(image) == ["batch", 3, "height", "width"]
    assert logits.name == "logits" and logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(logits) == ["batch", 19, "height", "width"]
    # one self-contained file: no tensor lives in a side file
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    assert json.loads(meta["diga.classes"]) == list(CITYSCAPES19.classes)
    assert json.loads(meta["diga.palette"]) == CITYSCAPES19.palette.tolist()
    assert meta["diga.label_space"] == "cityscapes19" and meta["diga.arch"] == "small"
    assert meta["diga.recipe"] == RECIPE_DIGEST and meta["diga.version"] and meta["diga.opset"] == "18"
    assert "dynamo" in meta["diga.exporter"] and meta["diga.precision"] == "fp32"


def test_no_custom_or_triton_op_in_any_graph(exported):
    model = onnx.load(str(exported / "model.onnx"))
    assert foreign_onnx_ops(model) == []
    assert all(onnx.defs.has(node.op_type) for node in model.graph.node)
    program, meta = load_pt2(exported / "model.pt2")
    assert foreign_fx_targets(program) == [] and meta["diga.exporter"] == "torch.export"
    script, meta = load_torchscript(exported / "model.pt")
    assert foreign_torchscript_ops(script) == [] and meta["diga.recipe"] == RECIPE_DIGEST


def test_the_op_checks_do_flag_custom_ops():
    node = onnx.helper.make_node("FusedAssign", ["x"], ["y"], domain="triton")
    graph = onnx.helper.make_graph([node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    assert foreign_onnx_ops(onnx.helper.make_model(graph)) == ["triton::FusedAssign"]

    @torch.library.custom_op("diga_test::fake_kernel", mutates_args=())
    def fake_kernel(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    fake_kernel.register_fake(lambda x: torch.empty_like(x))

    class UsesKernel(torch.nn.Module):
        def forward(self, x):
            return fake_kernel(x) + 1

    program = torch.export.export(UsesKernel(), (torch.rand(2, 3),))
    assert foreign_fx_targets(program) == ["diga_test.fake_kernel.default"]


def test_round_trips_run_at_new_sizes(exported):
    model = confident_model()
    image = torch.rand(2, 3, 41, 77)
    with torch.no_grad():
        low = model(image)[0]
        expected = torch.nn.functional.interpolate(low, size=(41, 77), mode="bilinear", align_corners=True)
    program, _ = load_pt2(exported / "model.pt2")
    script, _ = load_torchscript(exported / "model.pt")
    onnx_logits = OnnxSegmenter(exported / "model.onnx", device="cpu")(image)
    with torch.no_grad():
        for got in (program.module()(image), script(image), onnx_logits):
            assert got.shape == (2, 19, 41, 77)
            assert (got - expected).abs().max() < 1e-3
            top2 = expected.topk(2, dim=1).values
            decided = (top2[:, 0] - top2[:, 1]) > 2e-3  # pixels not within float noise (2x the bound above) of a tie
            assert torch.equal(got.argmax(1)[decided], expected.argmax(1)[decided])


def _image_folder(root):
    """RGB, greyscale, RGBA, palette and 16-bit greyscale files of odd sizes, one larger than the rest."""
    rng = np.random.default_rng(0)
    (root / "sub").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 255, (30, 41), dtype=np.uint8)).save(root / "sub" / "grey.jpg")
    Image.fromarray(rng.integers(0, 255, (25, 25, 4), dtype=np.uint8)).save(root / "sub" / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (33, 47, 3), dtype=np.uint8)).convert("P").save(root / "palette.png")
    Image.fromarray(rng.integers(0, 65535, (29, 31), dtype=np.uint16)).save(root / "deep16.png")
    Image.fromarray(rng.integers(0, 255, (181, 257, 3), dtype=np.uint8)).save(root / "large.png")
    return root


def test_predict_onnx_writes_what_the_torch_path_writes(tmp_path, capsys, checkpoint, exported):
    images = _image_folder(tmp_path / "images")
    code, _, err = run(capsys, "predict", "--onnx", exported / "model.onnx", "--images", images,
                       "--out", tmp_path / "onnx", "--device", "auto")
    assert code == 0, err
    code, _, err = run(capsys, "predict", "--checkpoint", checkpoint, "--images", images, "--out", tmp_path / "torch")
    assert code == 0, err
    written = sorted(p.relative_to(tmp_path / "torch") for p in (tmp_path / "torch").rglob("*.png"))
    assert len(written) == 12 and written == sorted(p.relative_to(tmp_path / "onnx") for p in (tmp_path / "onnx").rglob("*.png"))
    for rel in written:
        ours, theirs = np.array(Image.open(tmp_path / "onnx" / rel)), np.array(Image.open(tmp_path / "torch" / rel))
        assert np.array_equal(ours, theirs), rel
    assert np.array(Image.open(tmp_path / "onnx" / "large_labelIds.png")).shape == (181, 257)


def test_eval_onnx_gives_the_checkpoint_miou(tmp_path, capsys, checkpoint, exported):
    results = []
    for option, path in (("--onnx", exported / "model.onnx"), ("--checkpoint", checkpoint)):
        out = tmp_path / f"{option.strip('-')}.json"
        code, _, err = run(capsys, "eval", option, path, "--target", "synthetic", "--synthetic-images", "2",
                                "--json", out)
        assert code == 0, err
        results.append(json.loads(out.read_text()))
    assert results[0] == results[1]


def test_fp16_labels_export(tmp_path):
    path = tmp_path / "labels16.onnx"
    (result,) = export_model(confident_model(), CITYSCAPES19, {"onnx": path}, fp16=True, argmax=True)
    assert result.parity.ok and result.parity.max_abs_error is None and result.metadata["diga.precision"] == "fp16"
    model = onnx.load(str(path))
    (labels,) = model.graph.output
    assert labels.name == "labels" and labels.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # the boundary stays fp32
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    segmenter = OnnxSegmenter(path, device="cpu")
    image = torch.rand(1, 3, 40, 60)
    one_hot = segmenter(image)
    assert one_hot.shape == (1, 19, 40, 60)
    assert torch.equal(one_hot.argmax(1), torch.from_numpy(segmenter.run(image.numpy())))


def test_legacy_exporter_and_a_failed_check_leaves_nothing(tmp_path, capsys, checkpoint, monkeypatch):
    out = tmp_path / "legacy.onnx"
    code, stdout, err = run(capsys, "export", "--checkpoint", checkpoint, "--onnx", out, "--legacy")
    assert code == 0, err
    assert "legacy" in stdout and "max |Δlogit|" in stdout and "agreement" in stdout
    assert "legacy" in {p.key: p.value for p in onnx.load(str(out)).metadata_props}["diga.exporter"]

    from diga_fast.export import api

    real = api.measure_parity
    monkeypatch.setattr(api, "measure_parity", lambda ref, cand, precision: real(ref, lambda x: cand(x) + 0.5, precision))
    before = out.read_bytes()
    code, _, err = run(capsys, "export", "--checkpoint", checkpoint, "--onnx", out, "--legacy",
                       "--pt2", tmp_path / "bad.pt2")
    assert_one_line_error(code, err, "does not match PyTorch", "file removed")
    assert out.read_bytes() == before  # the earlier good file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["legacy.onnx"]


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["export", "--checkpoint", "{tmp}/junk.safetensors", "--onnx", "{tmp}/a.onnx"], ["not a diga-fast checkpoint"]),
        (["export", "--checkpoint", "{ckpt}", "--onnx", "{tmp}/regular-file/a.onnx"], ["regular-file is not a folder"]),
        (["export", "--checkpoint", "{ckpt}"], ["nothing to export"]),
        (["export", "--checkpoint", "{ckpt}", "--pt2", "{tmp}/a.pt2", "--legacy"], ["--legacy", "--onnx"]),
        (["export", "--checkpoint", "{ckpt}", "--onnx", "{tmp}/a.onnx", "--opset", "17"], ["opset 18 or newer"]),
        (["predict", "--onnx", "{tmp}/junk.onnx", "--images", "{tmp}", "--out", "{tmp}/p"], ["junk.onnx", "not an ONNX model"]),
        (["predict", "--onnx", "{tmp}/plain.onnx", "--images", "{tmp}", "--out", "{tmp}/p"], ["not a diga-fast export"]),
        (["predict", "--onnx", "{tmp}/none.onnx", "--images", "{tmp}", "--out", "{tmp}/p"], ["ONNX model not found"]),
        (["predict", "--onnx", "{tmp}/junk.onnx", "--checkpoint", "{ckpt}", "--images", "{tmp}", "--out", "{tmp}/p"],
         ["exactly one of --checkpoint or --onnx"]),
        (["eval", "--onnx", "{tmp}/junk.onnx", "--checkpoint", "{ckpt}"], ["exactly one of"]),
    ],
)
def test_bad_input_is_one_line(tmp_path, capsys, checkpoint, argv, fragments):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 64)
    (tmp_path / "regular-file").write_text("x")  # no folder can be made under it
    (tmp_path / "junk.onnx").write_bytes(b"this is not a protobuf at all \xff\xfe")
    identity = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])], "g",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 3, 4, 4])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [1, 3, 4, 4])])
    onnx.save(onnx.helper.make_model(identity), str(tmp_path / "plain.onnx"))
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{ckpt}", str(checkpoint)) for a in argv]
    code, _, err = run(capsys, *argv)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "p").exists() and not (tmp_path / "a.onnx").exists() and not (tmp_path / "a.pt2").exists()


def test_runtime_refuses_a_bad_input_shape(exported):
    segmenter = OnnxSegmenter(exported / "model.onnx", device="cpu")
    with pytest.raises(DigaError, match=r"\[B, 3, H, W\]"):
        segmenter.run(np.zeros((1, 4, 32, 32), dtype=np.float32))
    assert segmenter.label_space is CITYSCAPES19 and segmenter.provider == "CPUExecutionProvider"
