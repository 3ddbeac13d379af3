"""Bad input, as a hostile or careless user gives it: one row per case. Each ends in one line on stderr
and exit status 2 (or the documented status), with no traceback, and leaves the files it names in the
state the row says. Every bad input found later becomes a row here."""

import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from cli_helpers import FAST, assert_one_line_error, run, tiny_source_run



@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return tiny_source_run(tmp_path_factory.mktemp("bad-input"))


def _image_folder(root: Path, bad: bool) -> Path:
    from PIL import Image

    root.mkdir(parents=True)
    Image.new("RGB", (40, 24), (120, 30, 200)).save(root / "a.png")
    Image.new("RGB", (40, 24), (20, 130, 60)).save(root / "c.png")
    if bad:
        (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return root


# ------------------------------------------------------------------ recipe values (nothing is written)
RECIPE_ROWS = [
    ("train.iters=-5", "train.iters=-5: must be >= 1"),
    ("train.save_every=0", "train.save_every=0: must be >= 1"),
    ("train.log_every=0", "train.log_every=0: must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
    ("data.crop=[0,0]", "data.crop=[0, 0]: each value must be >= 8"),
    ("data.crop=[-8,16]", "data.crop=[-8, 16]"),
    ("model.dropout=5", "model.dropout=5.0: must be >= 0 and < 1"),
    ("data.eval_scales=[]", "data.eval_scales must not be empty"),
    ("data.source_scale=[1.5,0.5]", "data.source_scale=[1.5, 0.5]"),
    ("optim.lr=0", "optim.lr=0.0: must be > 0"),
    ("self_training.labels=magic", "self_training.labels='magic'"),
    ("data.label_space=coco", "data.label_space='coco'"),
    ("data.crop=[4000,4000]", "larger than any source training image can be"),
]


@pytest.mark.parametrize("override, fragment", RECIPE_ROWS, ids=[r[0] for r in RECIPE_ROWS])
def test_bad_recipe_value_is_one_line_before_anything_is_written(tmp_path, capsys, override, fragment):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--iters", "2", "--out", out, *FAST, override)
    assert_one_line_error(code, err, fragment)
    assert code == 2 and not out.exists()


# ------------------------------------------------------------------ files that must not run or be lost
def test_state_file_with_a_pickled_payload_is_refused_unrun(tmp_path, capsys, trained):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for name in ("config.yaml", "model.safetensors"):
        (run_dir / name).write_bytes((trained / name).read_bytes())
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"step": 1, "extras": Payload()}, run_dir / "state.pt")
    code, _, err = run(capsys, "train", "source", "--resume", "--out", run_dir)
    assert_one_line_error(code, err, "refusing", "nothing in it was run")
    assert not marker.exists()


def test_random_bytes_as_pretrained_weights(tmp_path, capsys):
    weights = tmp_path / "r101.pth"
    weights.write_bytes(os.urandom(4096))
    code, _, err = run(capsys, "train", "source", "--model", "deeplabv2_r50", "--pretrained", weights,
                       "--out", tmp_path / "run", "--iters", "1", *FAST)
    assert_one_line_error(code, err, "is not a PyTorch state dict of tensors")
    assert "weights_only" not in err and not (tmp_path / "run").exists()


def test_failed_final_evaluation_keeps_the_weights(tmp_path, capsys, monkeypatch):
    import diga_fast.stages.common as common

    def broken(*args, **kwargs):
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(common, "evaluate_on_target", broken)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--iters", "2", "--out", out, *FAST)
    assert_one_line_error(code, err, "final evaluation failed", "saved in", f"diga eval --checkpoint {out}")
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2 and (out / "model.safetensors").is_file()
    monkeypatch.undo()
    code, _, err = run(capsys, "eval", "--checkpoint", out, "--synthetic-images", "2")
    assert code == 0, err


