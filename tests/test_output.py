"""What a newcomer sees (issue 17, output and hygiene): progress on every long loop, bars and headers
readable at 80 columns, one mIoU row, titled image grids, help texts, the val size `diga eval` uses,
and output files whose missing folders are created."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

import diga_fast.engine.logging as logging_module
from diga_fast.config import DataConfig, preset_recipe
from diga_fast.labels import CITYSCAPES19, SYNTHIA16
from diga_fast.data.synthetic import SyntheticDomain
from diga_fast.engine.logging import progress_bar, progress_callback, save_grid
from diga_fast.cli.tables import iou_table
from diga_fast.metrics import ConfusionMatrix, summarize

from cli_helpers import FAST, TINY, assert_one_line_error, run, tiny_source_run

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_source_run(tmp_path_factory.mktemp("output"))


@pytest.fixture
def terminal80(monkeypatch):
    """The bars' console as an 80-column terminal; returns a function giving the lines drawn so far."""
    buffer = io.StringIO()
    monkeypatch.setattr(logging_module, "console", Console(file=buffer, width=80, force_terminal=True, color_system=None))

    def lines():
        return [line for line in re.split(r"[\r\n]", ANSI.sub("", buffer.getvalue())) if line.strip()]

    return lines


# ------------------------------------------------------------------ progress bars at 80 columns
def test_bar_keeps_count_rate_and_eta_whole_at_80_columns(terminal80):
    with progress_bar(4000, "self-training") as tick:
        tick(1234, loss=0.7603, loss_dist=0.0123)
        tick(1600, loss=0.7603, loss_dist=0.0123)
    last = terminal80()[-1]
    assert len(last) <= 80
    assert last.startswith("self-training ")
    assert "1600/4000" in last and re.search(r"\d+\.\d\d it/s", last) and re.search(r"ETA \d:\d\d:\d\d", last), last
    assert "loss 0." in last  # the values are what gets cut, from the right


def test_a_loop_inside_a_bar_is_a_second_line_then_goes(terminal80):
    with progress_bar(10, "warm-up") as tick:
        tick(5, loss=1.0)
        with progress_callback("eval") as progress:
            for done in range(1, 201):
                progress(done, 200)
            assert len(logging_module._live.tasks) == 2
            logging_module._live.refresh()
        assert len(logging_module._live.tasks) == 1
        tick(10, loss=1.0)
    assert logging_module._live is None
    drawn = terminal80()
    assert any(line.startswith("eval ") and "200/200" in line and "img/s" in line for line in drawn), drawn
    assert all(len(line) <= 80 for line in drawn)


def test_plain_lines_when_not_a_terminal(monkeypatch):
    buffer = io.StringIO()
    monkeypatch.setattr(logging_module, "console", Console(file=buffer, width=80, force_terminal=False))
    with progress_callback("pseudo-labels") as progress:
        for done in range(1, 21):
            progress(done, 20)
    lines = buffer.getvalue().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("pseudo-labels: 20/20") and "img/s" in lines[-1]
    buffer.truncate(0)
    buffer.seek(0)
    with progress_bar(4, "source") as tick:  # nested loops print nothing into a log
        with progress_callback("eval") as progress:
            progress(3, 3)
        tick(4)
    assert [line.split(":")[0] for line in buffer.getvalue().splitlines()] == ["source"]


# ------------------------------------------------------------------ progress reaches every long loop
def _tiny_model():
    from diga_fast.models import build_model

    torch.manual_seed(0)
    return build_model("small", CITYSCAPES19.num_classes).eval()


def test_evaluation_centroids_and_pseudo_labels_report_progress(tmp_path):
    from diga_fast.inference import evaluate_model, predict_folder
    from diga_fast.method.centroids import initial_centroids
    from diga_fast.method.pseudo_labels import generate_probability_labels

    model, cpu = _tiny_model(), torch.device("cpu")
    val = SyntheticDomain("target", "val", 3)
    calls = []
    with_progress = evaluate_model(model, val, CITYSCAPES19, cpu, progress=lambda *a: calls.append(a))
    assert calls == [(1, 3), (2, 3), (3, 3)]
    assert with_progress == evaluate_model(model, val, CITYSCAPES19, cpu)  # the numbers do not change

    calls.clear()
    train = SyntheticDomain("target", "train", 2, with_labels=False)
    centroids, _ = initial_centroids(model, train, cpu, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]
    assert torch.equal(centroids, initial_centroids(model, train, cpu)[0])

    calls.clear()
    generate_probability_labels(model, train, tmp_path / "labels", CITYSCAPES19, cpu, progress=lambda *a: calls.append(a))
    assert calls == [(1, 2), (2, 2)]

    calls.clear()
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a", "b"):
        Image.new("RGB", (40, 24), (120, 30, 200)).save(images / f"{name}.png")
    predict_folder(model, images, tmp_path / "pred", CITYSCAPES19, cpu, progress=lambda *a: calls.append(a))
    assert calls[-1] == (2, 2) and calls[0] == (0, 2)


