"""Metrics against an independent implementation (python sets of pixel coordinates), and losses."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msff.engine import BinaryMetrics, metrics_from_counts, segmentation_loss


def set_metrics(pred, gt, valid):
    """Independent reference: sets of landslide pixel coordinates."""
    P = {tuple(c) for c in np.argwhere(pred & valid)}
    G = {tuple(c) for c in np.argwhere(gt & valid)}
    tp, fp, fn = len(P & G), len(P - G), len(G - P)
    prec = tp / len(P) if P else None
    rec = tp / len(G) if G else None
    iou = tp / len(P | G) if P | G else None
    f1 = 2 * prec * rec / (prec + rec) if prec is not None and rec is not None and prec + rec > 0 else (
        0.0 if (P or G) else None)
    return tp, fp, fn, dict(precision=prec, recall=rec, iou=iou, f1=f1)


def random_batch(rng, n=6, h=23, w=31):
    gt = rng.random((n, h, w)) < rng.uniform(0.05, 0.5, (n, 1, 1))
    logits = rng.normal(0, 2, (n, h, w)) + 1.5 * (gt * 2 - 1)
    valid = rng.random((n, h, w)) > 0.15
    gt[0] = False  # an image without landslide pixels
    logits[1] = -10  # an image predicted empty
    gt[2] = False
    logits[2] = -10  # nothing anywhere: per-image metrics undefined
    return gt, logits, valid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_micro_and_per_image_match_set_logic(seed):
    rng = np.random.default_rng(seed)
    gt, logits, valid = random_batch(rng)
    target = np.where(valid, gt.astype(np.uint8), 255).astype(np.uint8)
    m = BinaryMetrics(threshold=0.5)
    m.update(torch.from_numpy(logits[:3]).unsqueeze(1), torch.from_numpy(target[:3]))
    m.update(torch.from_numpy(logits[3:]), torch.from_numpy(target[3:]))
    r = m.compute()
    pred = logits >= 0.0  # sigmoid(x) >= 0.5
    TP = FP = FN = 0
    per = {k: [] for k in ("precision", "recall", "iou", "f1")}
    for i in range(len(gt)):
        tp, fp, fn, mm = set_metrics(pred[i], gt[i], valid[i])
        TP, FP, FN = TP + tp, FP + fp, FN + fn
        for k, v in mm.items():
            if v is not None:
                per[k].append(v)
    P, R = TP / (TP + FP), TP / (TP + FN)
    assert r["tp"] == TP and r["fp"] == FP and r["fn"] == FN
    assert r["tn"] == int((~pred & ~gt & valid).sum())
    assert r["precision"] == pytest.approx(P) and r["recall"] == pytest.approx(R)
    assert r["iou"] == pytest.approx(TP / (TP + FP + FN))
    assert r["f1"] == pytest.approx(2 * P * R / (P + R))
    for k in per:
        assert r[f"image_{k}"] == pytest.approx(np.mean(per[k])), k
    assert r["images"] == 6


def test_all_background_prediction_scores_zero():
    t = torch.zeros(2, 8, 8, dtype=torch.uint8)
    t[:, 2:5, 2:5] = 1
    m = BinaryMetrics()
    m.update(torch.full((2, 1, 8, 8), -5.0), t)
    r = m.compute()
    assert (r["iou"], r["precision"], r["recall"], r["f1"]) == (0.0, 0.0, 0.0, 0.0)
    assert r["image_iou"] == 0.0 and math.isnan(r["image_precision"])


def test_counts_formula():
    r = metrics_from_counts(30, 10, 20)
    assert r["precision"] == pytest.approx(0.75) and r["recall"] == pytest.approx(0.6)
    assert r["f1"] == pytest.approx(2 * 0.75 * 0.6 / 1.35) and r["iou"] == pytest.approx(0.5)


def test_probabilities_and_threshold():
    t = torch.tensor([[[1, 0, 1, 255]]], dtype=torch.uint8)
    m = BinaryMetrics(threshold=0.7)
    m.update(torch.tensor([[[0.8, 0.75, 0.6, 0.9]]]), t, probs=True)
    r = m.compute()
    assert (r["tp"], r["fp"], r["fn"], r["tn"]) == (1, 1, 1, 0)


def test_bce_ignores_pixels_and_matches_torch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 1, 9, 7, generator=g)
    t = (torch.rand(3, 9, 7, generator=g) > 0.6).to(torch.uint8)
    t[:, :2] = 255
    got = segmentation_loss(logits, t, "bce")
    v = t != 255
    ref = F.binary_cross_entropy_with_logits(logits[:, 0][v], t[v].float())
    torch.testing.assert_close(got, ref)
    # ignored pixels have no gradient
    logits.requires_grad_(True)
    segmentation_loss(logits, t, "bce+dice").backward()
    assert (logits.grad[:, 0, :2] == 0).all() and logits.grad[:, 0, 2:].abs().sum() > 0


def test_dice_loss_values():
    t = torch.tensor([[[1, 1, 0, 0]]], dtype=torch.uint8)
    perfect = segmentation_loss(torch.tensor([[[50.0, 50.0, -50.0, -50.0]]]), t, "dice")
    wrong = segmentation_loss(torch.tensor([[[-50.0, -50.0, 50.0, 50.0]]]), t, "dice")
    assert perfect.item() == pytest.approx(0.0, abs=1e-6) and wrong.item() == pytest.approx(1 - 1 / 5, abs=1e-6)
    with pytest.raises(ValueError, match="unknown loss"):
        segmentation_loss(torch.zeros(1, 1, 2, 2), t[..., :2].reshape(1, 1, 2).expand(1, 2, 2), "focal")