# ------------------------------------------------------------------ overwrites
def test_non_empty_out_that_is_no_run_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep")
    code, _, err = run(capsys, "train", "source", "--iters", "1", "--out", out, *FAST)
    assert_one_line_error(code, err, "is not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["thesis.tex"]
    code, _, err = run(capsys, "train", "source", "--iters", "1", "--out", out, "--force", *FAST)
    assert code == 0, err
    assert (out / "thesis.tex").read_text() == "keep" and (out / "eval.json").is_file()


def test_existing_run_and_rounds_inside_it_are_refused(tmp_path, capsys, trained):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    code, _, err = run(capsys, "train", "source", "--iters", "2", "--out", trained, *FAST)
    assert_one_line_error(code, err, "holds a run", "--resume")
    code, _, err = run(capsys, "train", "self", "--init", trained, "--rounds", "2", "--out", trained, *FAST)
    assert_one_line_error(code, err, "is not empty")
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


# ------------------------------------------------------------------ resume
def test_resume_names_the_stage_refuses_ignored_options_and_skips_a_finished_run(tmp_path, capsys, trained):
    code, _, err = run(capsys, "train", "warmup", "--resume", "--out", trained)
    assert_one_line_error(code, err, "is a 'source' run, not a 'warmup' run")
    code, _, err = run(capsys, "train", "source", "--resume", "--out", trained, "--seed", "3", "--target", "synthetic")
    assert_one_line_error(code, err, "--target, --seed cannot change it")
    lines = (trained / "metrics.jsonl").read_text()
    code, _, err = run(capsys, "train", "source", "--resume", "--out", trained)
    assert code == 0 and "already finished" in err
    assert (trained / "metrics.jsonl").read_text() == lines  # no second evaluation record


def test_dataset_roots_are_stored_absolute(tmp_path, capsys, monkeypatch):
    code, _, err = run(capsys, "data", "synth", "--out", tmp_path / "pair", "--train-images", "2", "--val-images", "1")
    assert code == 0, err
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--iters", "1", "--out", out, "--preset", "demo",
                       "--source", "gta5:pair/gta5", "--target", "cityscapes:pair/cityscapes", *FAST)
    assert code == 0, err
    import yaml

    data = yaml.safe_load((out / "config.yaml").read_text())["data"]
    assert data["source"] == f"gta5:{tmp_path / 'pair' / 'gta5'}" and Path(data["target"].split(":", 1)[1]).is_absolute()


# ------------------------------------------------------------------ checkpoints with edited metadata
@pytest.mark.parametrize("edit, fragment", [({"num_classes": "abc"}, "no valid class count"),
                                            ({"arch": None}, "names no known model"),
                                            ({"label_space": "coco"}, "unknown label space")])
def test_edited_checkpoint_metadata(tmp_path, capsys, trained, edit, fragment):
    from safetensors import safe_open

    with safe_open(str(trained / "model.safetensors"), framework="pt") as handle:
        metadata = dict(handle.metadata())
    for key, value in edit.items():
        if value is None:
            metadata.pop(key)
        else:
            metadata[key] = value
    edited = tmp_path / "edited.safetensors"
    save_file(load_file(str(trained / "model.safetensors")), str(edited), metadata=metadata)
    code, _, err = run(capsys, "eval", "--checkpoint", edited, "--synthetic-images", "1")
    assert_one_line_error(code, err, fragment)


# ------------------------------------------------------------------ output paths, checked before work
def test_output_paths_are_checked_before_work(tmp_path, capsys, trained, monkeypatch):
    import diga_fast.inference as inference

    monkeypatch.setattr(inference, "evaluate_model", lambda *a, **k: pytest.fail("evaluated before checking --json"))
    regular = tmp_path / "regular-file"
    regular.write_text("x")  # missing folders are created; a folder under a file cannot be
    code, _, err = run(capsys, "eval", "--checkpoint", trained, "--json", regular / "sub" / "m.json")
    assert_one_line_error(code, err, "--json: cannot create folder", "regular-file is not a folder")
    code, _, err = run(capsys, "centroids", "--checkpoint", trained, "--out", regular / "c.pt", *FAST)
    assert_one_line_error(code, err, "--out: cannot create folder", "regular-file is not a folder")
    assert regular.read_text() == "x"
    used = tmp_path / "labels"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    code, _, err = run(capsys, "pseudo-label", "--checkpoint", trained, "--out", used, *FAST)
    assert_one_line_error(code, err, "is not empty")
    assert sorted(p.name for p in used.iterdir()) == ["notes.txt"]
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = run(capsys, "data", "synth", "--out", blocker / "pair", "--train-images", "1", "--val-images", "1")
    assert_one_line_error(code, err, "cannot create")