def test_eval_and_labelling_commands_show_progress(tmp_path, capsys, trained):
    code, _, err = run(capsys, "eval", "--checkpoint", trained, "--synthetic-images", "2")
    assert code == 0 and "eval: 2/2" in err
    code, _, err = run(capsys, "centroids", "--checkpoint", trained, "--out", tmp_path / "c.pt", *FAST)
    assert code == 0 and "centroids: 8/8" in err
    code, _, err = run(capsys, "pseudo-label", "--checkpoint", trained, "--out", tmp_path / "pl", *FAST)
    assert code == 0 and "pseudo-labels: 8/8" in err


# ------------------------------------------------------------------ the mIoU table
def _summary(space):
    target = torch.arange(space.num_classes).repeat_interleave(4)
    pred = target.clone()
    pred[::3] = 0
    matrix = ConfusionMatrix(space.num_classes)
    matrix.update(pred, target)
    return summarize(matrix, space)


def _render(renderable) -> str:
    console = Console(record=True, width=80, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_one_row_per_mean_and_a_title_that_wraps_between_words():
    title = "student on target val (synthetic) after 4000 warm-up iterations, seed 0, demo preset"
    text = _render(iou_table(_summary(CITYSCAPES19), title=title))
    rows = [line for line in text.splitlines() if "mIoU" in line]
    assert len(rows) == 1 and "mIoU19" in rows[0], text
    lines = text.splitlines()
    assert " ".join(lines[:2]).split() == title.split()  # wrapped once, at a space, words whole
    assert all(len(line) <= 80 for line in lines)

    synthia = _render(iou_table(_summary(SYNTHIA16)))
    rows = [line.split()[1] for line in synthia.splitlines() if "mIoU" in line]
    assert rows == ["mIoU16", "mIoU13"]


# ------------------------------------------------------------------ titled image grids
def test_grid_has_a_header_strip_with_one_title_per_column(tmp_path):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(2, 3, 32, 64, generator=g) for _ in range(2)]
    labels = [torch.randint(0, 19, (2, 16, 32), generator=g) for _ in range(2)]
    save_grid(tmp_path / "g.png", CITYSCAPES19, images, labels, titles=["target", "mix", "probability labels", "x"])
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    strip = grid.shape[0] - 2 * 32
    assert grid.shape[1] == 4 * 64 and 8 <= strip <= 40
    for column in range(4):  # dark text drawn over each column's white strip
        assert (grid[:strip, column * 64:(column + 1) * 64] < 128).any()
    save_grid(tmp_path / "plain.png", CITYSCAPES19, images, labels)
    assert np.asarray(Image.open(tmp_path / "plain.png")).shape[0] == 2 * 32
    with pytest.raises(ValueError, match="titles"):
        save_grid(tmp_path / "bad.png", CITYSCAPES19, images, labels, titles=["one"])


def test_warmup_and_self_training_grids_name_their_columns(tmp_path, capsys, monkeypatch):
    import diga_fast.stages.self_training as self_training
    import diga_fast.stages.warmup as warmup

    seen = {}
    for module in (warmup, self_training):
        monkeypatch.setattr(module, "save_grid", lambda path, *a, module=module, **k: seen.setdefault(module.__name__, k["titles"]))
    grids = (*TINY, "data.crop=[48, 96]", "warmup.visualize_every=1")
    code, _, err = run(capsys, "train", "warmup", "--iters", "1", "--out", tmp_path / "w", *grids)
    assert code == 0, err
    code, _, err = run(capsys, "train", "self", "--init", tmp_path / "w", "--iters", "1", "--out", tmp_path / "s", *grids)
    assert code == 0, err
    assert seen[warmup.__name__] == ["source", "strong view", "translation", "CrDoMix", "ground truth", "prediction"]
    assert seen[self_training.__name__] == ["target", "mix", "probability labels", "feature labels", "consensus",
                                            "mixed label", "prediction"]
    assert "pseudo-labels: 8/8" in err and "centroids: 8/8" in err


