"""The whole pipeline on the real folder layouts (tiny generated GTA5 / SYNTHIA / Cityscapes folders):
translator training, translating the source once (`diga data translate`), warm-up with the ``folder``
translator, self-training, and SYNTHIA's OHEM source loss; plus their bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import assert_one_line_error, run

FAST = ("data.batch_size=2", "data.num_workers=0", "data.crop=[48, 96]", "train.log_every=1",
        "warmup.visualize_every=0")


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    """gta5/, synthia/ and cityscapes/ from `diga data synth` (4 train, 2 val images), as a user would
    have them on disk."""
    from diga_fast.cli.main import main

    root = tmp_path_factory.mktemp("layouts")
    try:
        main(["data", "synth", "--out", str(root), "--train-images", "4", "--val-images", "2"])
    except SystemExit as stop:  # pragma: no cover
        assert not stop.code
    return root


def _real(root, source="gta5"):
    return ("--source", f"{source}:{root / source}", "--target", f"cityscapes:{root / 'cityscapes'}", "--preset", "demo")


def test_translator_translate_warmup_self_on_gta5_and_cityscapes_folders(tmp_path, capsys, layouts):
    code, _, err = run(capsys, "train", "translator", *_real(layouts), "--out", tmp_path / "translator", "--iters", "2",
                       "data.batch_size=2", "data.num_workers=0", "translator.crop=[32, 64]")
    assert code == 0, err

    translated = tmp_path / "translated"
    code, out, err = run(capsys, "data", "translate", "--translator", tmp_path / "translator",
                         "--source", f"gta5:{layouts / 'gta5'}", "--out", translated)
    assert code == 0, err
    assert "wrote 4 translated images" in out
    for name in ("00000", "00003"):
        source = np.asarray(Image.open(layouts / "gta5" / "images" / f"{name}.png"))
        assert np.asarray(Image.open(translated / f"{name}.png")).shape == source.shape
    code, out, err = run(capsys, "data", "translate", "--translator", tmp_path / "translator",
                         "--source", f"gta5:{layouts / 'gta5'}", "--out", translated)
    assert code == 0 and "wrote 0 translated images" in out  # existing files are kept: resumable

    warmup = tmp_path / "warmup"
    code, _, err = run(capsys, "train", "warmup", *_real(layouts), "--out", warmup, "--iters", "2", *FAST,
                       "translator.kind=folder", f"translator.folder={translated}")
    assert code == 0, err
    assert json.loads((warmup / "eval.json").read_text())["num_classes"] == 19

    self_run = tmp_path / "self"
    code, _, err = run(capsys, "train", "self", "--init", warmup, *_real(layouts), "--out", self_run, "--iters", "2",
                       *FAST, "translator.kind=folder", f"translator.folder={translated}")
    assert code == 0, err
    assert len(list((self_run / "pseudo_labels" / "labels").rglob("*.png"))) == 4  # one per Cityscapes train image
    assert (self_run / "centroids.pt").is_file()


def test_synthia_warmup_and_self_training_use_ohem(tmp_path, capsys, layouts):
    common = (*_real(layouts, "synthia"), *FAST, "data.label_space=synthia16", "train.source_loss=ohem",
              "train.ohem_min_kept=500")
    warmup = tmp_path / "warmup"
    code, _, err = run(capsys, "train", "warmup", "--out", warmup, "--iters", "2", *common)
    assert code == 0, err
    assert json.loads((warmup / "eval.json").read_text())["num_classes"] == 16
    code, _, err = run(capsys, "train", "self", "--init", warmup, "--out", tmp_path / "self", "--iters", "1", *common)
    assert code == 0, err


def test_folder_translator_bad_input(tmp_path, capsys, layouts):
    folder = tmp_path / "partial"
    folder.mkdir()
    for name in ("00000", "00001", "00002"):  # 00003 is missing
        Image.open(layouts / "gta5" / "images" / f"{name}.png").save(folder / f"{name}.jpg")
    cases = [
        (["translator.kind=folder", f"translator.folder={folder}"], ["no translated image for 1 of 4", "00003"]),
        (["translator.kind=folder"], ["translator.folder"]),
        (["translator.kind=folder", f"translator.folder={tmp_path / 'nowhere'}"], ["does not exist"]),
        (["translator.kind=magic"], ["translator.kind", "folder"]),
        (["train.source_loss=focal"], ["train.source_loss", "ohem"]),
    ]
    for index, (overrides, fragments) in enumerate(cases):
        out = tmp_path / f"run{index}"
        code, _, err = run(capsys, "train", "warmup", *_real(layouts), "--out", out, "--iters", "1", *FAST, *overrides)
        assert_one_line_error(code, err, *fragments)
        assert not (out / "state.pt").exists() and not (out / "config.yaml").exists()
    code, _, err = run(capsys, "data", "translate", "--translator", tmp_path / "none", "--out", tmp_path / "t")
    assert_one_line_error(code, err, "translator checkpoint not found")


# -- the pairing itself ------------------------------------------------------------------------------


def _inverted_folder(dataset, folder, scale=1):
    folder.mkdir()
    for index, name in enumerate(dataset.names):
        image, _ = dataset.read(index)
        inverted = Image.fromarray(255 - image)
        if scale != 1:
            inverted = inverted.resize((image.shape[1] * scale, image.shape[0] * scale), Image.Resampling.NEAREST)
        inverted.save(folder / f"{name}.png")


@pytest.mark.parametrize("scale", [1, 2])
def test_translated_images_get_the_same_crop_rescale_and_flip(tmp_path, layouts, scale):
    """With the translated image = 255 - source, every transformed pair must still sum to 255 (up to
    resampling rounding), whatever crop, rescale and flip were drawn; a translation stored at twice
    the size is resized back first."""
    from diga_fast.data import build_dataset
    from diga_fast.labels import CITYSCAPES19
    from diga_fast.data.loader import InfiniteLoader
    from diga_fast.data.transforms import train_transform
    from diga_fast.data.translated import TranslatedSource

    transform = train_transform(resize=None, crop=(40, 72), scale=(0.5, 1.5), flip=True, content_retry=True)
    gta5 = build_dataset(f"gta5:{layouts / 'gta5'}", role="source", split="train", label_space=CITYSCAPES19,
                         transform=transform)
    _inverted_folder(gta5, tmp_path / "inv", scale)
    paired = TranslatedSource(gta5, tmp_path / "inv")
    loader = InfiniteLoader(paired, batch_size=2, shuffle=True, seed=3)
    plain = InfiniteLoader(gta5, batch_size=2, shuffle=True, seed=3)
    for _ in range(4):
        batch, reference = next(loader), next(plain)
        assert torch.equal(batch["image"], reference["image"]) and torch.equal(batch["label"], reference["label"])
        error = (batch["image"] + batch["translated"] - 1.0).abs()
        mirrored = (batch["image"] + batch["translated"].flip(-1) - 1.0).abs()  # what a flip of one only gives
        assert error.mean() * 255 < 2.0 and mirrored.mean() * 255 > 10.0  # measured: <= 1.4 vs >= 22
        if scale == 1:  # only resampling rounding; a stored 2x translation also differs at edges
            assert error.max() * 255 <= 2.0 + 1e-4


def test_translated_image_of_another_aspect_ratio_is_refused(tmp_path, layouts):
    from diga_fast.data import build_dataset
    from diga_fast.labels import CITYSCAPES19
    from diga_fast.data.translated import TranslatedSource
    from diga_fast.errors import DigaError

    gta5 = build_dataset(f"gta5:{layouts / 'gta5'}", role="source", split="train", label_space=CITYSCAPES19)
    folder = tmp_path / "square"
    folder.mkdir()
    for name in gta5.names:
        Image.new("RGB", (64, 64)).save(folder / f"{name}.png")
    with pytest.raises(DigaError, match="another aspect ratio"):
        TranslatedSource(gta5, folder)[0]


def test_data_synth_real_sizes_writes_every_layout_at_the_real_datasets_sizes(tmp_path, capsys):
    """`diga data synth --real-sizes`: GTA5 at 1914x1052, SYNTHIA at 1280x760 (16-bit labels), Cityscapes at
    2048x1024, each read back by its loader with labels of the image's size."""
    from diga_fast.data import build_dataset
    from diga_fast.labels import CITYSCAPES19, SYNTHIA16

    code, out, err = run(capsys, "data", "synth", "--out", tmp_path, "--train-images", "1", "--val-images", "1",
                         "--real-sizes")
    assert code == 0, err
    for kind, split, space, size in (("gta5", "train", CITYSCAPES19, (1052, 1914)), ("synthia", "train", SYNTHIA16, (760, 1280)),
                                     ("cityscapes", "val", CITYSCAPES19, (1024, 2048))):
        dataset = build_dataset(f"{kind}:{tmp_path / kind}", role="source" if kind != "cityscapes" else "target",
                                split=split, label_space=space, transform=None)
        image, label = dataset.read(0)
        assert image.shape == (*size, 3) and label.shape == size, kind
        assert len(set(label.ravel().tolist()) - {255}) >= 3, kind  # a scene, not a blank
