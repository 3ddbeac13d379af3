"""Confusion matrix and mIoU: hand-computed cases, ignore / invalid / absent classes, the 16/13-class
subsets, and (when cityscapesscripts is installed) agreement with the official Cityscapes evaluator."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from diga_fast.labels import CITYSCAPES19, SYNTHIA16
from diga_fast.cli.tables import iou_table
from diga_fast.metrics import ConfusionMatrix, summarize


def test_hand_computed_example():
    cm = ConfusionMatrix(3)
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm.update(pred, target)
    assert cm.matrix.dtype == torch.int64
    assert cm.matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    # class 0: tp 1, gt 2, pred 2; class 1: tp 2, gt 2, pred 3; class 2: tp 0, gt 1, pred 0
    iou = cm.iou()
    assert iou.dtype == torch.float64
    assert torch.allclose(iou, torch.tensor([1 / 3, 2 / 3, 0.0], dtype=torch.float64))
    assert cm.miou() == pytest.approx(100.0 / 3)
    assert cm.miou([0, 1]) == pytest.approx(50.0)


def test_accumulates_over_updates_and_custom_ignore():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 0]))
    cm.update(torch.tensor([1, 1, 0]), torch.tensor([1, 7, 7]), ignore_index=7)
    assert cm.matrix.tolist() == [[1, 1], [0, 1]]
    assert cm.iou().tolist() == pytest.approx([0.5, 0.5])


def test_ignored_pixels_never_count_as_false_positives():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 255, 255]))
    assert cm.iou().tolist() == [1.0, 1.0]


def test_predictions_outside_range_are_wrong():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 9, -1, 255, 1]), torch.tensor([0, 0, 0, 0, 1], dtype=torch.uint8))
    assert cm.matrix.tolist() == [[1, 0], [0, 1]]
    assert cm.iou().tolist() == [0.25, 1.0]  # 3 false negatives for class 0, no false positives


def test_absent_class_is_nan_and_excluded_from_the_mean():
    cm = ConfusionMatrix(4)
    cm.update(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 2]))
    iou = cm.iou()
    assert iou[:3].tolist() == [1.0, 0.5, 0.0]  # class 2 has ground truth, never predicted: 0
    assert math.isnan(iou[3])  # class 3: no ground truth, no prediction
    assert cm.miou() == pytest.approx(50.0)
    assert math.isnan(cm.miou([3]))


def test_matches_a_plain_numpy_confusion_matrix():
    gen = torch.Generator().manual_seed(0)
    k = 19
    cm = ConfusionMatrix(k)
    ref = np.zeros((k, k), dtype=np.int64)
    for _ in range(3):
        target = torch.randint(0, k + 3, (2, 17, 23), generator=gen)
        target[target >= k] = 255
        pred = torch.randint(0, k, (2, 17, 23), generator=gen, dtype=torch.int32)
        cm.update(pred, target)
        t, p = target.flatten().numpy(), pred.flatten().numpy()
        np.add.at(ref, (t[t != 255], p[t != 255]), 1)
    assert np.array_equal(cm.matrix.numpy(), ref)
    tp = np.diag(ref)
    expected = tp / (ref.sum(0) + ref.sum(1) - tp)
    assert np.allclose(cm.iou().numpy(), expected)
    assert cm.miou() == pytest.approx(100 * np.nanmean(expected))


def test_shape_and_dtype_errors():
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_accumulates_on_cuda():
    cm = ConfusionMatrix(3)
    cm.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 1, 1], device="cuda"))
    assert cm.matrix.device.type == "cuda"
    assert cm.matrix.cpu().tolist() == [[1, 0, 0], [0, 1, 1], [0, 0, 0]]


def test_summarize_synthia_subsets_and_table():
    k = SYNTHIA16.num_classes
    target = torch.arange(k).repeat_interleave(10)
    pred = target.clone()
    for name in ("wall", "fence", "pole"):  # half of each predicted as road: IoU 50
        idx = SYNTHIA16.classes.index(name)
        pred[idx * 10: idx * 10 + 5] = SYNTHIA16.classes.index("road")
    pred[SYNTHIA16.classes.index("bus") * 10: SYNTHIA16.classes.index("bus") * 10 + 10] = 255
    cm = ConfusionMatrix(k)
    cm.update(pred, target)
    summary = summarize(cm, SYNTHIA16)
    assert summary["num_classes"] == 16 and set(summary["iou"]) == set(SYNTHIA16.classes)
    assert summary["iou"]["wall"] == pytest.approx(50.0)
    assert summary["iou"]["road"] == pytest.approx(10 / 25 * 100)
    assert summary["iou"]["bus"] == 0.0
    expected13 = np.mean([summary["iou"][SYNTHIA16.classes[i]] for i in SYNTHIA16.eval_subsets["mIoU13"]])
    assert summary["mIoU13"] == pytest.approx(expected13)
    assert summary["mIoU16"] == pytest.approx(np.mean(list(summary["iou"].values())))
    assert summary["miou"] == summary["mIoU16"]
    assert summary["mIoU13"] > summary["mIoU16"]
    json.dumps(summary)

    console = Console(record=True, width=80, file=io.StringIO())
    console.print(iou_table(summary, title="demo"))
    text = console.export_text()
    assert "traffic light" in text and "mIoU13" in text and "40.00" in text


def test_summarize_absent_class_is_none():
    cm = ConfusionMatrix(19)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    summary = summarize(cm, CITYSCAPES19)
    assert summary["iou"]["road"] == 100.0 and summary["iou"]["bicycle"] is None
    assert summary["miou"] == 100.0 and summary["mIoU19"] == 100.0
    json.loads(json.dumps(summary))
    with pytest.raises(ValueError, match="classes"):
        summarize(cm, SYNTHIA16)


# ---- agreement with the official Cityscapes evaluator ----------------------------------------------

def _random_label_id_pairs(rng: np.random.Generator, count: int, shape=(48, 96)):
    """Blocky random GT label-id maps (ids 0..33 without 'train' (31), so one eval class is absent
    from both sides) and predictions that are the GT with 35% of pixels replaced by random ids, some
    of them ids the evaluator ignores (0 'unlabeled', 4 'static', ...)."""
    ids = np.array([i for i in range(34) if i != 31], dtype=np.uint8)
    for _ in range(count):
        coarse = rng.choice(ids, size=(shape[0] // 8, shape[1] // 8))
        gt = np.kron(coarse, np.ones((8, 8), dtype=np.uint8))
        pred = gt.copy()
        noise = rng.random(shape) < 0.35
        pred[noise] = rng.choice(ids, size=int(noise.sum()))
        yield gt, pred


def test_matches_cityscapesscripts(tmp_path, monkeypatch):
    pytest.importorskip("cityscapesscripts")
    if not hasattr(np, "in1d"):  # removed in numpy 2.4; cityscapesscripts 2.3.0 still calls it
        monkeypatch.setattr(np, "in1d", np.isin, raising=False)
    monkeypatch.setenv("CITYSCAPES_DATASET", str(tmp_path))  # read at import
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval

    monkeypatch.setattr(cs_eval.args, "evalInstLevelScore", False)  # no *_instanceIds.png needed
    monkeypatch.setattr(cs_eval.args, "JSONOutput", False)
    monkeypatch.setattr(cs_eval.args, "quiet", True)

    gt_dir, pred_dir = tmp_path / "gtFine" / "val" / "frankfurt", tmp_path / "results"
    gt_dir.mkdir(parents=True)
    pred_dir.mkdir()
    lut = torch.from_numpy(CITYSCAPES19.cityscapes_id_lut())
    cm = ConfusionMatrix(CITYSCAPES19.num_classes)
    gt_files, pred_files = [], []
    for i, (gt, pred) in enumerate(_random_label_id_pairs(np.random.default_rng(0), 4)):
        stem = f"frankfurt_000000_{i:06d}"
        gt_files.append(str(gt_dir / f"{stem}_gtFine_labelIds.png"))
        pred_files.append(str(pred_dir / f"{stem}_leftImg8bit_pred.png"))
        Image.fromarray(gt).save(gt_files[-1])
        Image.fromarray(pred).save(pred_files[-1])
        # Ours: label ids -> class indices (non-class ids -> 255: ignored in GT, wrong in predictions).
        gt_read = torch.from_numpy(np.array(Image.open(gt_files[-1]))).long()
        pred_read = torch.from_numpy(np.array(Image.open(pred_files[-1]))).long()
        cm.update(lut[pred_read], lut[gt_read])

    result = cs_eval.evaluateImgLists(pred_files, gt_files, cs_eval.args)
    summary = summarize(cm, CITYSCAPES19)
    theirs = {name: result["classScores"][name] * 100 for name in CITYSCAPES19.classes}
    print(f"\nmIoU ours {summary['miou']:.6f}  cityscapesscripts {result['averageScoreClasses'] * 100:.6f}")
    for name in CITYSCAPES19.classes:
        if math.isnan(theirs[name]):
            assert summary["iou"][name] is None, name
        else:
            assert summary["iou"][name] == pytest.approx(theirs[name], abs=1e-9), name
    assert summary["iou"]["train"] is None  # absent from both sides: excluded from the mean
    assert summary["miou"] == pytest.approx(result["averageScoreClasses"] * 100, abs=1e-9)
