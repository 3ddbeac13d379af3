import numpy as np
import pytest
import torch

from diga_fast.data import synthetic
from diga_fast.labels import CITYSCAPES19, IGNORE_INDEX
from diga_fast.data.synthetic import SyntheticDomain, render_scene
from diga_fast.errors import DigaError

SIZE = (64, 128)


def test_same_arguments_give_identical_bytes():
    for domain in ("source", "target"):
        a_img, a_lbl = render_scene(domain, "train", 3, seed=7, size=SIZE)
        b_img, b_lbl = render_scene(domain, "train", 3, seed=7, size=SIZE)
        assert a_img.tobytes() == b_img.tobytes() and a_lbl.tobytes() == b_lbl.tobytes()
        assert a_img.dtype == np.uint8 and a_img.shape == (*SIZE, 3)
        assert a_lbl.dtype == np.uint8 and a_lbl.shape == SIZE


@pytest.mark.parametrize(
    "other",
    [
        ("target", "train", 3, 8),
        ("target", "train", 4, 7),
        ("target", "val", 3, 7),
        ("source", "train", 3, 7),
    ],
)
def test_any_change_of_seed_index_split_or_domain_gives_another_scene(other):
    img, lbl = render_scene("target", "train", 3, seed=7, size=SIZE)
    img2, lbl2 = render_scene(*other[:3], seed=other[3], size=SIZE)
    assert img.tobytes() != img2.tobytes()
    assert lbl.tobytes() != lbl2.tobytes()


def test_labels_are_train_ids_and_cover_the_street_classes():
    allowed = set(synthetic.SYNTHETIC_CLASSES) | {IGNORE_INDEX}
    names = {"road", "sidewalk", "building", "pole", "vegetation", "sky", "person", "car"}
    for domain in ("source", "target"):
        seen = set()
        for index in range(8):
            _, label = render_scene(domain, "train", index, size=(96, 192))
            values = set(np.unique(label).tolist())
            assert values <= allowed
            seen |= values
        seen_names = {CITYSCAPES19.classes[k] for k in seen if k != IGNORE_INDEX}
        assert names <= seen_names and len(seen_names) >= 8


def test_same_geometry_looks_different_in_the_two_domains():
    size = (96, 192)
    source_std, target_std = [], []
    for seed in range(3):
        layouts = [
            synthetic.make_layout(np.random.default_rng(seed), size, synthetic.SOURCE_GEOMETRY) for _ in range(2)
        ]
        assert np.array_equal(layouts[0].label, layouts[1].label)
        source = synthetic.paint(layouts[0], synthetic.SOURCE_LOOK, np.random.default_rng(1)).astype(float)
        target = synthetic.paint(layouts[1], synthetic.TARGET_LOOK, np.random.default_rng(1)).astype(float)
        assert np.abs(source - target).mean() > 10.0
        # leaf texture: the target's vegetation varies much more than the source's flat crowns
        veg = layouts[0].label == synthetic.VEGETATION
        source_std.append(source.sum(-1)[veg].std())
        target_std.append(target.sum(-1)[veg].std())
    assert np.mean(target_std) > 1.3 * np.mean(source_std)


def test_the_domains_differ_in_colour_statistics():
    def mean_colour(domain, cls):
        total, count = np.zeros(3), 0
        for index in range(6):
            image, label = render_scene(domain, "val", index, size=SIZE)
            mask = label == cls
            total += image[mask].sum(0)
            count += mask.sum()
        return total / max(count, 1)

    for cls in (synthetic.SKY, synthetic.VEGETATION, synthetic.SIDEWALK):
        assert np.abs(mean_colour("source", cls) - mean_colour("target", cls)).max() > 12


def test_dataset_items():
    ds = SyntheticDomain("source", "val", num_images=3, seed=2, size=(48, 80))
    assert len(ds) == 3
    item = ds[2]
    assert set(item) == {"image", "label", "name"}
    assert item["name"] == "source_val_00002"
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 48, 80)
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["label"].dtype == torch.int64 and item["label"].shape == (48, 80)
    image, label = render_scene("source", "val", 2, seed=2, size=(48, 80))
    assert torch.equal(item["image"], torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    assert torch.equal(item["label"], torch.from_numpy(label).long())
    with pytest.raises(IndexError):
        ds[3]
    unlabeled = SyntheticDomain("target", "train", num_images=1, size=(48, 80), with_labels=False)[0]
    assert set(unlabeled) == {"image", "name"}


def test_transform_hook_gets_uint8_arrays_and_its_result_is_used():
    calls = []

    def transform(image, label):
        calls.append((image.dtype, image.shape, None if label is None else (label.dtype, label.shape)))
        return image[:, ::-1][:32, :40], None if label is None else label[:, ::-1][:32, :40]

    item = SyntheticDomain("target", "train", 2, size=(48, 80), transform=transform)[1]
    assert calls == [(np.uint8, (48, 80, 3), (np.uint8, (48, 80)))]
    assert item["image"].shape == (3, 32, 40) and item["label"].shape == (32, 40)
    SyntheticDomain("target", "train", 2, size=(48, 80), transform=transform, with_labels=False)[0]
    assert calls[-1][2] is None


def test_odd_sizes_and_bad_arguments():
    image, label = render_scene("target", "val", 0, size=(97, 181))
    assert image.shape == (97, 181, 3) and label.shape == (97, 181)
    with pytest.raises(DigaError):
        render_scene("real", "train", 0)
    with pytest.raises(DigaError):
        SyntheticDomain("source", "test", 4)
    with pytest.raises(DigaError):
        render_scene("source", "train", -1)