# ------------------------------------------------------------------ the demo checks its arguments first
@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--rounds", "2", "foo"], ["foo"]),
        (["train.iters=0"], ["train.iters"]),
        (["--device", "nonsense"], ["--device", "nonsense"]),
    ],
)
def test_demo_checks_every_argument_before_the_first_stage(tmp_path, capsys, argv, fragments):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo", *argv)
    assert_one_line_error(code, err, *fragments)
    assert len([line for line in err.splitlines() if line.strip()]) == 1 and out == ""
    assert not (tmp_path / "demo").exists()


def test_demo_refuses_a_file_as_its_folder(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    code, _, err = run(capsys, "demo", "--out", tmp_path / "f")
    assert_one_line_error(code, err, "is a file")  # click's own check
    code, _, err = run(capsys, "demo", "--out", tmp_path / "f" / "demo")
    assert_one_line_error(code, err, "cannot create folder")
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ one val size everywhere
def test_eval_and_data_synth_use_the_training_val_size(tmp_path, capsys, trained, monkeypatch):
    import diga_fast.stages.evaluation as evaluation
    from diga_fast.errors import DigaError

    assert preset_recipe("demo", "self").data.synthetic_val_images == DataConfig.synthetic_val_images == 200
    sizes = []

    def record(*args, **kwargs):
        sizes.append((kwargs["split"], kwargs.get("synthetic_images")))
        raise DigaError("stop here")

    import shutil

    import yaml

    monkeypatch.setattr(evaluation, "build_dataset", record)
    run(capsys, "eval", "--checkpoint", trained)  # a run: its own sizes
    run(capsys, "eval", "--checkpoint", trained, "--split", "train")
    data = yaml.safe_load((trained / "config.yaml").read_text())["data"]
    bare = tmp_path / "model.safetensors"  # a weight file outside a run: the training defaults
    shutil.copy(trained / "model.safetensors", bare)
    run(capsys, "eval", "--checkpoint", bare)
    run(capsys, "eval", "--checkpoint", bare, "--split", "train")
    assert sizes == [("val", data["synthetic_val_images"]), ("train", data["synthetic_train_images"]),
                     ("val", DataConfig.synthetic_val_images), ("train", DataConfig.synthetic_train_images)]
    _, help_text, _ = run(capsys, "data", "synth", "--help")
    assert f"default: {DataConfig.synthetic_val_images}" in " ".join(help_text.split())


# ------------------------------------------------------------------ help texts
def test_help_texts(capsys):
    _, text, _ = run(capsys, "bench", "train", "--help")
    assert "of the issue" not in text
    _, text, _ = run(capsys, "demo", "--help")
    flat = " ".join(text.split())
    assert "train.iters=N sets the length of every stage" in flat and "source-only" in flat
    device = flat[flat.index("--device"):flat.index("--seed")]
    seed = flat[flat.index("--seed"):flat.index("--rounds")]
    assert "cpu, cuda" in device and "Seed of every stage" in seed
    _, text, _ = run(capsys, "train", "translator", "--help")
    assert "--model" not in text and "--pretrained" not in text and "--iters" in text
    _, text, _ = run(capsys, "train", "warmup", "--help")
    assert "--model" in text and "--pretrained" in text


# ------------------------------------------------------------------ output folders are created
def test_missing_output_folders_are_created(tmp_path, capsys, trained):
    code, _, err = run(capsys, "eval", "--checkpoint", trained, "--synthetic-images", "1", "--json", tmp_path / "a" / "b" / "m.json")
    assert code == 0, err
    assert (tmp_path / "a" / "b" / "m.json").is_file()
    code, _, err = run(capsys, "centroids", "--checkpoint", trained, "--out", tmp_path / "c" / "d" / "c.pt", *FAST)
    assert code == 0, err
    assert (tmp_path / "c" / "d" / "c.pt").is_file()
    code, _, err = run(capsys, "eval", "--checkpoint", trained, "--json", tmp_path / "a")
    assert_one_line_error(code, err, "is a directory")  # click checks that one itself


def test_export_creates_the_folder_of_its_file(tmp_path, capsys, trained):
    pytest.importorskip("onnxruntime")
    code, out, err = run(capsys, "export", "--checkpoint", trained, "--onnx", tmp_path / "new" / "dir" / "m.onnx")
    assert code == 0, err
    assert (tmp_path / "new" / "dir" / "m.onnx").is_file()
    assert sorted(p.name for p in (tmp_path / "new" / "dir").iterdir()) == ["m.onnx"]  # no temporary left


def test_data_synth_shows_progress(tmp_path, capsys):
    code, _, err = run(capsys, "data", "synth", "--out", tmp_path / "pair", "--train-images", "2", "--val-images", "1")
    assert code == 0 and "writing: 7/7" in err
