"""Every metric against an independent computation: scikit-learn, hand-checkable bins, a hand formula."""
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix as sk_confusion_matrix
from sklearn.metrics import precision_recall_fscore_support, top_k_accuracy_score
from torchmetrics.functional.classification import multiclass_calibration_error

from timm_gradattn.metrics import (
    METRIC_KEYS, classification_metrics, confusion_matrix, evaluate_logits, reliability_bins, topk_accuracy,
    topk_informs,
)


def _predictions(num_samples: int, num_classes: int, seed: int, skew: bool = False):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_samples, num_classes, generator=generator, dtype=torch.float64) * 2
    targets = torch.randint(0, num_classes, (num_samples,), generator=generator)
    if skew:
        # Class 0 never predicted, the last class absent from both targets and predictions.
        logits[:, 0] = -1e3
        logits[:, -1] = -1e3
        targets[targets == num_classes - 1] = 1
    return logits, targets


def _log_probs(probs):
    """Logits whose softmax is exactly ``probs`` (up to rounding)."""
    return torch.tensor(probs, dtype=torch.float64).log()


@pytest.mark.parametrize('num_classes, skew', [(2, False), (7, False), (12, True)])
def test_precision_recall_f1_match_scikit_learn(num_classes, skew):
    logits, targets = _predictions(300, num_classes, seed=num_classes, skew=skew)
    metrics = classification_metrics(logits, targets)
    predicted = logits.argmax(dim=1).numpy()
    for average in ('macro', 'weighted'):
        precision, recall, f1, _ = precision_recall_fscore_support(
            targets.numpy(), predicted, average=average, zero_division=0)
        assert metrics[f'precision_{average}'] == pytest.approx(precision, abs=1e-12)
        assert metrics[f'recall_{average}'] == pytest.approx(recall, abs=1e-12)
        assert metrics[f'f1_{average}'] == pytest.approx(f1, abs=1e-12)
    assert tuple(metrics) == METRIC_KEYS


def test_topk_matches_scikit_learn_and_caps_k():
    logits, targets = _predictions(250, 6, seed=3)
    labels = np.arange(6)
    for k in (1, 3, 5):
        expected = 100 * top_k_accuracy_score(targets.numpy(), logits.numpy(), k=k, labels=labels)
        assert topk_accuracy(logits, targets, k) == pytest.approx(expected, abs=1e-12)
    # k larger than the number of classes: every target is among the "top k".
    assert topk_accuracy(logits, targets, 10) == 100.0


@pytest.mark.parametrize('num_classes, recorded', [(2, {'top1'}), (3, {'top1'}), (4, {'top1', 'top3'}),
                                                   (5, {'top1', 'top3'}), (6, {'top1', 'top3', 'top5'})])
def test_topk_of_k_at_least_the_classes_is_recorded_as_none(num_classes, recorded):
    # Top-3 and top-5 of a 3-class model are 100 % whatever it predicts: the keys stay (results.json and metrics.json
    # readers find them), the value is None.
    logits, targets = _predictions(60, num_classes, seed=num_classes)
    metrics = classification_metrics(logits, targets)
    assert tuple(metrics) == METRIC_KEYS
    assert {key for key in ('top1', 'top3', 'top5') if metrics[key] is not None} == recorded
    assert all(metrics[key] == topk_accuracy(logits, targets, int(key[3:])) < 100 for key in recorded)
    assert [k for k in (1, 3, 5) if topk_informs(k, num_classes)] == sorted(int(key[3:]) for key in recorded)


def test_percentages_are_exact_decimals():
    # 57 of 200 correct is 28.5 %, not the 28.499999 % a float32 reduction gives.
    targets = torch.zeros(200, dtype=torch.long)
    logits = torch.zeros(200, 3)
    logits[:57, 0] = 1.0
    logits[57:, 1] = 1.0
    metrics = classification_metrics(logits, targets)
    assert metrics['top1'] == 28.5
    assert repr(metrics['top1']) == '28.5'
    assert metrics['recall_weighted'] == 0.285


def test_ties_rank_by_class_index_like_argmax():
    # An untrained head can output identical logits; top-1 must then agree with the confusion matrix.
    logits = torch.zeros(10, 4)
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    metrics = classification_metrics(logits, targets)
    counts = confusion_matrix(logits, targets)
    assert metrics['top1'] == 100.0 * counts.trace().item() / 10 == 30.0
    assert metrics['top3'] == 70.0  # classes 0, 1, 2 come first


