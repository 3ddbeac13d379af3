"""Rare-class sampling (DAFormer): the class probabilities follow softmax((1 - f_c) / T), the drawn
classes follow those probabilities, images and crops hold enough of the drawn class, draws are
seeded per stream position, and the statistics are cached per dataset."""

import numpy as np
import pytest
import torch

from diga_fast.config import Recipe
from diga_fast.data import rare_class
from diga_fast.data.loader import InfiniteLoader
from diga_fast.data.rare_class import (
    RareClassSampling,
    cached_counts,
    class_pixel_counts,
    class_probabilities,
    rare_class_stats,
    with_rare_class_sampling,
)

K = 6


class LabelSet(torch.utils.data.Dataset):
    """Synthetic labels 40 x 50: image i is class ``base[i]`` with a ``rare[i]`` block of ``extra[i]``
    rows; class 5 never occurs, 255 borders are ignored. Items are random 20 x 25 crops."""

    def __init__(self, seed: int = 0, n: int = 12):
        rng = np.random.default_rng(seed)
        self.labels = []
        for i in range(n):
            label = np.full((40, 50), i % 3, np.uint8)
            label[: int(rng.integers(5, 30)), :20] = 3 + (i % 2)  # classes 3 and 4: rarer
            label[:, -2:] = 255
            self.labels.append(label)
        self.names = [f"img{i}" for i in range(n)]

    def __len__(self):
        return len(self.labels)

    def read(self, index):
        return None, self.labels[index]

    def __getitem__(self, index):
        y, x = int(torch.randint(21, ())), int(torch.randint(26, ()))
        return {"label": torch.from_numpy(self.labels[index][y:y + 20, x:x + 25].astype(np.int64)), "index": index}


def test_probabilities_follow_the_formula():
    counts = class_pixel_counts(LabelSet(), K)
    labels = np.stack(LabelSet().labels)
    assert counts.sum() == (labels != 255).sum() and counts[:, 5].sum() == 0
    classes, probs = class_probabilities(counts, temperature=0.01)
    assert classes.tolist() == [0, 1, 2, 3, 4]  # class 5 never occurs
    freq = np.array([(labels == c).sum() for c in classes], np.float64) / (labels != 255).sum()
    expected = np.exp((1 - freq) / 0.01) / np.exp((1 - freq) / 0.01).sum()
    np.testing.assert_allclose(probs, expected, rtol=1e-9)
    assert probs.argmax() == freq.argmin()


def test_sampling_frequencies_match_the_probabilities():
    dataset = LabelSet()
    stats = rare_class_stats(class_pixel_counts(dataset, K), temperature=0.05, min_pixels=0)
    sampler = RareClassSampling(dataset, stats, min_crop_pixels=0)
    torch.manual_seed(0)
    draws = 20_000
    classes = np.array([sampler.draw()[0] for _ in range(draws)])
    observed = np.array([(classes == c).mean() for c in stats.classes])
    sigma = np.sqrt(stats.probs * (1 - stats.probs) / draws)
    assert np.all(np.abs(observed - stats.probs) < 4 * sigma + 1e-9), (observed, stats.probs)
    assert 0.005 < stats.probs.min() and stats.probs.max() < 0.6  # no class negligible, none dominant


def test_images_and_crops_hold_the_drawn_class(capsys):
    dataset = LabelSet()
    counts = class_pixel_counts(dataset, K)
    min_pixels = 200
    stats = rare_class_stats(counts, temperature=0.01, min_pixels=min_pixels)
    for cls, images in zip(stats.classes, stats.images):
        assert set(images.tolist()) == set(np.flatnonzero(counts[:, cls] > min_pixels).tolist())
    sampler = RareClassSampling(dataset, stats, min_crop_pixels=min_pixels * 0.5)
    torch.manual_seed(1)
    for _ in range(50):
        state = torch.get_rng_state()
        cls, image = sampler.draw()
        torch.set_rng_state(state)
        item = sampler[0]
        assert item["index"] == image
        assert counts[image, cls] > min_pixels
    # a class no image holds enough of is left out, with a warning
    stats = rare_class_stats(counts, temperature=0.01, min_pixels=int(counts[:, 3].max()))
    assert 3 not in stats.classes.tolist() and stats.probs.sum() == pytest.approx(1.0)
    assert "left out" in capsys.readouterr().err


def test_crops_are_redrawn_until_they_hold_enough_of_the_class():
    dataset = LabelSet()
    counts = class_pixel_counts(dataset, K)
    stats = rare_class_stats(counts, temperature=0.01, min_pixels=100)
    strict = RareClassSampling(dataset, stats, min_crop_pixels=50)
    loose = RareClassSampling(dataset, stats, min_crop_pixels=0, retries=0)
    hits = {"strict": 0, "loose": 0}
    for name, sampler in (("strict", strict), ("loose", loose)):
        torch.manual_seed(2)
        for _ in range(200):
            state = torch.get_rng_state()
            cls, _ = sampler.draw()
            torch.set_rng_state(state)
            hits[name] += int((sampler[0]["label"] == cls).sum()) > 50
    assert hits["strict"] > hits["loose"]


def test_loader_batches_are_seeded_and_statistics_cached(tmp_path, monkeypatch):
    recipe = Recipe()
    recipe.data.source, recipe.data.rcs_min_pixels = "synthetic:labels", 100
    sampled = with_rare_class_sampling(LabelSet(), recipe, K, tmp_path)
    assert (tmp_path / rare_class.STATS_FILE).is_file()

    def batches(start_step):
        loader = InfiniteLoader(sampled, 4, seed=3, start_step=start_step)
        return [next(loader)["index"].tolist() for _ in range(3)]

    first = batches(0)
    assert first == batches(0) and first[1:] == batches(1)[:2]  # resume at step 1 replays nothing

    expected = class_pixel_counts(LabelSet(), K)
    monkeypatch.setattr(rare_class, "class_pixel_counts", lambda *a: pytest.fail("statistics recomputed"))
    np.testing.assert_array_equal(cached_counts(LabelSet(), K, tmp_path, "synthetic:labels"), expected)
    with pytest.raises(pytest.fail.Exception):  # another dataset (its sample names differ) is counted anew
        other = LabelSet()
        other.names = [f"other{i}" for i in range(len(other))]
        cached_counts(other, K, tmp_path, "synthetic:labels")