# ------------------------------------------------------------------ predict
def test_predict_checks_every_image_first_and_never_reads_its_output(tmp_path, capsys, trained):
    images = _image_folder(tmp_path / "images", bad=True)
    out = tmp_path / "pred"
    code, _, err = run(capsys, "predict", "--checkpoint", trained, "--images", images, "--out", out)
    assert_one_line_error(code, err, "1 of 3 images cannot be read", "b.png", "nothing was written")
    assert not out.exists()
    code, _, err = run(capsys, "predict", "--checkpoint", trained, "--images", images, "--out", out, "--skip-bad")
    assert code == 1 and "skipped" in err and "b.png" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a_color.png", "a_labelIds.png", "c_color.png", "c_labelIds.png"]

    code, _, err = run(capsys, "predict", "--checkpoint", trained, "--images", images, "--out", images)
    assert_one_line_error(code, err, "must not be the --images folder")
    good = _image_folder(tmp_path / "good", bad=False)
    inside = good / "pred"
    for _ in range(2):  # the second run must not predict the first run's outputs
        code, stdout, err = run(capsys, "predict", "--checkpoint", trained, "--images", good, "--out", inside, "--force")
        assert code == 0, err
        assert "for 2 images" in stdout


# ------------------------------------------------------------------ ONNX exports
def test_onnx_with_the_wrong_class_count_is_refused(tmp_path, capsys, trained):
    pytest.importorskip("onnxruntime")
    import onnx

    from diga_fast.labels import SYNTHIA16

    path = tmp_path / "model.onnx"
    code, _, err = run(capsys, "export", "--checkpoint", trained, "--onnx", path)
    assert code == 0, err
    model = onnx.load(str(path))
    table = {"diga.label_space": SYNTHIA16.name, "diga.classes": json.dumps(list(SYNTHIA16.classes)),
             "diga.label_ids": json.dumps([int(i) for i in SYNTHIA16.label_ids]),
             "diga.palette": json.dumps(SYNTHIA16.palette.reshape(-1).tolist())}
    for prop in model.metadata_props:
        if prop.key in table:
            prop.value = table[prop.key]
    onnx.save(model, str(path))
    code, _, err = run(capsys, "eval", "--onnx", path, "--synthetic-images", "1")
    assert_one_line_error(code, err, "logits have 19 channels", "16 classes")


def test_self_training_inputs_need_no_target_ground_truth(tmp_path, capsys, trained):
    import shutil

    code, _, err = run(capsys, "data", "synth", "--out", tmp_path / "pair", "--train-images", "3", "--val-images", "1")
    assert code == 0, err
    shutil.rmtree(tmp_path / "pair" / "cityscapes" / "gtFine" / "train")
    code, _, err = run(capsys, "pseudo-label", "--checkpoint", trained, "--out", tmp_path / "pl", "--preset", "demo",
                       "--target", f"cityscapes:{tmp_path / 'pair' / 'cityscapes'}")
    assert code == 0, err
    assert len(list((tmp_path / "pl" / "labels").rglob("*.png"))) == 3


def test_gta5_list_option_and_skip_bad(tmp_path, capsys):
    from PIL import Image

    code, _, err = run(capsys, "data", "synth", "--out", tmp_path / "pair", "--train-images", "6", "--val-images", "2")
    assert code == 0, err
    gta5, cityscapes = tmp_path / "pair" / "gta5", tmp_path / "pair" / "cityscapes"
    with Image.open(gta5 / "labels" / "00002.png") as label:  # one label of another size, as in GTA5's release
        label.resize((label.width // 2, label.height // 2)).save(gta5 / "labels" / "00002.png")
    base = ("train", "source", "--iters", "1", "--preset", "demo", "--target", f"cityscapes:{cityscapes}", *FAST)
    code, _, err = run(capsys, *base, "--source", f"gta5:{gta5}", "--out", tmp_path / "a", "data.batch_size=6")
    assert_one_line_error(code, err, "00002.png", "data.skip_bad=true")
    code, _, err = run(capsys, *base, "--source", f"gta5:{gta5}", "--out", tmp_path / "b", "data.skip_bad=true")
    assert code == 0 and "left out 1 source images" in err, err
    listing = tmp_path / "good.txt"
    listing.write_text("00000\n00001.png\n00003\n")
    code, _, err = run(capsys, *base, "--source", f"gta5:{gta5}?list={listing}", "--out", tmp_path / "c")
    assert code == 0, err
    code, _, err = run(capsys, *base, "--source", f"gta5:{gta5}?list={tmp_path / 'none.txt'}", "--out", tmp_path / "d")
    assert_one_line_error(code, err, "list file not found")


def test_select_on_val_keeps_the_best_and_later_commands_take_it(tmp_path, capsys):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "source", "--iters", "3", "--out", out, "--select-on-val", *FAST,
                       "train.eval_every=1")
    assert code == 0, err
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = {r["step"]: r["target_val/miou"] for r in records if "target_val/miou" in r}
    best = json.loads((out / "best" / "eval.json").read_text())
    assert set(evaluated) == {1, 2, 3} and best["miou"] == max(evaluated.values())
    assert evaluated[best["step"]] == best["miou"]
    code, stdout, err = run(capsys, "eval", "--checkpoint", out, "--synthetic-images", "3")
    assert code == 0 and "using best/" in err and f"step {best['step']}" in err
    code, _, err = run(capsys, "train", "source", "--iters", "1", "--out", tmp_path / "x", *FAST, "train.select_on_val=true")
    assert_one_line_error(code, err, "needs train.eval_every > 0")
    recipe = yaml.safe_load((out / "config.yaml").read_text())
    assert recipe["train"]["select_on_val"] is True  # what --select-on-val sets


# ------------------------------------------------------------------ faults: config bombs, finished runs
BOMB = "[&a [l,l,l,l,l,l,l,l,l], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], &c [*b,*b,*b,*b,*b,*b,*b,*b,*b], " \
       "&d [*c,*c,*c,*c,*c,*c,*c,*c,*c], &e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]]"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["override", "config file", "run folder config.yaml"])
