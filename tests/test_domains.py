"""More domains (issue 16): BDD100K, Mapillary Vistas, ACDC, Dark Zurich and ``folder:ROOT`` read from
their official layouts (as `diga data synth` writes them), their options and bad input, the Mapillary
class map, `diga eval` over several targets, the warm-up's generalisation table (`--eval-targets`), and
the `paper` sizes of Cityscapes -> ACDC / Dark Zurich."""

import json
import shutil

import numpy as np
import pytest
import torch
from cli_helpers import FAST, assert_one_line_error, run
from PIL import Image

# The hand-written reference of the Mapillary Vistas v1.2 -> Cityscapes map (RobustNet's gen_id_to_ignore):
# (Vistas id, Cityscapes train id) of the 25 ids that map to a class; the other 41 ids are ignored.
MAPPED = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7, 30: 8, 29: 9, 27: 10,
          19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15, 58: 16, 57: 17, 52: 18}
VISTAS_NAMES = [
    "animal--bird", "animal--ground-animal", "construction--barrier--curb", "construction--barrier--fence",
    "construction--barrier--guard-rail", "construction--barrier--other-barrier", "construction--barrier--wall",
    "construction--flat--bike-lane", "construction--flat--crosswalk-plain", "construction--flat--curb-cut",
    "construction--flat--parking", "construction--flat--pedestrian-area", "construction--flat--rail-track",
    "construction--flat--road", "construction--flat--service-lane", "construction--flat--sidewalk",
    "construction--structure--bridge", "construction--structure--building", "construction--structure--tunnel",
    "human--person", "human--rider--bicyclist", "human--rider--motorcyclist", "human--rider--other-rider",
    "marking--crosswalk-zebra", "marking--general", "nature--mountain", "nature--sand", "nature--sky",
    "nature--snow", "nature--terrain", "nature--vegetation", "nature--water", "object--banner", "object--bench",
    "object--bike-rack", "object--billboard", "object--catch-basin", "object--cctv-camera", "object--fire-hydrant",
    "object--junction-box", "object--mailbox", "object--manhole", "object--phone-booth", "object--pothole",
    "object--street-light", "object--support--pole", "object--support--traffic-sign-frame",
    "object--support--utility-pole", "object--traffic-light", "object--traffic-sign--back",
    "object--traffic-sign--front", "object--trash-can", "object--vehicle--bicycle", "object--vehicle--boat",
    "object--vehicle--bus", "object--vehicle--car", "object--vehicle--caravan", "object--vehicle--motorcycle",
    "object--vehicle--on-rails", "object--vehicle--other-vehicle", "object--vehicle--trailer",
    "object--vehicle--truck", "object--vehicle--wheeled-slow", "void--car-mount", "void--ego-vehicle",
    "void--unlabeled"
]
HAND_WRITTEN_ROWS = [(i, name, MAPPED.get(i, 255)) for i, name in enumerate(VISTAS_NAMES)]

