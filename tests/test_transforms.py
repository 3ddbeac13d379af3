"""Joint image/label transforms: shapes, image/label alignment, determinism, the content filter."""

import numpy as np
import pytest
import torch

from diga_fast.data.transforms import (
    Compose,
    ContentRetry,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScaleCrop,
    Resize,
    eval_transform,
    has_enough_content,
    train_transform,
)


def _pair(h=24, w=40, seed=0):
    """An image whose first channel equals the label, so alignment can be checked exactly."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 19, (h, w)).astype(np.uint8)
    label[:, :3] = 255
    image = np.stack([label, rng.integers(0, 256, (h, w)), rng.integers(0, 256, (h, w))], axis=2)
    return image.astype(np.uint8), label


def test_resize_shapes_and_nearest_labels():
    image, label = _pair()
    out_image, out_label = Resize((13, 29))(image, label)
    assert out_image.shape == (13, 29, 3) and out_image.dtype == np.uint8
    assert out_label.shape == (13, 29) and out_label.dtype == np.uint8
    assert set(np.unique(out_label)) <= set(np.unique(label))
    big_image, big_label = Resize((48, 80))(image, label)
    assert np.array_equal(big_label[::2, ::2], label)  # nearest upsampling by 2 repeats pixels
    assert Resize((24, 40))(image, None)[1] is None


def test_random_scale_crop_shape_determinism_and_values():
    image, label = _pair(60, 100)
    t = RandomScaleCrop((32, 48), scale=(0.7, 1.0))
    torch.manual_seed(3)
    a = t(image, label)
    torch.manual_seed(3)
    b = t(image, label)
    assert a[0].shape == (32, 48, 3) and a[1].shape == (32, 48)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1])) <= set(np.unique(label))
    draws = set()
    for seed in range(8):
        torch.manual_seed(seed)
        draws.add(t(image, label)[1].tobytes())
    assert len(draws) > 1


def test_random_scale_crop_keeps_alignment_without_rescale():
    image, label = _pair(30, 50)
    torch.manual_seed(0)
    out_image, out_label = RandomScaleCrop((20, 30), scale=(1.0, 1.0))(image, label)
    assert np.array_equal(out_image[:, :, 0], out_label)


def test_random_scale_crop_stretches_small_images_to_the_crop():
    image, label = _pair(24, 40)
    torch.manual_seed(0)
    out_image, out_label = RandomScaleCrop((30, 50))(image, label)
    assert out_image.shape == (30, 50, 3) and out_label.shape == (30, 50)


def test_random_crop_alignment_padding_and_resize():
    image, label = _pair(30, 50)
    torch.manual_seed(1)
    out_image, out_label = RandomCrop((20, 30))(image, label)
    assert out_label.shape == (20, 30) and np.array_equal(out_image[:, :, 0], out_label)

    small_image, small_label = _pair(10, 12)
    padded_image, padded_label = RandomCrop((16, 20))(small_image, small_label)
    assert padded_image.shape == (16, 20, 3)
    assert np.array_equal(padded_label[:10, :12], small_label)
    assert (padded_label[10:] == 255).all() and (padded_label[:, 12:] == 255).all()
    assert (padded_image[10:] == 0).all()

    resized = RandomCrop((16, 20), if_smaller="resize")(small_image, small_label)
    assert resized[0].shape == (16, 20, 3) and resized[1].shape == (16, 20)


def test_horizontal_flip():
    image, label = _pair()
    flipped_image, flipped_label = RandomHorizontalFlip(p=1.0)(image, label)
    assert np.array_equal(flipped_label, label[:, ::-1])
    assert np.array_equal(flipped_image, image[:, ::-1])
    same = RandomHorizontalFlip(p=0.0)(image, label)
    assert np.array_equal(same[1], label)


@pytest.mark.parametrize(
    "values, shares, expected",
    [
        ((1, 2, 3), (0.4, 0.3, 0.3), True),  # three classes
        ((1, 2, 255), (0.4, 0.3, 0.3), True),  # three values, 255 counts as a value
        ((1, 2), (0.5, 0.5), True),  # exactly two real classes
        ((1, 255), (0.5, 0.5), False),  # one class next to a big ignore region
        ((7,), (1.0,), False),  # one class
        ((1, 2, 3), (0.98, 0.01, 0.01), False),  # small values do not count
    ],
)
def test_has_enough_content(values, shares, expected):
    counts = np.round(np.array(shares) * 1000).astype(int)
    label = np.repeat(np.array(values, dtype=np.uint8), counts).reshape(20, 50)
    assert has_enough_content(label) is expected


class _Scripted:
    """A fake random transform returning prepared labels in order, counting calls."""

    def __init__(self, labels):
        self.labels, self.calls = labels, 0

    def __call__(self, image, label):
        out = self.labels[min(self.calls, len(self.labels) - 1)]
        self.calls += 1
        return image, out


def test_content_retry_redraws_until_enough_content():
    bad = np.zeros((10, 10), np.uint8)
    good = np.repeat(np.arange(4, dtype=np.uint8), 25).reshape(10, 10)
    scripted = _Scripted([bad, bad, good, bad])
    image = np.zeros((10, 10, 3), np.uint8)
    _, label = ContentRetry(scripted, tries=5)(image, bad)
    assert scripted.calls == 3 and label is good


def test_content_retry_keeps_last_draw_after_all_tries():
    draws = [np.full((10, 10), k, np.uint8) for k in range(6)]
    scripted = _Scripted(draws)
    _, label = ContentRetry(scripted, tries=5)(np.zeros((10, 10, 3), np.uint8), draws[0])
    assert scripted.calls == 5 and label is draws[4]
    unlabeled = _Scripted(draws)
    ContentRetry(unlabeled)(np.zeros((10, 10, 3), np.uint8), None)
    assert unlabeled.calls == 1


def test_content_retry_with_real_crops_is_deterministic():
    image, label = _pair(60, 100)
    label[:, :70] = 255  # a crop often sees only ignore
    t = ContentRetry(RandomScaleCrop((20, 24)))
    torch.manual_seed(5)
    a = t(image, label)
    torch.manual_seed(5)
    b = t(image, label)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[0], b[0])


def test_train_and_eval_transform_builders():
    image, label = _pair(24, 40)
    t = train_transform(resize=(36, 60), crop=(20, 32), scale=(0.7, 1.0), flip=True, content_retry=True)
    torch.manual_seed(0)
    a = t(image, label)
    torch.manual_seed(0)
    b = t(image, label)
    assert a[0].shape == (20, 32, 3) and a[1].shape == (20, 32)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])

    crop_only = train_transform(resize=None, crop=(16, 16), scale=None, flip=False, content_retry=False)
    out_image, out_label = crop_only(image, label)
    assert np.array_equal(out_image[:, :, 0], out_label)  # RandomCrop: no resampling
    assert isinstance(crop_only.transforms[-1], Compose)
    assert isinstance(crop_only.transforms[-1].transforms[0], RandomCrop)

    assert eval_transform((12, 20))(image, label)[0].shape == (12, 20, 3)
    same_image, same_label = eval_transform(None)(image, label)
    assert same_image is image and same_label is label


def test_resize_by_row_gives_each_batch_row_its_size():
    """data.source_sizes=[[40,60,1],[50,70,2]]: row 0 of every batch at 40x60, rows 1-2 at 50x70, also
    with worker processes and for a resumed loader."""
    import numpy as np
    import torch
    from torch.utils.data import Dataset

    from diga_fast.data.loader import InfiniteLoader
    from diga_fast.data.transforms import ResizeByRow

    class Shapes(Dataset):
        resize = ResizeByRow([[40, 60, 1], [50, 70, 2]])

        def __len__(self):
            return 5

        def __getitem__(self, index):
            image, _ = self.resize(np.zeros((30, 30, 3), np.uint8))
            return torch.tensor(image.shape[:2])

    for loader in (InfiniteLoader(Shapes(), 3, seed=1), InfiniteLoader(Shapes(), 3, seed=1, num_workers=2, start_step=4)):
        for _ in range(3):
            assert next(loader).tolist() == [[40, 60], [50, 70], [50, 70]]
