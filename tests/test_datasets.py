"""Real-dataset loaders on tiny generated folders in each layout, their errors, 16-bit PNG reading,
image-folder conversions, and the seeded loaders."""

import struct
import sys
import zlib
from pathlib import Path

import cv2  # the synthia extra (in the test extra): 16-bit colour PNGs
import numpy as np
import pytest
import torch
from PIL import Image

from diga_fast.data.datasets import GTA5, Cityscapes, ImageFolder, Synthia, read_png, split_names
from diga_fast.labels import CITYSCAPES19, SYNTHIA16
from diga_fast.data.layouts import (
    synthia_id_from_class,
    write_cityscapes_layout,
    write_gta5_layout,
    write_png,
    write_synthia_layout,
)
from diga_fast.data.loader import InfiniteLoader
from diga_fast.data.transforms import train_transform
from diga_fast.errors import DigaError

H, W = 24, 40


def _samples(num_classes, n=3, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        label = rng.integers(0, num_classes, (H, W)).astype(np.uint8)
        label[:2] = 255
        out.append((f"{i:05d}", image, label))
    return out


@pytest.fixture
def gta5(tmp_path):
    samples = _samples(19)
    write_gta5_layout(tmp_path / "gta5", samples)
    return tmp_path / "gta5", samples


@pytest.fixture
def synthia(tmp_path):
    samples = _samples(16)
    write_synthia_layout(tmp_path / "synthia", samples)
    return tmp_path / "synthia", samples


@pytest.fixture
def cityscapes(tmp_path):
    samples = _samples(19)
    names = write_cityscapes_layout(tmp_path / "cs", "val", samples)
    return tmp_path / "cs", samples, names


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DigaError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- reading each layout back ----------------------------------------------------------------------

def test_gta5_roundtrip(gta5):
    root, samples = gta5
    dataset = GTA5(root)
    assert len(dataset) == 3 and dataset.names == ["00000", "00001", "00002"]
    item = dataset[1]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert np.array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(), samples[1][1])
    assert item["label"].dtype == torch.int64 and np.array_equal(item["label"].numpy(), samples[1][2])
    assert item["name"] == "00001" and item["size"].tolist() == [H, W]
    assert Image.open(root / "labels" / "00000.png").mode == "P"  # like the GTA5 release
    assert "label" not in GTA5(root, with_labels=False)[0]


def test_cityscapes_label_ids_map_to_train_ids(cityscapes):
    root, _, names = cityscapes
    ids = np.zeros((H, W), np.uint8)
    ids[:, 10:20] = 26  # car
    ids[:, 20:30] = 7  # road
    ids[:, 30:] = 4  # "static": not a class
    Image.fromarray(ids).save(root / "gtFine/val/synthcity/synthcity_000000_000019_gtFine_labelIds.png")
    label = Cityscapes(root, "val")[0]["label"]
    assert (label[:, :10] == 255).all() and (label[:, 10:20] == 13).all()
    assert (label[:, 20:30] == 0).all() and (label[:, 30:] == 255).all()
    label16 = Cityscapes(root, "val", label_space=SYNTHIA16)[0]["label"]
    assert (label16[:, 10:20] == 12).all()  # car is index 12 of the 16 classes


def test_cityscapes_roundtrip_names_and_splits(cityscapes):
    root, samples, names = cityscapes
    dataset = Cityscapes(root, "val")
    assert dataset.names == names == [f"synthcity/synthcity_{i:06d}_000019" for i in range(3)]
    assert np.array_equal(dataset[2]["label"].numpy(), samples[2][2])
    assert (root / "gtFine/val/synthcity/synthcity_000000_000019_gtFine_color.png").is_file()
    write_cityscapes_layout(root, "test", [(image, None) for _, image, _ in samples[:2]], city="bonn")
    test = Cityscapes(root, "test", with_labels=False)
    assert test.names == ["bonn/bonn_000000_000019", "bonn/bonn_000001_000019"]
    assert "label" not in test[0]


