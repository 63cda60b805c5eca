"""Metrics against slow, obviously correct references and hand-computed cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lpdseg.metrics import (
    SegmentationMeter,
    boundary_band,
    boundary_counts,
    boundary_width,
    confusion_matrix,
    format_table,
    scores_from_confusion,
)

torch.set_num_threads(1)

IGNORE = 255


# ---------------------------------------------------------------- references
def ref_confusion(pred, target, num_labels, ignore=IGNORE):
    """Count pixel by pixel."""
    cm = [[0] * num_labels for _ in range(num_labels)]
    for p, t in zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True):
        if t != ignore:
            cm[t][p] += 1
    return torch.tensor(cm, dtype=torch.long)


def ref_scores(pred, target, num_classes, ignore=IGNORE):
    """IoU / Dice / FwIoU / accuracy from pixel sets, without a confusion matrix."""
    pixels = [
        (i, p, t)
        for i, (p, t) in enumerate(
            zip(pred.flatten().tolist(), target.flatten().tolist(), strict=True)
        )
        if t != ignore
    ]
    n_labels = num_classes + 1
    iou, dice, fw = [], [], 0.0
    for lab in range(n_labels):
        g = {i for i, _, t in pixels if t == lab}
        p = {i for i, q, _ in pixels if q == lab}
        iou.append(len(g & p) / len(g | p) if g | p else math.nan)
        dice.append(2 * len(g & p) / (len(g) + len(p)) if g | p else math.nan)
        if g:
            fw += len(g) / len(pixels) * iou[-1]
    tissue_iou = [v for v in iou[:num_classes] if not math.isnan(v)]
    tissue_dice = [v for v in dice[:num_classes] if not math.isnan(v)]
    return {
        "iou": iou,
        "dice": dice,
        "mIoU": sum(tissue_iou) / len(tissue_iou) if tissue_iou else math.nan,
        "mDice": sum(tissue_dice) / len(tissue_dice) if tissue_dice else math.nan,
        "FwIoU": fw if pixels else math.nan,
        "pixel_acc": sum(p == t for _, p, t in pixels) / len(pixels) if pixels else math.nan,
    }


def ref_band(labels, label, d):
    """Pixel in the mask with some pixel within chessboard distance d outside the mask
    or outside the image (image border = contour, as Boundary IoU's zero padding)."""
    grid = labels.tolist()
    h, w = len(grid), len(grid[0])
    band = set()
    for i in range(h):
        for j in range(w):
            if grid[i][j] != label:
                continue
            for di in range(-d, d + 1):
                for dj in range(-d, d + 1):
                    y, x = i + di, j + dj
                    if not (0 <= y < h and 0 <= x < w) or grid[y][x] != label:
                        band.add((i, j))
    return band


def ref_boundary_counts(pred, target, num_labels, d, ignore=IGNORE):
    """|G_d ∩ P_d| and |G_d ∪ P_d| per label from pixel sets, ignored pixels removed.

    Ignored pixels belong to no label in the prediction either (so an ignore
    region draws the same contour in both masks).
    """
    ignored = {
        (i, j) for i, row in enumerate(target.tolist()) for j, v in enumerate(row) if v == ignore
    }
    pred = pred.clone()
    pred[target == ignore] = ignore
    inter, union = [], []
    for lab in range(num_labels):
        g = ref_band(target, lab, d) - ignored
        p = ref_band(pred, lab, d) - ignored
        inter.append(len(g & p))
        union.append(len(g | p))
    return torch.tensor(inter), torch.tensor(union)


def random_maps(gen, shape, num_labels, ignore_frac=0.1, blocky=True):
    """Random pred/target label maps; blocky maps have real regions and contours."""

    def one():
        if blocky:
            h, w = shape[-2:]
            small = torch.randint(
                0, num_labels, (*shape[:-2], (h + 2) // 3, (w + 2) // 3), generator=gen
            )
            m = small.repeat_interleave(3, -2).repeat_interleave(3, -1)[..., :h, :w]
        else:
            m = torch.randint(0, num_labels, shape, generator=gen)
        return m.contiguous()

    target, pred = one(), one()
    flip = torch.rand(shape, generator=gen) < 0.2  # noise so pred is not only blocks
    pred = torch.where(flip, torch.randint(0, num_labels, shape, generator=gen), pred)
    target = torch.where(torch.rand(shape, generator=gen) < ignore_frac, IGNORE, target)
    return pred, target


def assert_scores_close(got, want, keys=("mIoU", "mDice", "FwIoU", "pixel_acc")):
    for k in keys:
        assert got[k] == pytest.approx(want[k], abs=1e-12, nan_ok=True), k
    for k in ("iou", "dice"):
        assert got[k] == pytest.approx(want[k], abs=1e-12, nan_ok=True), k


# ---------------------------------------------------------- confusion matrix
@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 5)])
@pytest.mark.parametrize("dtype", [torch.long, torch.uint8, torch.int32])
def test_confusion_matrix_matches_loop_reference(shape, dtype):
    gen = torch.Generator().manual_seed(0)
    for num_labels in (1, 3, 5):
        pred, target = random_maps(gen, shape, num_labels, blocky=False)
        cm = confusion_matrix(pred.to(dtype), target.to(dtype), num_labels)
        assert cm.dtype == torch.long and cm.shape == (num_labels, num_labels)
        assert torch.equal(cm, ref_confusion(pred, target, num_labels))