def test_confusion_matrix_matches_scikit_learn():
    logits, targets = _predictions(120, 5, seed=5)
    expected = sk_confusion_matrix(targets.numpy(), logits.argmax(1).numpy(), labels=np.arange(5))
    assert confusion_matrix(logits, targets).numpy().tolist() == expected.tolist()


def test_one_evaluation_gives_the_metrics_and_what_the_plots_draw():
    logits, targets = _predictions(120, 5, seed=7)
    result = evaluate_logits(logits.float(), targets, num_classes=5, ece_bins=8)
    assert result.metrics == classification_metrics(logits.float(), targets, ece_bins=8)
    assert torch.equal(result.confusion, confusion_matrix(logits, targets))
    assert result.reliability == reliability_bins(logits.float().double().softmax(dim=1), targets, 8)
    assert result.reliability.ece == result.metrics['ece']
    assert result.per_class['support'].tolist() == torch.bincount(targets, minlength=5).tolist()
    # A model with more outputs than the dataset has classes keeps every prediction in the matrix.
    assert evaluate_logits(logits, targets, num_classes=3).confusion.shape == (5, 5)


def test_ece_on_hand_checkable_bins():
    # Two samples at confidence 0.95 (one right): bin (0.9, 1.0], |0.5 - 0.95| = 0.45.
    # Two at 0.65 (both right): bin (0.6, 0.7], |1.0 - 0.65| = 0.35.  ECE = 0.5 * 0.45 + 0.5 * 0.35 = 0.4.
    probs = [[0.95, 0.05], [0.95, 0.05], [0.65, 0.35], [0.35, 0.65]]
    targets = torch.tensor([0, 1, 0, 1])
    metrics = classification_metrics(_log_probs(probs), targets)
    assert metrics['ece'] == pytest.approx(0.4, abs=1e-12)
    bins = reliability_bins(torch.tensor(probs), targets)
    assert bins.count == [0, 0, 0, 0, 0, 0, 2, 0, 0, 2]
    assert bins.accuracy[6] == 1.0 and bins.accuracy[9] == 0.5


def test_ece_bins_are_closed_on_the_right():
    # Confidence exactly 0.5 belongs to (0.4, 0.5]; exactly 1.0 to the last bin (0.9, 1.0].
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]], dtype=torch.float64)
    bins = reliability_bins(probs, torch.tensor([0, 0]))
    assert bins.count[4] == 1 and bins.count[9] == 1
    assert bins.ece == pytest.approx(0.5 * 0.5 + 0.5 * 0.0)


def test_ece_agrees_with_torchmetrics_away_from_bin_edges():
    logits, targets = _predictions(500, 10, seed=6)
    confidence = logits.softmax(1).max(1).values
    assert ((confidence * 10 - (confidence * 10).round()).abs() > 1e-6).all()
    expected = multiclass_calibration_error(logits.softmax(1), targets, num_classes=10, n_bins=10, norm='l1')
    assert classification_metrics(logits, targets)['ece'] == pytest.approx(float(expected), abs=1e-5)


def test_nll_matches_hand_formula():
    logits, targets = _predictions(64, 4, seed=7)
    rows = logits.numpy()
    expected = -np.mean([row[t] - math.log(np.exp(row).sum()) for row, t in zip(rows, targets.numpy())])
    assert classification_metrics(logits, targets)['nll'] == pytest.approx(expected, abs=1e-12)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match=r'\[0, 2\].*5'):
        classification_metrics(torch.zeros(2, 3), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match='empty'):
        classification_metrics(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long))
    with pytest.raises(ValueError, match=r'\(N, C\)'):
        classification_metrics(torch.zeros(3), torch.zeros(3, dtype=torch.long))


def test_non_finite_logits_are_refused_not_scored():
    # NaN compares false with everything: unchecked, a NaN row ranks its target first and scores top-1 100 %.
    logits = torch.randn(6, 4)
    logits[2] = float('nan')
    logits[4, 1] = float('inf')
    with pytest.raises(ValueError, match='2 of 6 samples have NaN or infinite logits'):
        classification_metrics(logits, torch.arange(6) % 4)