def test_cityscapes_pseudo_labels(cityscapes, tmp_path):
    root, _, names = cityscapes
    pseudo = tmp_path / "pseudo"
    for k, name in enumerate(names):
        (pseudo / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((H, W), k, np.uint8)).save(pseudo / f"{name}.png")
    dataset = Cityscapes(root, "val", pseudo_label_dir=pseudo)
    assert (dataset[2]["label"] == 2).all()
    Image.fromarray(np.full((H, W), 19, np.uint8)).save(pseudo / f"{names[1]}.png")
    message = _error(dataset.__getitem__, 1)
    assert names[1] in message and "19" in message


def test_synthia_16bit_labels_map_by_class_name(synthia):
    root, samples = synthia
    dataset = Synthia(root)
    assert np.array_equal(dataset[0]["label"].numpy(), samples[0][2])
    raw = read_png(root / "GT" / "LABELS" / "00000.png")
    assert raw.dtype == np.uint16 and raw.shape == (H, W, 3)
    # SYNTHIA id 8 is car: index 12 of SYNTHIA16, index 13 of CITYSCAPES19; id 0 (void) -> 255.
    ids = np.zeros((H, W, 3), np.uint16)
    ids[:, :20, 0] = 8
    ids[:, :, 1] = 300  # instance ids live in the second channel
    write_png(root / "GT" / "LABELS" / "00001.png", ids)
    label = Synthia(root)[1]["label"]
    assert (label[:, :20] == 12).all() and (label[:, 20:] == 255).all()
    assert (Synthia(root, label_space=CITYSCAPES19)[1]["label"][:, :20] == 13).all()
    # 8-bit single-channel SYNTHIA labels (a common conversion) read too.
    Image.fromarray(ids[:, :, 0].astype(np.uint8)).save(root / "GT" / "LABELS" / "00002.png")
    assert (Synthia(root)[2]["label"][:, :20] == 12).all()


def test_synthia_writer_maps_cityscapes19_classes_by_name(tmp_path):
    label = np.array([[13, 9, 14, 255]], np.uint8)  # car, terrain, truck, ignore (19-class indices)
    table = synthia_id_from_class(CITYSCAPES19)
    assert table[label].tolist() == [[8, 0, 0, 0]]


def test_gta5_list_file_and_split(gta5, tmp_path):
    root, _ = gta5
    list_file = tmp_path / "train_modified.txt"
    list_file.write_text("00002.png\n\n# a comment\nimages/00000.png\n")
    assert GTA5(root, list_file=list_file).names == ["00002", "00000"]
    list_file.write_text("00007.png\n")
    message = _error(GTA5, root, list_file=list_file)
    assert str(list_file) in message and "00007" in message
    names = [f"{i:05d}" for i in range(200)]
    train, val = split_names(names, "train"), split_names(names, "val")
    assert sorted(train + val) == names and not set(train) & set(val) and 0 < len(val) < 40
    assert split_names(names, "val") == val
    assert "bogus" in _error(GTA5, root, split="bogus")


# -- errors ----------------------------------------------------------------------------------------