def test_confusion_matrix_uint8_does_not_overflow():
    # 200 labels: target * L would overflow uint8 if not cast first
    target = torch.tensor([199, 3, 150], dtype=torch.uint8)
    pred = torch.tensor([198, 3, 150], dtype=torch.uint8)
    cm = confusion_matrix(pred, target, 200)
    assert cm[199, 198] == 1 and cm[3, 3] == 1 and cm[150, 150] == 1 and cm.sum() == 3


def test_confusion_matrix_errors_name_the_problem():
    t = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(3, 2\)"):
        confusion_matrix(torch.zeros(2, 3, dtype=torch.long), t.T.contiguous(), 3)
    with pytest.raises(ValueError, match=r"target holds values outside 0\.\.2.*: 3, 7"):
        confusion_matrix(t, torch.tensor([[0, 3, 7], [7, 255, 1]]), 3)
    with pytest.raises(ValueError, match=r"pred holds values outside 0\.\.2.*: -1, 4"):
        confusion_matrix(torch.tensor([[0, -1, 4], [4, 1, 1]]), t, 3)
    with pytest.raises(TypeError, match="float32"):
        confusion_matrix(t.float(), t, 3)
    # a prediction value at an ignored pixel is never counted, so it is no error
    cm = confusion_matrix(torch.tensor([255, 1]), torch.tensor([255, 1]), 2)
    assert cm.tolist() == [[0, 0], [0, 1]]


# ---------------------------------------------------------- hand-computed case
# C = 2 tissue classes (0, 1), background = 2, ignore = 255.
HAND_TARGET = torch.tensor(
    [
        [0, 0, 1, 1],
        [0, 0, 1, 1],
        [2, 2, 2, 2],
        [2, 2, 2, 255],
    ]
)
HAND_PRED = torch.tensor(
    [
        [0, 0, 0, 1],
        [0, 1, 1, 1],
        [2, 2, 2, 1],
        [2, 2, 2, 0],  # the last pixel is ignored
    ]
)