def test_a_yaml_alias_bomb_is_one_line_at_once(tmp_path, capsys, trained, where):
    """Nested aliases (a few hundred bytes that expand to gigabytes) are refused as they are read,
    wherever a recipe comes from: a KEY=VALUE, --config, or a run folder's config.yaml (--init/--resume)."""
    out = tmp_path / "run"
    if where == "override":
        code, _, err = run(capsys, "train", "source", "--out", out, "--iters", "1", *FAST, f"data.crop={BOMB}")
    elif where == "config file":
        (tmp_path / "bomb.yaml").write_text(f"data:\n  crop: {BOMB}\n")
        code, _, err = run(capsys, "train", "source", "--out", out, "--iters", "1", "--config", tmp_path / "bomb.yaml", *FAST)
    else:
        saved = trained / "config.yaml"
        folder = tmp_path / "init"
        folder.mkdir()
        for weights in trained.glob("*.safetensors"):
            (folder / "student.safetensors").write_bytes(weights.read_bytes())
        (folder / "config.yaml").write_text(saved.read_text() + f"\nbomb: {BOMB}\n")
        code, _, err = run(capsys, "train", "self", "--init", folder, "--out", out, "--iters", "1", *FAST)
    assert_one_line_error(code, err, "aliases")
    assert len(err) < 2000 and not out.exists()


def test_a_finished_run_without_its_state_is_not_overwritten(tmp_path, capsys, trained):
    """state.pt deleted to save space: the weights still make it a run, refused without --force."""
    folder = tmp_path / "done"
    folder.mkdir()
    for path in trained.iterdir():
        if path.is_file() and path.name != "state.pt":
            (folder / path.name).write_bytes(path.read_bytes())
    before = (folder / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "train", "source", "--out", folder, "--iters", "1", *FAST)
    assert_one_line_error(code, err, "a run")
    assert (folder / "model.safetensors").read_bytes() == before
    code, _, err = run(capsys, "train", "source", "--out", folder, "--iters", "1", "--force", *FAST)
    assert code == 0, err


def test_an_image_bomb_is_refused_from_its_header(tmp_path, capsys, trained):
    """A 13000 x 13000 PNG is a few hundred KB but would take tens of GB to segment: refused in one line
    before anything is decoded or written."""
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    Image.new("L", (13000, 13000)).save(images / "bomb.png", optimize=True)
    assert (images / "bomb.png").stat().st_size < 2_000_000
    code, _, err = run(capsys, "predict", "--checkpoint", trained, "--images", images, "--out", tmp_path / "out")
    assert_one_line_error(code, err, "13000x13000", "MP")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_image_bomb_in_a_dataset_is_refused_from_its_header(tmp_path):
    """What evaluation and training read goes through read_rgb: a 13000 x 8000 PNG (104 MP, which Pillow
    only warns about) is one DigaError naming the file, before anything is decoded (a fresh process's
    peak memory grows by far less than the 312 MB of its pixels)."""
    import subprocess
    import sys

    from PIL import Image

    Image.new("RGB", (13000, 8000)).save(tmp_path / "bomb.png", optimize=True)
    probe = (
        "import resource, sys\n"
        "from diga_fast.data.datasets import read_rgb\n"
        "from diga_fast.errors import DigaError\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    read_rgb(sys.argv[1])\n"
        "except DigaError as err:\n"
        "    print(err)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "bomb.png")], capture_output=True, text=True)
    message, grown_kib = done.stdout.splitlines()
    assert "bomb.png: 13000x8000 is 104 MP, more than the 50 MP" in message, done.stdout + done.stderr
    assert int(grown_kib) < 50_000