def test_missing_roots_and_folders(tmp_path, gta5, synthia, cityscapes):
    missing = tmp_path / "nowhere"
    for cls in (GTA5, Synthia, Cityscapes, ImageFolder):
        assert str(missing) in _error(cls, missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "images/" in _error(GTA5, empty) and str(empty) in _error(GTA5, empty)
    assert "RGB/" in _error(Synthia, empty)
    assert "leftImg8bit/train/" in _error(Cityscapes, empty)
    assert "gtFine/val/" in _error(Cityscapes, _no_gt(cityscapes[0]), "val")
    (empty / "images").mkdir()
    assert "labels/" in _error(GTA5, empty)
    (empty / "labels").mkdir()
    assert "no .png images" in _error(GTA5, empty)
    (tmp_path / "empty_folder").mkdir()
    assert "no images" in _error(ImageFolder, tmp_path / "empty_folder")


def _no_gt(root: Path) -> Path:
    other = root.parent / "cs_no_gt"
    (other / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    image = other / "leftImg8bit/val/x/x_000000_000019_leftImg8bit.png"
    Image.fromarray(np.zeros((H, W, 3), np.uint8)).save(image)
    return other


def test_image_without_label(gta5, synthia, cityscapes):
    (gta5[0] / "labels" / "00001.png").unlink()
    message = _error(GTA5, gta5[0])
    assert "00001.png" in message and "no label" in message
    (synthia[0] / "GT" / "LABELS" / "00002.png").unlink()
    assert "00002.png" in _error(Synthia, synthia[0])
    (cityscapes[0] / "gtFine/val/synthcity/synthcity_000001_000019_gtFine_labelIds.png").unlink()
    assert "synthcity_000001_000019_gtFine_labelIds.png" in _error(Cityscapes, cityscapes[0], "val")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_images_and_labels(gta5, synthia, damage):
    def spoil(path):
        data = path.read_bytes()
        path.write_bytes(b"this is not an image" if damage == "garbage" else data[: len(data) // 2])

    image = gta5[0] / "images" / "00001.png"
    spoil(image)
    dataset = GTA5(gta5[0])  # listing does not open files
    assert str(image) in _error(dataset.__getitem__, 1)
    label = synthia[0] / "GT" / "LABELS" / "00000.png"
    spoil(label)
    assert str(label) in _error(Synthia(synthia[0]).__getitem__, 0)


def test_size_mismatch(gta5):
    root, _ = gta5
    label = root / "labels" / "00002.png"
    Image.fromarray(np.zeros((H - 4, W), np.uint8)).save(label)
    message = _error(GTA5(root).__getitem__, 2)
    assert str(label) in message and f"{H - 4}x{W}" in message and f"{H}x{W}" in message


def test_ids_outside_the_map(gta5, synthia, cityscapes):
    bad = np.full((H, W), 7, np.uint8)
    bad[3, 3] = 34
    Image.fromarray(bad).save(gta5[0] / "labels" / "00000.png")
    message = _error(GTA5(gta5[0]).__getitem__, 0)
    assert "00000.png" in message and "34" in message
    path = cityscapes[0] / "gtFine/val/synthcity/synthcity_000002_000019_gtFine_labelIds.png"
    Image.fromarray(bad).save(path)
    assert str(path) in _error(Cityscapes(cityscapes[0], "val").__getitem__, 2)
    ids = np.zeros((H, W, 3), np.uint16)
    ids[5, 5, 0] = 264  # = 256 + 8: wrong unless the high byte is read
    write_png(synthia[0] / "GT" / "LABELS" / "00001.png", ids)
    message = _error(Synthia(synthia[0]).__getitem__, 1)
    assert "00001.png" in message and "264" in message
    Image.fromarray(np.full((H, W, 3), 7, np.uint8)).save(gta5[0] / "labels" / "00001.png")
    assert "single-channel" in _error(GTA5(gta5[0]).__getitem__, 1)


# -- 16-bit PNGs -----------------------------------------------------------------------------------

def _png16_grey_alpha(path, array):
    """A 16-bit grey+alpha PNG (neither Pillow nor OpenCV writes one): unfiltered rows, one IDAT."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    height, width, _ = array.shape
    rows = np.ascontiguousarray(array.astype(">u2")).view(np.uint8).reshape(height, -1)
    rows = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1)  # filter type 0
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, 4, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows.tobytes())) + chunk(b"IEND", b""))


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_roundtrip_at_full_depth(tmp_path, channels, dtype):
    array = np.random.default_rng(channels).integers(0, np.iinfo(dtype).max + 1, (7, 9, channels)).astype(dtype)
    array[0, 0] = 0x0103 if dtype == np.uint16 else 3  # high byte 1, low byte 3: both must survive
    path = tmp_path / "x.png"
    if dtype == np.uint16 and channels == 2:
        with pytest.raises(ValueError, match="uint16"):
            write_png(path, array)
        _png16_grey_alpha(path, array)
    else:
        write_png(path, array)
    assert path.read_bytes()[24] == 8 * np.dtype(dtype).itemsize  # the PNG's bit depth
    out = read_png(path)
    assert out.dtype == dtype and np.array_equal(out, array[:, :, 0] if channels == 1 else array)


@pytest.mark.parametrize("channels", [3, 4])
def test_read_png_16bit_returns_rgb_order(tmp_path, channels):
    rgb8 = np.random.default_rng(5).integers(0, 256, (6, 8, channels)).astype(np.uint8)
    rgb8[:, :, 0], rgb8[:, :, 1] = 10, 200  # three different channels
    order = [2, 1, 0, 3][:channels]  # OpenCV writes BGR(A)
    cv2.imwrite(str(tmp_path / "x8.png"), rgb8[:, :, order])
    cv2.imwrite(str(tmp_path / "x16.png"), rgb8[:, :, order].astype(np.uint16) * 256 + 3)
    pillow8 = np.asarray(Image.open(tmp_path / "x8.png"))
    assert np.array_equal(pillow8, rgb8)
    rgb16 = read_png(tmp_path / "x16.png")
    assert np.array_equal(rgb16 >> 8, pillow8) and (rgb16 & 0xFF == 3).all()
    assert np.array_equal(rgb16 >> 8, np.asarray(Image.open(tmp_path / "x16.png")))  # Pillow: high bytes


def test_synthia_class_id_is_the_full_16bit_value(synthia):
    root, _ = synthia
    ids = np.zeros((H, W, 3), np.uint16)
    ids[:, :, 0] = 8  # car
    ids[4, 4, 0] = 0x0103  # id 3 in the low byte, 1 in the high byte: neither 3 nor 1 is meant
    write_png(root / "GT" / "LABELS" / "00001.png", ids)
    assert read_png(root / "GT" / "LABELS" / "00001.png")[4, 4, 0] == 0x0103
    message = _error(Synthia(root).__getitem__, 1)
    assert "00001.png" in message and "259" in message
    ids[4, 4, 0] = 3  # road: index 0 of SYNTHIA16
    write_png(root / "GT" / "LABELS" / "00001.png", ids)
    label = Synthia(root)[1]["label"]
    assert label[4, 4] == 0 and label[0, 0] == 12


def test_16bit_colour_png_without_opencv_is_one_line_error(tmp_path, monkeypatch, gta5, synthia):
    rgb16 = np.full((4, 5, 3), 0x0103, np.uint16)
    write_png(tmp_path / "x16.png", rgb16)
    monkeypatch.setitem(sys.modules, "cv2", None)  # "import cv2" now fails
    for call in (lambda: read_png(tmp_path / "x16.png"), lambda: write_png(tmp_path / "y16.png", rgb16),
                 lambda: Synthia(synthia[0])[0]):
        message = _error(call)
        assert 'pip install "diga-fast[synthia]"' in message and "OpenCV" in message
    assert str(tmp_path / "x16.png") in _error(read_png, tmp_path / "x16.png")
    # 8-bit data and 16-bit grey never need OpenCV.
    assert GTA5(gta5[0])[0]["label"].shape == (H, W)
    grey16 = np.full((4, 5), 0x0103, np.uint16)
    write_png(tmp_path / "grey16.png", grey16)
    assert np.array_equal(read_png(tmp_path / "grey16.png"), grey16)


# -- image folders ---------------------------------------------------------------------------------

def test_image_folder_conversions_and_names(tmp_path):
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8)
    grey = rgb[:, :, 0]
    Image.fromarray(rgb).save(root / "a_rgb.JPG", quality=95)
    Image.fromarray(grey).save(root / "b_grey.png")
    rgba = np.concatenate([rgb, np.full((H, W, 1), 7, np.uint8)], axis=2)
    Image.fromarray(rgba).save(root / "sub" / "c_rgba.png")
    write_png(root / "sub" / "d_grey16.png", grey.astype(np.uint16) * 257)
    rgb16 = rgb.astype(np.uint16) * 256 + 200  # high byte = rgb
    write_png(root / "sub" / "deeper" / "e_rgb16.png", rgb16)
    Image.fromarray(rgb).quantize(16).save(root / "f_palette.bmp")
    Image.fromarray(rgb).save(root / ".hidden" / "skip.png")
    (root / "notes.txt").write_text("not an image")

    dataset = ImageFolder(root)
    assert dataset.names == ["a_rgb", "b_grey", "f_palette", "sub/c_rgba", "sub/d_grey16",
                             "sub/deeper/e_rgb16"]
    items = {item["name"]: item for item in dataset}
    for item in items.values():
        assert item["image"].shape == (3, H, W) and item["image"].dtype == torch.float32
        assert "label" not in item

    def pixels(name):
        return (items[name]["image"] * 255).round().byte().permute(1, 2, 0).numpy()

    assert np.array_equal(pixels("b_grey"), np.repeat(grey[:, :, None], 3, 2))
    assert np.array_equal(pixels("sub/c_rgba"), rgb)  # alpha dropped
    assert np.array_equal(pixels("sub/d_grey16"), np.repeat(grey[:, :, None], 3, 2))  # v >> 8
    assert np.array_equal(pixels("sub/deeper/e_rgb16"), rgb)
    assert np.array_equal(pixels("a_rgb"), np.asarray(Image.open(root / "a_rgb.JPG")))  # jpeg
    palette_rgb = np.asarray(Image.open(root / "f_palette.bmp").convert("RGB"))
    assert np.array_equal(pixels("f_palette"), palette_rgb)

    single = ImageFolder(root / "b_grey.png")
    assert single.names == ["b_grey"]

    Image.fromarray(rgb).save(root / "b_grey.jpeg")
    message = _error(ImageFolder, root)
    assert "b_grey.jpeg" in message and "b_grey.png" in message
    (root / "b_grey.jpeg").unlink()
    (root / "z_broken.png").write_bytes(b"\x89PNG broken")
    broken = ImageFolder(root)
    assert "z_broken.png" in _error(broken.__getitem__, len(broken) - 1)


# -- loaders ---------------------------------------------------------------------------------------

def _train_set(root):
    return GTA5(root, transform=train_transform(resize=None, crop=(16, 24), scale=(0.7, 1.0),
                                                flip=True, content_retry=True))


def _batches(loader, count):
    iterator = iter(loader)
    return [next(iterator) for _ in range(count)]


def _same(a, b):
    return all(x["name"] == y["name"] and torch.equal(x["image"], y["image"])
               and torch.equal(x["label"], y["label"]) for x, y in zip(a, b, strict=True))


def test_loader_is_deterministic_and_worker_independent(gta5):
    dataset = _train_set(gta5[0])
    first = _batches(InfiniteLoader(dataset, 2, shuffle=True, seed=7), 4)
    torch.manual_seed(123)  # the global RNG does not matter
    again = _batches(InfiniteLoader(dataset, 2, shuffle=True, seed=7), 4)
    assert _same(first, again)
    other = _batches(InfiniteLoader(dataset, 2, shuffle=True, seed=8), 4)
    assert not _same(first, other)
    workers = InfiniteLoader(dataset, 2, shuffle=True, seed=7, num_workers=2)
    assert _same(first, _batches(workers, 4))
    del workers


def test_infinite_loader_resume(gta5):
    dataset = _train_set(gta5[0])
    loader = InfiniteLoader(dataset, 2, shuffle=True, seed=3)
    run = _batches(loader, 7)  # 14 samples: several epochs of 3, batches straddle epochs
    assert loader.step == 7
    resumed = InfiniteLoader(dataset, 2, shuffle=True, seed=3, start_step=4)
    assert _same(run[4:], _batches(resumed, 3))
    stepped = InfiniteLoader(dataset, 2, shuffle=True, seed=3)
    assert _same(run[:2], [next(stepped), next(stepped)]) and stepped.step == 2
    names = [n for batch in run[:3] for n in batch["name"]]
    assert sorted(names[:3]) == sorted(names[3:6]) == ["00000", "00001", "00002"]  # whole epochs
    tiny = InfiniteLoader(dataset, 5, seed=0)  # batch larger than the dataset
    assert len(next(iter(tiny))["name"]) == 5