def test_hand_computed_4x4():
    # 15 scored pixels. Rows = ground truth:
    #   gt 0 (4 px) predicted 0,0,0,1        -> [3, 1, 0]
    #   gt 1 (4 px) predicted 0,1,1,1        -> [1, 3, 0]
    #   gt 2 (7 px) predicted 2,2,2,1,2,2,2  -> [0, 1, 6]
    # gt sums 4, 4, 7; pred sums 4, 5, 6.
    # IoU  = 3/(4+4-3) = 0.6, 3/(4+5-3) = 0.5, 6/(7+6-6) = 6/7
    # Dice = 6/8 = 0.75, 6/9 = 2/3, 12/13
    # mIoU = (0.6 + 0.5)/2 = 0.55 (background excluded); mDice = (0.75 + 2/3)/2
    # FwIoU = (4*0.6 + 4*0.5 + 7*6/7)/15 = 10.4/15; pixel acc = (3+3+6)/15 = 0.8
    cm = confusion_matrix(HAND_PRED, HAND_TARGET, 3)
    assert cm.tolist() == [[3, 1, 0], [1, 3, 0], [0, 1, 6]]
    s = scores_from_confusion(cm, 2)
    assert s["iou"] == pytest.approx([0.6, 0.5, 6 / 7])
    assert s["dice"] == pytest.approx([0.75, 2 / 3, 12 / 13])
    assert s["mIoU"] == pytest.approx(0.55)
    assert s["mDice"] == pytest.approx((0.75 + 2 / 3) / 2)
    assert s["FwIoU"] == pytest.approx(10.4 / 15)
    assert s["pixel_acc"] == pytest.approx(0.8)


def test_hand_computed_boundary_iou():
    # 7x7 image, C = 1 (tissue 0, background 1), d = max(1, round(0.02 * 9.9)) = 1.
    # gt: 5x5 square rows 1..5, cols 1..5; pred: the same square shifted right (cols 2..6).
    # Tissue bands are the 1-px rings of the squares (16 px each). They share rows 1 and 5
    # over cols 2..5 -> 8 px; union 16 + 16 - 8 = 24 -> bIoU 1/3.
    # Background: gt bg = outer frame (24 px), pred bg = row 0, row 6, cols 0..1 (24 px);
    # every bg pixel touches the image border (contour) or the square -> bands = whole bg.
    # Shared: rows 0 and 6 (14) + col 0 rows 1..5 (5) = 19; union 24 + 24 - 19 = 29.
    target = torch.ones(7, 7, dtype=torch.long)
    target[1:6, 1:6] = 0
    pred = torch.ones(7, 7, dtype=torch.long)
    pred[1:6, 2:7] = 0
    assert boundary_width(7, 7) == 1
    inter, union = boundary_counts(pred, target, 2)
    assert inter.tolist() == [8, 19] and union.tolist() == [24, 29]
    meter = SegmentationMeter(1, ["TUM"])
    meter.update(pred, target)
    res = meter.compute()
    assert res["biou"] == pytest.approx([1 / 3, 19 / 29])
    assert res["bIoU"] == pytest.approx(1 / 3)  # background excluded
    assert res["iou"][0] == pytest.approx(20 / 30)


# ------------------------------------------------------------------ scores
def test_scores_match_pixel_set_reference():
    gen = torch.Generator().manual_seed(1)
    for num_classes in (1, 2, 4):
        for _ in range(5):
            pred, target = random_maps(gen, (9, 11), num_classes + 1)
            got = scores_from_confusion(
                confusion_matrix(pred, target, num_classes + 1), num_classes
            )
            assert_scores_close(got, ref_scores(pred, target, num_classes))


def test_perfect_and_completely_wrong_predictions():
    gen = torch.Generator().manual_seed(2)
    _, target = random_maps(gen, (4, 16, 16), 4, ignore_frac=0.0)
    meter = SegmentationMeter(3)
    meter.update(target.clone(), target)
    res = meter.compute()
    for k in ("mIoU", "mDice", "FwIoU", "pixel_acc", "bIoU"):
        assert res[k] == 1.0, k
    assert res["iou"] == res["dice"] == res["biou"] == [1.0] * 4

    wrong = SegmentationMeter(3)
    wrong.update((target + 1) % 4, target)
    res = wrong.compute()
    for k in ("mIoU", "mDice", "FwIoU", "pixel_acc", "bIoU"):
        assert res[k] == 0.0, k


