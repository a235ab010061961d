"""Tests of public/train/metrics.py: the four metrics and the original's xx-yy digits."""
import numpy as np
import pytest
import torch

from public.model import OptimizedAFNet
from public.test import (abs_sum, binary_metrics, classification_metrics, predict_proba,
                         score_digits, selection_score, worst_metric)


def _metrics(f1, accuracy, precision, recall):
    return dict(f1=f1, accuracy=accuracy, precision=precision, recall=recall)


@pytest.mark.parametrize('metrics,digits', [
    (_metrics(1.0, 1.0, 1.0, 1.0), (100, 100)),
    (_metrics(1.0, 0.57, 0.8, 0.9), (100, 57)),          # 0.57 * 100 == 56.99999999999999
    (_metrics(0.58, 0.29, 0.56, 0.57), (58, 29)),        # 0.58, 0.29: binary fractions too
    (_metrics(0.999, 0.995, 0.991, 0.9999), (99, 99)),   # truncated, never rounded up to 100
    (_metrics(0.0, 0.5, 0.0, 0.0), (50, 0)),
    (_metrics(0.9712, 0.9688, 0.97, 0.9801), (98, 96)),
    (_metrics(0.07, 0.14, 0.28, 0.56), (56, 7)),
])
def test_score_digits_are_int_100_max_and_min(metrics, digits):
    assert score_digits(metrics) == digits


@pytest.mark.parametrize('y_true,y_pred,expected', [
    ([1, 1, 0, 0], [1, 0, 0, 0], _metrics(2 / 3, 0.75, 1.0, 0.5)),
    ([1, 1, 0, 0], [1, 1, 0, 0], _metrics(1.0, 1.0, 1.0, 1.0)),
    ([1, 1, 0, 0], [0, 0, 0, 0], _metrics(0.0, 0.5, 0.0, 0.0)),     # no AF predicted: 0, no warning
    ([0, 0, 0, 0], [0, 0, 0, 0], _metrics(0.0, 1.0, 0.0, 0.0)),     # no AF at all
    ([1, 0, 1, 0, 1], [1, 1, 1, 0, 0], _metrics(2 / 3, 0.6, 2 / 3, 2 / 3)),
])
def test_binary_metrics_of_class_af(y_true, y_pred, expected):
    got = binary_metrics(np.array(y_true), np.array(y_pred))
    assert got == pytest.approx(expected)
    assert worst_metric(got) == pytest.approx(min(expected.values()))


@pytest.mark.parametrize('y,probs,expected', [
    ([0, 1], [[1.0, 0.0], [0.0, 1.0]], 0.0),
    ([0, 1], [[0.0, 1.0], [1.0, 0.0]], 2.0),
    ([0], [[0.5, 0.5]], 1.0),
    ([2, 0], [[0.1, 0.1, 0.8], [0.7, 0.2, 0.1]], (0.4 + 0.6) / 2),
])
def test_abs_sum_is_seed_003s_metric(y, probs, expected):
    assert abs_sum(np.array(y), np.array(probs)) == pytest.approx(expected)


def test_classification_metrics_binary_and_multi_class():
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    m = classification_metrics(np.array([0, 1, 1, 0]), probs)
    assert m['accuracy'] == 0.5 and m['auc'] == pytest.approx(0.75)
    assert m['abs_sum'] == pytest.approx(np.mean([0.2, 0.4, 1.2, 1.4]))
    probs3 = np.eye(3)[[0, 1, 2, 2]]
    m3 = classification_metrics(np.array([0, 1, 2, 1]), probs3, 3)
    assert m3['accuracy'] == 0.75 and 'auc' not in m3
    assert m3['recall'] == pytest.approx((1 + 0.5 + 1) / 3)       # macro
    assert m3['precision'] == pytest.approx((1 + 1 + 0.5) / 3)


@pytest.mark.parametrize('select_metric,expected', [
    ('min4', 0.5), ('f1', 0.8), ('accuracy', 0.9), ('auc', 0.95), ('abs_sum', 1 - 0.3 / 2),
])
def test_selection_score(select_metric, expected):
    metrics = dict(f1=0.8, accuracy=0.9, precision=0.5, recall=0.7, auc=0.95, abs_sum=0.3)
    assert selection_score(metrics, select_metric) == pytest.approx(expected)


def test_an_undefined_auc_never_wins():
    assert selection_score(dict(auc=float('nan')), 'auc') == 0.0


def test_predict_proba_is_a_softmax_per_segment_in_batches():
    torch.manual_seed(0)
    model = OptimizedAFNet(input_size=1250).train()
    x = np.random.default_rng(0).standard_normal((7, 1, 1250)).astype(np.float32)
    probs = predict_proba(model, x, torch.device('cpu'), batch_size=3)
    assert not model.training
    assert probs.shape == (7, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    whole = predict_proba(model, x, torch.device('cpu'), batch_size=100)
    np.testing.assert_allclose(probs, whole, rtol=1e-5, atol=1e-6)
