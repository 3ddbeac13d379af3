"""Self-training pieces against plain re-computations: centroids (initial and online), feature labels,
label modes, the pseudo-label store, and label-quality tracking."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diga_fast.labels import CITYSCAPES19
from diga_fast.errors import DigaError
from diga_fast.method.centroids import agreement_labels, initial_centroids, update_centroids
from diga_fast.method.pseudo_labels import PseudoLabelled, generate_probability_labels
from diga_fast.method.consensus import feature_labels, label_quality, target_labels
from diga_fast.models import build_model


def test_online_centroid_update_matches_a_per_image_per_class_loop():
    torch.manual_seed(0)
    K, C = 5, 7
    centroids = torch.randn(K, C)
    features = torch.randn(3, C, 6, 5)
    labels = torch.randint(0, K, (3, 6, 5))
    labels[0][labels[0] == 2] = 255  # class 2 absent in image 0
    labels[1, :4] = 4  # class 4 dominant in image 1
    expected = centroids.clone()
    for b in range(3):
        for k in range(K):
            mask = labels[b] == k
            if int(mask.sum()) >= 5:
                mean = features[b].permute(1, 2, 0)[mask].mean(0)
                expected[k] = (1 - 0.1) * expected[k] + 0.1 * mean
    update_centroids(centroids, features, labels, momentum=0.1, min_pixels=5)
    assert torch.allclose(centroids, expected, atol=1e-6)


def test_a_class_seen_nowhere_keeps_its_centroid():
    centroids = torch.randn(4, 3)
    before = centroids.clone()
    labels = torch.full((2, 4, 4), 255)
    labels[:, :2] = 1
    update_centroids(centroids, torch.randn(2, 3, 4, 4), labels, momentum=0.5)
    assert torch.equal(centroids[[0, 2, 3]], before[[0, 2, 3]])
    assert not torch.equal(centroids[1], before[1]) and torch.isfinite(centroids).all()


def test_initial_centroids_are_masked_means_of_the_argmax_class():
    torch.manual_seed(1)
    model = build_model("small", 19).eval()
    images = [{"image": torch.rand(3, 24, 40)} for _ in range(3)]
    centroids, counts = initial_centroids(model, images, torch.device("cpu"))
    sums = torch.zeros(19, model.feature_dim, dtype=torch.float64)
    n = torch.zeros(19, dtype=torch.int64)
    with torch.no_grad():
        for item in images:
            logits, feature = model(item["image"][None])
            pred = logits.argmax(1)[0]
            for k in range(19):
                mask = pred == k
                sums[k] += feature[0].permute(1, 2, 0)[mask].double().sum(0)
                n[k] += int(mask.sum())
    assert torch.equal(counts, n)
    seen = n > 0
    assert torch.allclose(centroids[seen].double(), sums[seen] / n[seen, None], atol=1e-5)
    assert torch.equal(centroids[~seen], torch.zeros_like(centroids[~seen]))


def test_agreement_labels_keep_argmax_where_it_equals_the_label():
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 1, 0, 0] = logits[0, 2, 0, 1] = logits[0, 0, 1, 0] = logits[0, 1, 1, 1] = 1.0
    labels = torch.tensor([[[1, 0], [0, 255]]])
    assert agreement_labels(logits, labels).tolist() == [[[1, 255], [0, 255]]]
    assert agreement_labels(logits, None).tolist() == [[[1, 2], [0, 1]]]


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_feature_labels_pick_the_nearest_centroid(metric):
    torch.manual_seed(2)
    features, centroids = torch.randn(2, 6, 3, 4), torch.randn(5, 6)
    flat = features.permute(0, 2, 3, 1)
    if metric == "cosine":
        expected = (F.normalize(flat, dim=-1) @ F.normalize(centroids, dim=-1).T).argmax(-1)
    else:
        expected = torch.cdist(flat.reshape(1, -1, 6), centroids[None])[0].argmin(-1).view(2, 3, 4)
    assert torch.equal(feature_labels(features, centroids, (3, 4), metric, "nearest"), expected)
    assert torch.equal(feature_labels(features, centroids, (3, 4), metric, "scores"), expected)
    up = feature_labels(features, centroids, (6, 8), metric, "nearest")
    assert torch.equal(up, expected.repeat_interleave(2, 1).repeat_interleave(2, 2))


def test_label_modes():
    prob = torch.tensor([[1, 2, 3, 4]])
    feat = torch.tensor([[1, 0, 3, 0]])
    conf = torch.tensor([[0.95, 0.5, 0.99, 0.2]])
    agree = lambda pair: torch.where(pair[0] == pair[1], pair[0], torch.full_like(pair[0], 255))  # noqa: E731
    assert agree(target_labels("consensus", prob, feat, conf, 0.9)).tolist() == [[1, 255, 3, 255]]
    assert agree(target_labels("prob", prob, feat, conf, 0.9)).tolist() == [[1, 2, 3, 4]]
    assert agree(target_labels("feat", prob, feat, conf, 0.9)).tolist() == [[1, 0, 3, 0]]
    assert agree(target_labels("threshold", prob, feat, conf, 0.9)).tolist() == [[1, 255, 3, 255]]


def test_label_quality():
    consensus = torch.tensor([[1, 255, 3, 4]])
    truth = torch.tensor([[1, 2, 0, 255]])
    quality = label_quality(consensus, truth)
    assert quality["consensus_kept"].item() == pytest.approx(0.75)
    assert quality["consensus_accuracy"].item() == pytest.approx(0.5)  # pixels 0 and 2 are kept and known
    quality = label_quality(consensus, truth, prob=torch.tensor([[1, 2, 3, 3]]))
    assert quality["prob_accuracy"].item() == pytest.approx(2 / 3)  # over the three known pixels


class _Images:
    """A target split of two 20x30 images, like the real datasets (names, read)."""

    names = ["a/one", "b/two"]

    def __init__(self):
        rng = np.random.default_rng(0)
        self.images = [rng.integers(0, 255, (20, 30, 3), dtype=np.uint8) for _ in self.names]

    def __len__(self):
        return 2

    def read(self, index):
        return self.images[index], None


def test_pseudo_labels_round_trip_and_mismatches_are_refused(tmp_path):
    model = build_model("small", 19)
    images = _Images()
    out = generate_probability_labels(model, images, tmp_path / "pl", CITYSCAPES19, torch.device("cpu"), (1.0, 0.5))
    stored = np.array(Image.open(out / "labels" / "a" / "one.png"))
    with torch.no_grad():
        x = torch.from_numpy(images.images[0]).permute(2, 0, 1).float().div(255)[None]
        from diga_fast.models.predict import predict_logits

        expected = predict_logits(model.eval(), x, (1.0, 0.5)).argmax(1)[0].numpy()
    assert stored.shape == (20, 30) and np.array_equal(stored, expected) and 255 not in stored
    item = PseudoLabelled(images, out, 19)[0]
    assert torch.equal(item["pseudo_label"], torch.from_numpy(expected.astype(np.int64)))
    assert (item["label"] == 255).all() and 0.0 < float(item["confidence"].min()) <= 1.0

    class Three(_Images):
        names = ["a/one", "b/two", "c/three"]

    with pytest.raises(DigaError, match="cover 2 images, the target train split has 3"):
        PseudoLabelled(Three(), out, 19)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(out / "labels" / "b" / "two.png")
    with pytest.raises(DigaError, match="made for other images"):
        PseudoLabelled(images, out, 19)[1]
    (out / "labels" / "b" / "two.png").unlink()
    with pytest.raises(DigaError, match="no pseudo-label for target image b/two"):
        PseudoLabelled(images, out, 19)
    with pytest.raises(DigaError, match="diga pseudo-label"):
        PseudoLabelled(images, tmp_path / "nowhere", 19)


def test_score_upsampling_is_softmax_then_bilinear_then_argmax():
    """The official order: softmax over classes of -distance at feature resolution, upsampled like the
    logits (align_corners=True), argmax."""
    torch.manual_seed(0)
    features, centroids = torch.randn(1, 8, 5, 7), torch.randn(4, 8)
    distance = torch.cdist(features.permute(0, 2, 3, 1).reshape(1, -1, 8), centroids[None]).permute(0, 2, 1).reshape(1, 4, 5, 7)
    expected = F.interpolate(torch.softmax(-distance, 1), size=(17, 25), mode="bilinear", align_corners=True).argmax(1)
    assert torch.equal(feature_labels(features, centroids, (17, 25), "l2", "scores"), expected)


def test_consensus_loss_normalisers_and_ohem():
    from types import SimpleNamespace

    from diga_fast.method.consensus import consensus_labels, consensus_loss

    torch.manual_seed(1)
    logits = torch.randn(2, 5, 6, 6)
    prob, feat = torch.randint(0, 5, (2, 6, 6)), torch.randint(0, 5, (2, 6, 6))
    target = consensus_labels(prob, feat)
    train = SimpleNamespace(source_loss="ce", ohem_thresh=0.7, ohem_min_kept=4, ce_normalizer="valid")
    torch.testing.assert_close(consensus_loss(logits, prob, feat, train), F.cross_entropy(logits, target, ignore_index=255))
    train.ce_normalizer = "all"
    summed = F.cross_entropy(logits, target, ignore_index=255, reduction="sum")
    torch.testing.assert_close(consensus_loss(logits, prob, feat, train), summed / target.numel())
    train.source_loss = "ohem"
    from diga_fast.method.losses import ohem_cross_entropy

    torch.testing.assert_close(consensus_loss(logits, prob, feat, train), ohem_cross_entropy(logits, target, 0.7, 4))


def test_teacher_mode():
    from diga_fast.method.ema import make_teacher

    student = build_model("small", 19)
    assert not make_teacher(student).training and make_teacher(student, "train").training
    assert all(not p.requires_grad for p in make_teacher(student, "train").parameters())