def test_absent_label_is_nan_and_left_out_of_means():
    # label 1 never occurs in gt nor pred -> NaN, and mIoU averages class 0 only
    cm = torch.tensor([[2, 0, 1], [0, 0, 0], [0, 0, 3]])
    s = scores_from_confusion(cm, 2)
    assert math.isnan(s["iou"][1]) and math.isnan(s["dice"][1])
    assert s["mIoU"] == pytest.approx(2 / 3)
    assert s["FwIoU"] == pytest.approx(3 / 6 * 2 / 3 + 3 / 6 * 3 / 4)
    # a label predicted but absent from gt has IoU 0 and weighs 0 in FwIoU
    cm = torch.tensor([[2, 1], [0, 0]])
    s = scores_from_confusion(cm, 1)
    assert s["iou"] == [2 / 3, 0.0] and s["FwIoU"] == pytest.approx(2 / 3)
    empty = scores_from_confusion(torch.zeros(3, 3, dtype=torch.long), 2)
    assert all(math.isnan(empty[k]) for k in ("mIoU", "mDice", "FwIoU", "pixel_acc"))


def test_scores_from_confusion_errors():
    with pytest.raises(ValueError, match="L x L"):
        scores_from_confusion(torch.zeros(2, 3), 1)
    with pytest.raises(ValueError, match=r"num_classes must be in 1\.\.3"):
        scores_from_confusion(torch.zeros(3, 3), 4)


def test_miou_excludes_background():
    # tissue 0 perfect, background badly predicted: mIoU stays 1, FwIoU and accuracy drop
    target = torch.tensor([[0, 0, 1, 1]])
    pred = torch.tensor([[0, 0, 0, 1]])
    s = scores_from_confusion(confusion_matrix(pred, target, 2), 1)
    assert s["iou"] == pytest.approx([2 / 3, 1 / 2])
    assert s["mIoU"] == pytest.approx(2 / 3)  # not (2/3 + 1/2) / 2
    assert s["FwIoU"] == pytest.approx(0.5 * 2 / 3 + 0.5 * 0.5)


def test_ignore_pixels_are_excluded():
    gen = torch.Generator().manual_seed(3)
    pred, target = random_maps(gen, (12, 12), 3, ignore_frac=0.3)
    ignored = target == IGNORE
    other = torch.where(ignored, (pred + 1) % 3, pred)  # change pred only where ignored
    assert torch.equal(confusion_matrix(pred, target, 3), confusion_matrix(other, target, 3))
    assert confusion_matrix(pred, target, 3).sum() == (~ignored).sum()
    assert torch.equal(
        confusion_matrix(pred, target, 3), confusion_matrix(pred[~ignored], target[~ignored], 3)
    )
    # boundary counts never count an ignored pixel
    inter, union = boundary_counts(pred, torch.full_like(target, IGNORE), 3)
    assert inter.tolist() == union.tolist() == [0, 0, 0]
    # a custom ignore index works too (here: background ignored)
    cm = confusion_matrix(torch.tensor([0, 1, 0]), torch.tensor([0, 1, 1]), 2, ignore_index=1)
    assert cm.tolist() == [[1, 0], [0, 0]]


# ---------------------------------------------------------- boundary bands
def test_boundary_width():
    assert boundary_width(224, 224) == 6  # round(0.02 * 316.8) = round(6.34)
    assert boundary_width(1024, 1024) == 29  # round(28.96)
    assert boundary_width(10, 10) == 1  # round(0.28) = 0 -> at least 1
    assert boundary_width(300, 400, ratio=0.1) == 50
    with pytest.raises(ValueError):
        boundary_width(0, 10)
    with pytest.raises(ValueError):
        boundary_width(10, 10, ratio=0.0)


