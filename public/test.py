"""The metrics API, where users and tests look for it (the code is public/train/metrics.py).

    metrics = classification_metrics(y, probs, classes)   # f1, accuracy, precision, recall, ...
    xx, yy = score_digits(metrics)                         # the original's result folder digits
"""
from public.train.metrics import (METRIC_NAMES, abs_sum, binary_metrics, classification_metrics,
                                  multilabel_metrics, percent, predict_proba, probabilities,
                                  score_digits, selection_score, worst_metric)

__all__ = ['METRIC_NAMES', 'abs_sum', 'binary_metrics', 'classification_metrics',
           'multilabel_metrics', 'percent', 'predict_proba', 'probabilities', 'score_digits',
           'selection_score', 'worst_metric']
