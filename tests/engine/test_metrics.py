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


# ---- boundary metrics against direct set computations -------------------------------------------
def _pixels(m):
    return {tuple(c) for c in np.argwhere(m)}


def set_band(mask, known, d):
    """Cheng et al.'s inner band, directly: mask pixels with a known non-mask pixel within Chebyshev d."""
    bg = _pixels(known & ~mask)
    return {p for p in _pixels(mask & known) if any(max(abs(p[0] - q[0]), abs(p[1] - q[1])) <= d for q in bg)}


def set_contour(mask, known):
    bg = _pixels(known & ~mask)
    return {p for p in _pixels(mask & known)
            if any((p[0] + a, p[1] + b) in bg for a, b in ((1, 0), (-1, 0), (0, 1), (0, -1)))}


def set_boundary(pred, gt, known, d, tol):
    bp, bg = set_band(pred, known, d), set_band(gt, known, d)
    cp, cg = set_contour(pred, known), set_contour(gt, known)

    def near(a, b):
        return {p for p in a if any((p[0] - q[0]) ** 2 + (p[1] - q[1]) ** 2 <= tol * tol for q in b)}

    mp, mg = near(cp, cg), near(cg, cp)
    return dict(inter=len(bp & bg), union=len(bp | bg), mp=len(mp), np=len(cp), mg=len(mg), ng=len(cg))


def disc(h, w, cy, cx, r):
    yy, xx = np.mgrid[:h, :w]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def square_with_notch(h, w):
    gt = np.zeros((h, w), bool)
    gt[8:28, 10:30] = True
    pred = gt.copy()
    pred[8:12, 17:21] = False  # a 4×4 bite out of the top edge
    return pred, gt


def shapes():
    h, w = 40, 44
    known = np.ones((h, w), bool)
    gt = disc(h, w, 20, 21, 9)
    yield "disc shifted by one pixel", disc(h, w, 20, 22, 9), gt, known
    p, g = square_with_notch(h, w)
    yield "square with a notch", p, g, known
    k2 = known.copy()
    k2[:, 26:29] = False  # a nodata strip through both shapes
    yield "square with a notch, nodata strip", p, g, k2
    yield "disc shifted, nodata strip", disc(h, w, 20, 22, 9), gt, k2


@pytest.mark.parametrize("case", list(range(4)))
@pytest.mark.parametrize("ratio,tol", [(0.02, 2), (0.05, 1), (0.1, 0)])
def test_boundary_counts_match_set_computation(case, ratio, tol):
    from msff.engine.metrics import boundary_counts, boundary_dilation

    name, pred, gt, known = list(shapes())[case]
    target = np.where(known, gt.astype(np.uint8), 255).astype(np.uint8)
    d = boundary_dilation(*gt.shape, ratio)
    ref = set_boundary(pred, gt, known, d, tol)
    got = boundary_counts(torch.from_numpy(pred)[None], torch.from_numpy(target)[None], dilation_ratio=ratio,
                          tolerance_px=tol)[0].tolist()
    assert got == [ref["inter"], ref["union"], ref["mp"], ref["np"], ref["mg"], ref["ng"]], name
    assert 0 < ref["inter"] < ref["union"], name  # the cases are not degenerate


def test_boundary_metrics_values_and_known_cases():
    # A one-pixel shift keeps every contour pixel within 2 px: boundary F = 1 while Boundary IoU < 1.
    h, w = 40, 44
    gt = disc(h, w, 20, 21, 9)
    m = BinaryMetrics()
    m.update(torch.from_numpy(np.where(disc(h, w, 20, 22, 9), 5.0, -5.0))[None],
             torch.from_numpy(gt.astype(np.uint8))[None])
    r = m.compute()
    assert r["boundary_f"] == pytest.approx(1.0) and r["image_boundary_f"] == pytest.approx(1.0)
    ref = set_boundary(disc(h, w, 20, 22, 9), gt, np.ones_like(gt), 1, 2)
    assert r["boundary_iou"] == pytest.approx(ref["inter"] / ref["union"]) and r["boundary_iou"] < 0.9
    # Perfect prediction scores 1 everywhere; an empty prediction scores 0.
    m = BinaryMetrics()
    m.update(torch.from_numpy(np.where(gt, 5.0, -5.0))[None], torch.from_numpy(gt.astype(np.uint8))[None])
    r = m.compute()
    assert r["boundary_iou"] == 1.0 and r["boundary_f"] == 1.0
    m = BinaryMetrics()
    m.update(torch.full((1, h, w), -5.0), torch.from_numpy(gt.astype(np.uint8))[None])
    r = m.compute()
    assert r["boundary_iou"] == 0.0 and r["boundary_f"] == 0.0 and r["boundary_recall"] == 0.0