def test_band_of_filled_square_is_its_ring():
    img = torch.zeros(20, 20, dtype=torch.long)
    img[5:15, 5:15] = 1
    ring = torch.zeros(20, 20, dtype=torch.bool)
    ring[5:15, 5:15] = True
    ring[7:13, 7:13] = False  # 10x10 square minus its 6x6 interior: a 2-px ring
    band = boundary_band(img, 1, 2)
    assert band.dtype == torch.bool
    assert torch.equal(band, ring) and int(band.sum()) == 64
    # the band of the surroundings is the 2-px ring just outside the square plus
    # the 2-px frame along the image border (the border counts as contour)
    outside = boundary_band(img, 0, 2)
    expect = torch.zeros(20, 20, dtype=torch.bool)
    expect[3:17, 3:17] = True
    expect[5:15, 5:15] = False
    expect[:2, :] = expect[-2:, :] = expect[:, :2] = expect[:, -2:] = True
    assert torch.equal(outside, expect)


def test_image_border_counts_as_contour():
    img = torch.zeros(12, 12, dtype=torch.long)
    img[:6, :6] = 1  # square in the corner, touching two image edges
    band = boundary_band(img, 1, 1)
    expect = torch.zeros(12, 12, dtype=torch.bool)
    expect[:6, :6] = True
    expect[1:5, 1:5] = False
    assert torch.equal(band, expect)
    full = boundary_band(torch.zeros(6, 8, dtype=torch.long), 0, 2)
    assert int(full.sum()) == 6 * 8 - 2 * 4  # whole image: only the 2x4 centre is not band
    assert not boundary_band(img, 7, 1).any()  # absent label: empty band
    assert torch.equal(boundary_band(img, 1, 50), img == 1)  # width beyond the image: whole mask


def test_band_matches_per_pixel_reference():
    gen = torch.Generator().manual_seed(4)
    for shape, d in [((9, 13), 1), ((10, 10), 2), ((7, 12), 3), ((5, 6), 8), ((1, 9), 1)]:
        _, labels = random_maps(gen, shape, 3, ignore_frac=0.1)
        for lab in (0, 1, 2, IGNORE):
            band = boundary_band(labels, lab, d)
            got = {tuple(ij) for ij in band.nonzero().tolist()}
            assert got == ref_band(labels, lab, d), (shape, d, lab)


def test_boundary_band_errors():
    with pytest.raises(ValueError, match="H x W"):
        boundary_band(torch.zeros(2, 3, 3, dtype=torch.long), 0, 1)
    with pytest.raises(ValueError, match=">= 1"):
        boundary_band(torch.zeros(3, 3, dtype=torch.long), 0, 0)


def test_boundary_counts_match_reference():
    gen = torch.Generator().manual_seed(5)
    for shape, ratio in [((12, 12), 0.02), ((10, 14), 0.1), ((16, 9), 0.2)]:
        d = boundary_width(*shape, ratio=ratio)
        for _ in range(3):
            pred, target = random_maps(gen, shape, 4)
            inter, union = boundary_counts(pred, target, 4, ratio=ratio)
            ref_i, ref_u = ref_boundary_counts(pred, target, 4, d)
            assert torch.equal(inter, ref_i) and torch.equal(union, ref_u), (shape, ratio)
            assert (inter <= union).all()


def test_boundary_counts_errors():
    t = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="one H x W image"):
        boundary_counts(t, t, 2)
    with pytest.raises(ValueError, match="same shape"):
        boundary_counts(t[0], t[0, :3], 2)