KINDS = ("bdd100k", "mapillary", "acdc", "darkzurich", "folder")
JPEG_KINDS = ("bdd100k", "mapillary", "folder")


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """Every layout from `diga data synth` (4 train, 2 val scenes), as a user would have them on disk."""
    root = tmp_path_factory.mktemp("synth")
    from diga_fast.cli.main import main

    try:
        main(["data", "synth", "--out", str(root), "--train-images", "4", "--val-images", "2"])
    except SystemExit as stop:  # pragma: no cover
        assert not stop.code
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A randomly initialised small model (it predicts many classes, so every IoU differs)."""
    from diga_fast.models import build_model
    from diga_fast.models.io import save_weights

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "model.safetensors"
    save_weights(path, build_model("small", 19), "cityscapes19")
    return path


def _spec(root, kind, option=""):
    return f"{kind}:{root / kind}{option}"


def _dataset(spec, split="val", with_labels=True, space=None):
    from diga_fast.data import build_dataset
    from diga_fast.labels import CITYSCAPES19

    return build_dataset(spec, role="target", split=split, label_space=space or CITYSCAPES19, with_labels=with_labels)


# ------------------------------------------------------------------ the Mapillary class map
def test_mapillary_map_is_the_hand_written_one_and_ships_with_the_package():
    from pathlib import Path

    from diga_fast.labels import CITYSCAPES19
    from diga_fast.data.labels import mapillary_lut, mapillary_rows

    assert mapillary_rows() == HAND_WRITTEN_ROWS
    assert mapillary_lut(CITYSCAPES19).tolist() == [MAPPED.get(i, 255) for i in range(66)]
    root = Path(__file__).resolve().parents[1]
    assert "RobustNet" in (root / "diga_fast" / "data" / "mapillary_vistas_v1.2.csv").read_text().split("id,name")[0]
    pyproject = (root / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11)
    package_data = pyproject.split("[tool.setuptools.package-data]\n", 1)[1].split("\n[", 1)[0]
    assert '"diga_fast.data" = ["*.csv"]' in package_data


def test_mapillary_label_with_every_value(tmp_path):
    from diga_fast.labels import SYNTHIA16
    from diga_fast.errors import DigaError

    root = tmp_path / "mapillary"
    (root / "validation" / "images").mkdir(parents=True)
    (root / "validation" / "v1.2" / "labels").mkdir(parents=True)
    values = np.arange(66, dtype=np.uint8).repeat(3).reshape(11, 18)
    Image.new("RGB", (18, 11), (90, 90, 90)).save(root / "validation" / "images" / "every.jpg")
    label = Image.fromarray(values)
    label.putpalette([v for i in range(256) for v in (i, 255 - i, i // 2)])  # a palette PNG, as in the release
    label.save(root / "validation" / "v1.2" / "labels" / "every.png")
    read = _dataset(f"mapillary:{root}").read(0)[1]
    assert read.tolist() == np.array([MAPPED.get(int(v), 255) for v in values.flat]).reshape(11, 18).tolist()
    synthia = _dataset(f"mapillary:{root}", space=SYNTHIA16).read(0)[1]
    assert set(np.unique(synthia[values == 61])) == {255}  # truck: not a SYNTHIA class
    assert set(np.unique(synthia[values == 55])) == {SYNTHIA16.classes.index("car")}
    Image.fromarray(np.where(values == 0, 66, values).astype(np.uint8)).save(root / "validation" / "v1.2" / "labels" / "every.png")
    with pytest.raises(DigaError, match=r"every\.png has id 66, outside the Mapillary Vistas v1.2 label ids 0\.\.65"):
        _dataset(f"mapillary:{root}").read(0)


def test_mapillary_is_read_at_shorter_side_1024(tmp_path):
    root = tmp_path / "mapillary"
    (root / "validation" / "v1.2" / "labels").mkdir(parents=True)
    (root / "validation" / "images").mkdir(parents=True)
    label = np.zeros((1030, 1100), dtype=np.uint8)
    label[:, 550:] = 13  # road on the right half
    Image.new("RGB", (1100, 1030), (10, 200, 30)).save(root / "validation" / "images" / "big.jpg")
    Image.fromarray(label).save(root / "validation" / "v1.2" / "labels" / "big.png")
    image, read = _dataset(f"mapillary:{root}").read(0)
    assert image.shape == (1024, 1094, 3) and read.shape == (1024, 1094)
    assert set(np.unique(read)) == {0, 255}


# ------------------------------------------------------------------ every layout, as written by `diga data synth`
@pytest.mark.parametrize("kind", KINDS)
def test_each_layout_reads_back_the_scenes_written(synth, kind):
    from diga_fast.data.synthetic import render_scene

    val = _dataset(_spec(synth, kind))
    assert len(val) == 2 and len(_dataset(_spec(synth, kind), "train", with_labels=False)) == 4
    for index, name in enumerate(val.names):
        image, label = val.read(index)
        scene_image, scene_label = render_scene("target", "val", index, 0)
        assert np.array_equal(label, scene_label), name
        error = np.abs(image.astype(int) - scene_image).mean()
        assert error < 8 if kind in JPEG_KINDS else error == 0, (name, error)
        with Image.open(val.samples[index].image) as handle:
            assert handle.format == ("JPEG" if kind in JPEG_KINDS else "PNG")


def test_dark_zurich_reads_night_only_and_each_dataset_keeps_its_names(synth):
    night = _dataset(_spec(synth, "darkzurich"), "train", with_labels=False)
    assert all(name.startswith("night/") for name in night.names) and len(night) == 4
    assert (synth / "darkzurich" / "rgb_anon" / "train" / "day").is_dir()
    assert _dataset(_spec(synth, "acdc"), "train").names[0] == "fog/GOPR0001/GOPR0001_frame_000000"


def test_jpeg_and_png_images_in_one_folder(tmp_path, synth):
    bdd = tmp_path / "bdd100k"
    shutil.copytree(synth / "bdd100k", bdd)
    jpeg = bdd / "images" / "10k" / "val" / "00001.jpg"
    Image.open(jpeg).save(jpeg.with_suffix(".png"))
    jpeg.unlink()
    dataset = _dataset(f"bdd100k:{bdd}")
    assert [s.image.suffix for s in dataset.samples] == [".jpg", ".png"]
    assert dataset[1]["image"].shape == (3, 128, 256)


def test_bdd_label_outside_train_ids_is_one_line_naming_the_file(tmp_path, capsys, synth, checkpoint):
    bdd = tmp_path / "bdd100k"
    shutil.copytree(synth / "bdd100k", bdd)
    bad = bdd / "labels" / "sem_seg" / "masks" / "val" / "00001.png"
    label = np.array(Image.open(bad))
    label[0, :3] = 19
    Image.fromarray(label).save(bad)
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--target", f"bdd100k:{bdd}")
    assert_one_line_error(code, err, str(bad), "value 19", "train id 0..18 or 255")


def test_acdc_conditions_and_a_missing_one(tmp_path, capsys, synth, checkpoint):
    from diga_fast.errors import DigaError

    acdc = tmp_path / "acdc"
    shutil.copytree(synth / "acdc", acdc)
    for folder in ("rgb_anon", "gt"):
        shutil.rmtree(acdc / folder / "snow")
    train = _dataset(f"acdc:{acdc}", "train")
    assert sorted({name.split("/")[0] for name in train.names}) == ["fog", "night", "rain"]
    assert _dataset(f"acdc:{acdc}?cond=night", "train").names == ["night/GOPR0001/GOPR0001_frame_000001"]
    assert len(_dataset(f"acdc:{acdc}?train=test", "train", with_labels=False)) == 2  # test: the target's images
    with pytest.raises(DigaError, match="no rgb_anon/snow/train/ folder"):
        _dataset(f"acdc:{acdc}?cond=night,snow", "train")
    code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--target", f"acdc:{acdc}", "--split", "test")
    assert_one_line_error(code, err, "ACDC's test split has no labels")
    for option, fragment in (("?cond=ice", "cond takes distinct conditions"), ("?train=val", "train takes only test"),
                             ("?list=x.txt", "acdc takes ?cond=..., ?train=...")):
        code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--target", f"acdc:{acdc}{option}")
        assert_one_line_error(code, err, fragment)


def test_folder_labels_yaml(tmp_path, synth):
    from diga_fast.errors import DigaError

    root = tmp_path / "camera"
    images, labels = root / "images" / "day", root / "labels" / "day"  # no split folders: every split is all
    images.mkdir(parents=True)
    labels.mkdir(parents=True)
    Image.new("RGB", (9, 7), (1, 2, 3)).save(images / "a.png")
    Image.fromarray(np.array([[0, 1, 2, 255]] * 7, dtype=np.uint8).repeat(3, axis=1)[:, 1:10]).save(labels / "a.png")
    with pytest.raises(DigaError, match="labels.yaml not found"):
        _dataset(f"folder:{root}")
    (root / "labels.yaml").write_text("labels: train_ids\n")
    dataset = _dataset(f"folder:{root}", "train")
    assert dataset.names == ["day/a"] and set(np.unique(dataset.read(0)[1])) == {0, 1, 2, 255}
    (root / "labels.yaml").write_text("labels: {0: 10, 1: 255, 255: 255}\n")
    with pytest.raises(DigaError, match=r"a\.png has value 2, which .*labels\.yaml does not map"):
        _dataset(f"folder:{root}").read(0)
    (root / "labels.yaml").write_text("labels: {0: 10, 1: 19}\n")
    with pytest.raises(DigaError, match="maps to 19, not a Cityscapes train id"):
        _dataset(f"folder:{root}")
    assert "labels:" in (synth / "folder" / "labels.yaml").read_text()  # the synth layout maps label ids


def test_dataset_options_and_several_specs(tmp_path):
    from pathlib import Path

    from diga_fast.config import Recipe, absolute_paths
    from diga_fast.data import parse_dataset_spec, split_dataset_specs
    from diga_fast.errors import DigaError

    assert split_dataset_specs(f"bdd100k:{tmp_path},acdc:{tmp_path}?cond=fog,rain,mapillary:{tmp_path}") == [
        f"bdd100k:{tmp_path}", f"acdc:{tmp_path}?cond=fog,rain", f"mapillary:{tmp_path}"]
    spec = parse_dataset_spec(f"acdc:{tmp_path}?cond=fog,rain&train=test")
    assert spec.conditions == ("fog", "rain") and spec.split("train") == "test" and spec.split("val") == "val"
    assert parse_dataset_spec(str(spec)) == spec
    with pytest.raises(DigaError, match="cityscapes takes no options"):
        parse_dataset_spec(f"cityscapes:{tmp_path}?list=a.txt")
    recipe = Recipe()
    recipe.data.target, recipe.train.eval_targets = "acdc:rel?cond=night", ("folder:rel/x",)
    absolute_paths(recipe)
    assert recipe.data.target == f"acdc:{Path('rel').absolute()}?cond=night"
    assert recipe.train.eval_targets[0].endswith("/rel/x")


# ------------------------------------------------------------------ several targets
def test_eval_several_targets_equals_each_alone(tmp_path, capsys, synth, checkpoint):
    targets = [_spec(synth, "cityscapes"), _spec(synth, "bdd100k"), _spec(synth, "acdc", "?cond=fog")]
    several = tmp_path / "several.json"
    code, out, err = run(capsys, "eval", "--checkpoint", checkpoint, *[arg for t in targets for arg in ("--target", t)],
                         "--json", several)
    assert code == 0, err
    assert "mIoU19" in out and "on 3 targets" in out and "…" not in out  # one table, wide enough
    rows = json.loads(several.read_text())["targets"]
    assert [row["target"] for row in rows] == targets
    for target, row in zip(targets, rows):
        alone = tmp_path / "alone.json"
        code, _, err = run(capsys, "eval", "--checkpoint", checkpoint, "--target", target, "--json", alone)
        assert code == 0, err
        single = json.loads(alone.read_text())
        assert set(single) == {"miou", "iou", "num_classes"}  # one --target: today's shape
        assert {k: v for k, v in row.items() if k != "target"} == single
    assert rows[0]["miou"] != rows[2]["miou"]  # different data, different numbers


def test_eval_several_targets_with_onnx(tmp_path, capsys, monkeypatch, synth, checkpoint):
    """--onnx goes through the same several-target path; the ONNX Runtime session itself is tested in
    test_export.py, so a stand-in session that runs the checkpoint keeps this test fast."""
    from diga_fast.labels import CITYSCAPES19
    from diga_fast.models.io import load_model

    model = load_model(checkpoint)[0].eval()

    class Session:
        provider, returns_labels, label_space, num_classes = "stand-in", False, CITYSCAPES19, CITYSCAPES19.num_classes

        def __init__(self, path, device=None):
            pass

        def __call__(self, images):
            return model(images)[0]

    monkeypatch.setattr("diga_fast.export.runtime.OnnxSegmenter", Session)
    targets = [_spec(synth, "mapillary"), _spec(synth, "darkzurich")]
    via_onnx, via_torch = tmp_path / "onnx.json", tmp_path / "torch.json"
    printed = []
    for option, value, out in (("--onnx", tmp_path / "model.onnx", via_onnx), ("--checkpoint", checkpoint, via_torch)):
        code, stdout, err = run(capsys, "eval", option, value, "--target", targets[0], "--target", targets[1],
                                "--json", out, "--device", "cpu")
        assert code == 0, err
        printed.append(stdout)
    assert "model.onnx (stand-in) on 2 targets" in printed[0]
    onnx_rows = json.loads(via_onnx.read_text())["targets"]
    assert [row["target"] for row in onnx_rows] == targets
    assert onnx_rows == json.loads(via_torch.read_text())["targets"]


# ------------------------------------------------------------------ training: generalisation table, Cityscapes -> ACDC
def test_warmup_generalisation_table_and_cityscapes_to_acdc(tmp_path, capsys, synth):
    out = tmp_path / "warmup"
    others = [_spec(synth, "bdd100k"), _spec(synth, "darkzurich")]
    code, stdout, err = run(capsys, "train", "warmup", "--source", _spec(synth, "cityscapes"), "--target",
                            _spec(synth, "acdc", "?cond=fog,night"), "--preset", "demo", "--iters", "2", "--out", out,
                            "--eval-targets", ",".join(others), *FAST, "train.eval_every=1", "train.select_on_val=true")
    assert code == 0, err
    final = json.loads((out / "eval.json").read_text())
    assert [row["target"] for row in final["targets"]] == [_spec(synth, "acdc", "?cond=fog,night"), *others]
    assert final["targets"][0]["miou"] == final["miou"]
    assert "val IoU % of the target and every train.eval_targets dataset" in stdout
    assert len(json.loads((out / "best" / "eval.json").read_text())["targets"]) == 3  # selection evaluates them too
    code, _, err = run(capsys, "train", "self", "--init", out, "--source", _spec(synth, "cityscapes"), "--target",
                       _spec(synth, "acdc", "?cond=fog,night"), "--preset", "demo", "--iters", "1",
                       "--out", tmp_path / "self", *FAST)
    assert code == 0, err
    assert len(list((tmp_path / "self" / "pseudo_labels" / "labels").glob("fog/GOPR0001/*.png"))) == 1


def test_bad_eval_target_stops_before_the_run_folder(tmp_path, capsys, synth):
    out = tmp_path / "run"
    code, _, err = run(capsys, "train", "warmup", "--iters", "1", "--out", out, *FAST,
                       "--eval-targets", f"{_spec(synth, 'bdd100k')},mapillary:{tmp_path / 'nowhere'}")
    assert_one_line_error(code, err, "dataset folder not found", "nowhere")
    assert not (out / "config.yaml").exists()


def test_paper_preset_of_cityscapes_to_adverse_targets():
    from diga_fast.config import preset_recipe

    for target in ("acdc:A", "darkzurich:D"):
        recipe = preset_recipe("paper", "warmup", "cityscapes:C", target)
        data = recipe.data
        assert (data.source_resize, data.target_resize, data.crop, data.batch_size) == ((512, 1024), (540, 960), (512, 512), 2)
        assert data.source_sizes is None and data.source_scale is None and data.eval_scales == (0.5,)
        assert recipe.train.iters == 40_000 and recipe.model.arch == "deeplabv2_r101"
    assert preset_recipe("paper", "translator", "cityscapes:C", "acdc:A").train.iters == 50_000
    assert preset_recipe("paper", "warmup", "gta5:G", "acdc:A").data.source_sizes is not None  # only these pairs
