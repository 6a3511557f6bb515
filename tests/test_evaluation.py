"""Confusion matrix, IoU/mIoU (NaN for absent classes), streaming meter."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from floss.core.evaluation import ConfusionMeter, confusion_matrix, iou_percent_dict, miou


def test_hand_computed_example():
    gt = torch.tensor([[0, 0, 1], [2, 255, 1]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1], [1, 0, 1]])
    conf = confusion_matrix(pred, gt, num_classes=4)
    assert conf.dtype == torch.int64
    assert conf.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]]  # rows = ground truth
    iou, mean = miou(conf)
    # class 0: I=1, U=2; class 1: I=2, U=4; class 2: I=0, U=1 (present, counts 0); class 3 absent: NaN
    assert iou[:3].tolist() == [0.5, 0.5, 0.0] and math.isnan(iou[3])
    assert mean == pytest.approx(1 / 3)
    assert iou_percent_dict(iou, ["a", "b", "c", "d"]) == {"a": 50.0, "b": 50.0, "c": 0.0, "d": None}


def test_no_ignore_and_all_absent():
    conf = confusion_matrix(torch.tensor([0, 1]), torch.tensor([1, 1]), 2, ignore_index=None)
    assert conf.tolist() == [[0, 0], [1, 1]]
    iou, mean = miou(torch.zeros(3, 3, dtype=torch.long))
    assert bool(torch.isnan(iou).all()) and math.isnan(mean)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.lists(st.tuples(st.integers(0, 5), st.integers(0, 4)), min_size=1, max_size=40))
def test_confusion_matches_counting(k, pairs):
    gt = torch.tensor([g if g < k else 255 for g, _ in pairs])
    pred = torch.tensor([p % k for _, p in pairs])
    conf = confusion_matrix(pred, gt, k)
    expected = [[0] * k for _ in range(k)]
    for g, p in zip(gt.tolist(), pred.tolist()):
        if g != 255:
            expected[g][p] += 1
    assert conf.tolist() == expected
    iou, mean = miou(conf)
    for c in range(k):
        union = sum(expected[c]) + sum(row[c] for row in expected) - expected[c][c]
        assert (math.isnan(iou[c]) and union == 0) or iou[c] == pytest.approx(expected[c][c] / union)
    present = [v for v in iou.tolist() if not math.isnan(v)]
    assert (math.isnan(mean) and not present) or mean == pytest.approx(sum(present) / len(present))


def test_meter_streams_and_merges():
    g = torch.Generator().manual_seed(0)
    preds = [torch.randint(0, 3, (4, 5), generator=g) for _ in range(4)]
    gts = [torch.randint(0, 4, (4, 5), generator=g) for _ in range(4)]
    gts = [torch.where(x == 3, torch.tensor(255), x) for x in gts]
    total = confusion_matrix(torch.stack(preds), torch.stack(gts), 3)
    a, b = ConfusionMeter(3), ConfusionMeter(3)
    for i, (p, t) in enumerate(zip(preds, gts)):
        (a if i < 2 else b).update(p, t)
    merged = a.merge(b)
    assert torch.equal(merged.confusion, total) and merged.num_updates == 4
    assert torch.equal(a.confusion, confusion_matrix(torch.stack(preds[:2]), torch.stack(gts[:2]), 3))
    torch.testing.assert_close(merged.iou()[0], miou(total)[0], equal_nan=True)
    with pytest.raises(ValueError, match="other"):
        a.merge(ConfusionMeter(4))
    a.reset()
    assert int(a.confusion.sum()) == 0


@pytest.mark.parametrize("call, match", [
    (lambda: confusion_matrix(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long), 2),
     "pred, gt: expected equal shapes"),
    (lambda: confusion_matrix(torch.tensor([2]), torch.tensor([0]), 2), r"pred: expected labels in \[0, 1\]"),
    (lambda: confusion_matrix(torch.tensor([-1]), torch.tensor([0]), 2), "pred: expected labels"),
    (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([7]), 2), r"gt: expected labels .*\[7\]"),
    (lambda: confusion_matrix(torch.tensor([0.0]), torch.tensor([0]), 2), "pred: expected an integer"),
    (lambda: confusion_matrix(torch.tensor([0]), [0], 2), "gt: expected a torch.Tensor"),
    (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0]), 0), "num_classes"),
    (lambda: confusion_matrix(torch.tensor([0]), torch.tensor([0]), 3, ignore_index=1), "ignore_index"),
    (lambda: miou(torch.zeros(2, 3)), "confusion: expected a square"),
    (lambda: miou(-torch.ones(2, 2)), "confusion: expected non-negative"),
    (lambda: iou_percent_dict(torch.zeros(2, dtype=torch.float64), ["a"]), "class_names"),
])
def test_bad_inputs_name_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_per_template_iou_counts_absent_classes_as_zero_like_the_authors():
    """Main mIoU: a class absent from ground truth and prediction is NaN and left out; per-template IoU (the
    authors' EntropyMetric, protocol §9.12): I / (U + 1e-10), so it counts 0."""
    from floss.core.evaluation import miou
    conf = torch.tensor([[3, 1, 0], [0, 2, 0], [0, 0, 0]])        # class 2 never occurs
    iou, mean = miou(conf)
    assert math.isnan(iou[2]) and mean == pytest.approx((3 / 4 + 2 / 3) / 2)
    iou0, mean0 = miou(conf, absent="zero")
    assert iou0[2] == 0.0 and iou0[0] == pytest.approx(3 / (4 + 1e-10)) and mean0 == pytest.approx((3 / 4 + 2 / 3) / 3)
    with pytest.raises(ValueError, match="absent"):
        miou(conf, absent="skip")