# ------------------------------------------------------------------- meter
def test_accumulation_is_one_confusion_matrix_not_a_mean_of_images():
    # images of different sizes: the meter must equal one confusion matrix over the
    # concatenated pixels (and the pixel-set reference), not the mean of per-image scores
    gen = torch.Generator().manual_seed(6)
    preds, targets = [], []
    for h, w in [(8, 8), (6, 10), (12, 5)]:
        p, t = random_maps(gen, (h, w), 3)
        preds.append(p)
        targets.append(t)
    meter = SegmentationMeter(2, ["a", "b"])
    for p, t in zip(preds, targets, strict=True):
        meter.update(p, t)
    res = meter.compute()
    cat_p = torch.cat([p.flatten() for p in preds])
    cat_t = torch.cat([t.flatten() for t in targets])
    pooled = scores_from_confusion(confusion_matrix(cat_p, cat_t, 3), 2)
    assert_scores_close(res, pooled)
    assert_scores_close(res, ref_scores(cat_p, cat_t, 2))
    per_image = [
        scores_from_confusion(confusion_matrix(p, t, 3), 2)["mIoU"]
        for p, t in zip(preds, targets, strict=True)
    ]
    assert res["mIoU"] != pytest.approx(sum(per_image) / len(per_image))
    # boundary counts are summed over images, then divided once
    inter = sum(boundary_counts(p, t, 3)[0] for p, t in zip(preds, targets, strict=True))
    union = sum(boundary_counts(p, t, 3)[1] for p, t in zip(preds, targets, strict=True))
    assert res["biou"] == pytest.approx((inter / union).tolist(), nan_ok=True)


def test_batch_update_equals_per_image_updates():
    gen = torch.Generator().manual_seed(7)
    pred, target = random_maps(gen, (4, 11, 13), 4)
    batched, single = SegmentationMeter(3), SegmentationMeter(3)
    batched.update(pred.to(torch.uint8), target.to(torch.uint8))
    for p, t in zip(pred, target, strict=True):
        single.update(p, t)
    assert torch.equal(batched.confusion, single.confusion)
    assert torch.equal(batched.boundary_intersection, single.boundary_intersection)
    assert torch.equal(batched.boundary_union, single.boundary_union)


def test_merge_equals_single_meter():
    gen = torch.Generator().manual_seed(8)
    data = [random_maps(gen, (2, 10, 10), 4) for _ in range(4)]
    whole, first, second = SegmentationMeter(3), SegmentationMeter(3), SegmentationMeter(3)
    for i, (p, t) in enumerate(data):
        whole.update(p, t)
        (first if i % 2 else second).update(p, t)
    first.merge(second)
    a, b = first.compute(), whole.compute()
    assert a["confusion"] == b["confusion"]
    for k in ("mIoU", "mDice", "FwIoU", "pixel_acc", "bIoU", "iou", "dice", "biou"):
        assert a[k] == pytest.approx(b[k], nan_ok=True), k
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(SegmentationMeter(2))
    with pytest.raises(ValueError, match="cannot merge"):
        first.merge(SegmentationMeter(3, boundary_ratio=0.05))


def test_meter_compute_keys_and_validation():
    meter = SegmentationMeter(2, ["TUM", "STR"])
    empty = meter.compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["bIoU"])
    meter.update(HAND_PRED, HAND_TARGET)
    res = meter.compute()
    assert res["class_names"] == ["TUM", "STR", "background"]
    assert res["confusion"] == [[3, 1, 0], [1, 3, 0], [0, 1, 6]]
    assert {"iou", "dice", "biou", "mIoU", "mDice", "FwIoU", "pixel_acc", "bIoU"} <= res.keys()
    assert all(isinstance(res[k], float) for k in ("mIoU", "mDice", "FwIoU", "pixel_acc", "bIoU"))
    meter.reset()
    assert meter.confusion.sum() == 0 and meter.boundary_union.sum() == 0
    assert SegmentationMeter(2).compute()["class_names"] == ["class0", "class1", "background"]
    with pytest.raises(ValueError, match="2 class names"):
        SegmentationMeter(3, ["a", "b"])
    with pytest.raises(ValueError, match="B x H x W"):
        meter.update(torch.zeros(5, dtype=torch.long), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="target holds values"):
        meter.update(torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), 3))