def test_boundary_metrics_micro_per_image_padding_and_batching():
    """Micro and per-image boundary metrics equal the set computation summed/averaged over images,
    whatever the batching, and padding (target 255) does not change them."""
    from msff.engine.metrics import boundary_dilation

    imgs = list(shapes())
    ref = [set_boundary(p, g, k, boundary_dilation(*g.shape), 2) for _, p, g, k in imgs]
    tot = {k: sum(r[k] for r in ref) for k in ref[0]}
    one = BinaryMetrics()
    padded = BinaryMetrics()
    for _, p, g, k in imgs:
        t = np.where(k, g.astype(np.uint8), 255).astype(np.uint8)
        logit = np.where(p, 3.0, -3.0)
        one.update(torch.from_numpy(logit)[None], torch.from_numpy(t)[None])
        tp = np.full((57, 61), 255, np.uint8)
        tp[: t.shape[0], : t.shape[1]] = t
        lp = np.full((57, 61), 3.0)  # padding predicted landslide: must not matter
        lp[: t.shape[0], : t.shape[1]] = logit
        padded.update(torch.from_numpy(lp)[None, None], torch.from_numpy(tp)[None])
    r, rp = one.compute(), padded.compute()
    P, R = tot["mp"] / tot["np"], tot["mg"] / tot["ng"]
    assert r["boundary_iou"] == pytest.approx(tot["inter"] / tot["union"])
    assert r["boundary_precision"] == pytest.approx(P) and r["boundary_recall"] == pytest.approx(R)
    assert r["boundary_f"] == pytest.approx(2 * P * R / (P + R))
    per_f = [2 * (a["mp"] / a["np"]) * (a["mg"] / a["ng"]) / (a["mp"] / a["np"] + a["mg"] / a["ng"]) for a in ref]
    assert r["image_boundary_iou"] == pytest.approx(np.mean([a["inter"] / a["union"] for a in ref]))
    assert r["image_boundary_f"] == pytest.approx(np.mean(per_f))
    for k in ("boundary_iou", "boundary_f", "image_boundary_iou", "image_boundary_f", "iou", "tp", "fp"):
        assert rp[k] == pytest.approx(r[k]), k
    # One batch of all four (same size) gives the same numbers as four single-image updates.
    batch = BinaryMetrics()
    batch.update(torch.from_numpy(np.stack([np.where(p, 3.0, -3.0) for _, p, _, _ in imgs])),
                 torch.from_numpy(np.stack([np.where(k, g, 255).astype(np.uint8) for _, _, g, k in imgs])))
    rb = batch.compute()
    for k in ("boundary_iou", "boundary_f", "image_boundary_iou", "image_boundary_f"):
        assert rb[k] == pytest.approx(r[k]), k


def test_image_border_is_not_a_contour_and_empty_images_are_left_out():
    t = torch.zeros(2, 16, 16, dtype=torch.uint8)
    t[0] = 1  # all landslide: no contour, no band
    logits = torch.full((2, 16, 16), 4.0)
    logits[1] = -4.0  # image 2: nothing true, nothing predicted: boundary metrics undefined
    m = BinaryMetrics()
    m.update(logits, t)
    r = m.compute()
    assert r["boundary_iou"] == 0.0 and math.isnan(r["image_boundary_iou"]) and math.isnan(r["image_boundary_f"])


def test_soil_confusable_fp_rate():
    t = torch.zeros(1, 4, 4, dtype=torch.uint8)
    t[0, 0] = 1
    t[0, 3, 3] = 255
    soil = torch.zeros(1, 4, 4, dtype=torch.bool)
    soil[0, 1] = True  # 4 soil-like background pixels
    soil[0, 0, :2] = True  # 2 soil-like landslide pixels
    soil[0, 3, 3] = True  # unknown: never counted
    logits = torch.full((1, 4, 4), -4.0)
    logits[0, 1, :3] = 4.0  # 3 of the soil-like background predicted landslide
    logits[0, 2, 0] = 4.0  # one other false positive
    m = BinaryMetrics()
    m.update(logits, t, soil=soil)
    r = m.compute()
    assert r["soil_fp_rate"] == pytest.approx(3 / 4)
    assert r["background_fp_rate"] == pytest.approx(4 / 11)
    assert r["soil_background_fraction"] == pytest.approx(4 / 11)
    assert r["soil_landslide_fraction"] == pytest.approx(2 / 4)
    assert "soil_fp_rate" not in BinaryMetrics().compute()
    with pytest.raises(ValueError, match="soil mask"):
        m.update(logits, t, soil=soil[:, :2])


def test_micro_metrics_combine_evaluations_exactly():
    """Counts of two evaluations summed give the micro metrics of one evaluation over both."""
    from msff.engine.metrics import micro_metrics

    imgs = list(shapes())
    soil = torch.from_numpy(np.random.default_rng(3).random((4,) + imgs[0][1].shape) > 0.5)
    parts, whole = [BinaryMetrics(), BinaryMetrics()], BinaryMetrics()
    for i, (_, p, g, k) in enumerate(imgs):
        lg = torch.from_numpy(np.where(p, 3.0, -3.0))[None]
        t = torch.from_numpy(np.where(k, g, 255).astype(np.uint8))[None]
        parts[i % 2].update(lg, t, soil=soil[i : i + 1])
        whole.update(lg, t, soil=soil[i : i + 1])
    a, b, w = parts[0].compute(), parts[1].compute(), whole.compute()
    summed = {k: a[k] + b[k] for k in a if k in ("tp", "fp", "fn", "tn") or k.startswith(("biou", "bf_", "soil_f",
                                                                                          "soil_bg", "soil_l", "land"))}
    got = micro_metrics(summed)
    for k in ("iou", "f1", "boundary_iou", "boundary_f", "soil_fp_rate", "background_fp_rate"):
        assert got[k] == pytest.approx(w[k]), k
    assert "boundary_iou" not in BinaryMetrics(boundary=False).compute()