# ------------------------------------------------------------------- table
def test_format_table():
    meter = SegmentationMeter(2, ["TUM", "STR"])
    meter.update(HAND_PRED, HAND_TARGET)
    res = meter.compute()
    res["iou"][1] = math.nan  # NaN prints as n/a
    table = format_table(res)
    lines = table.splitlines()
    assert lines[0].startswith("| class | IoU | Dice | bIoU | FwIoU | pixel acc |")
    assert lines[2].startswith("| TUM | 60.00 | 75.00 |")
    assert lines[3].startswith("| STR | n/a | 66.67 |")
    assert lines[4].startswith("| background | 85.71 | 92.31 |")
    assert "**55.00**" in lines[5] and "**69.33**" in lines[5] and "**80.00**" in lines[5]
    # a plain scores dict works too
    assert "label 2" in format_table(scores_from_confusion(torch.eye(3, dtype=torch.long), 2))


# --------------------------------------------------------- property tests
@st.composite
def label_maps(draw, max_classes=4, max_side=9):
    c = draw(st.integers(1, max_classes))
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    values = st.integers(0, c)  # tissue 0..c-1, background c
    target = draw(st.lists(st.one_of(values, st.just(IGNORE)), min_size=h * w, max_size=h * w))
    pred = draw(st.lists(values, min_size=h * w, max_size=h * w))
    return c, torch.tensor(pred).view(h, w), torch.tensor(target).view(h, w)


@settings(max_examples=40, deadline=None)
@given(maps=label_maps(), seed=st.integers(0, 2**31 - 1))
def test_permuting_tissue_ids_leaves_scores_unchanged(maps, seed):
    c, pred, target = maps
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    lut = torch.arange(256)
    lut[:c] = perm  # background and ignore stay where they are
    a, b = SegmentationMeter(c), SegmentationMeter(c)
    a.update(pred, target)
    b.update(lut[pred], lut[target])
    ra, rb = a.compute(), b.compute()
    for k in ("mIoU", "mDice", "bIoU", "FwIoU", "pixel_acc"):
        assert ra[k] == pytest.approx(rb[k], abs=1e-12, nan_ok=True), k
    for k in ("iou", "dice", "biou"):
        moved = [rb[k][int(perm[i])] for i in range(c)] + [rb[k][c]]
        assert moved == pytest.approx(ra[k], nan_ok=True), k


@settings(max_examples=40, deadline=None)
@given(maps=label_maps(), ratio=st.sampled_from([0.02, 0.1, 0.3]))
def test_perfect_prediction_scores_one_and_biou_at_most_one(maps, ratio):
    c, pred, target = maps
    valid = target != IGNORE
    perfect = SegmentationMeter(c, boundary_ratio=ratio)
    perfect.update(torch.where(valid, target, pred), target)
    res = perfect.compute()
    present = set(target[valid].tolist())
    for lab in range(c + 1):
        if lab in present:
            assert res["iou"][lab] == res["dice"][lab] == res["biou"][lab] == 1.0
    if present & set(range(c)):
        assert res["mIoU"] == res["mDice"] == res["bIoU"] == 1.0
    if present:
        assert res["FwIoU"] == res["pixel_acc"] == 1.0

    meter = SegmentationMeter(c, boundary_ratio=ratio)
    meter.update(pred, target)
    res = meter.compute()
    for v in [*res["biou"], res["bIoU"], *res["iou"], res["mIoU"]]:
        assert math.isnan(v) or 0.0 <= v <= 1.0
    assert_scores_close(res, ref_scores(pred, target, c))
    inter, union = ref_boundary_counts(
        pred, target, c + 1, boundary_width(*target.shape, ratio=ratio)
    )
    assert torch.equal(meter.boundary_intersection, inter)
    assert torch.equal(meter.boundary_union, union)
