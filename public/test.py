"""Evaluation: predictions in batches, the four metrics, and the original's xx/yy digits.

    probs = predict_proba(model, x, device)          # (N, classes) softmax
    metrics = binary_metrics(y, probs.argmax(1))     # f1, accuracy, precision, recall
    xx, yy = score_digits(metrics)                   # int(100*max), int(100*min)
"""
import math

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from tqdm import tqdm

METRIC_NAMES = ('f1', 'accuracy', 'precision', 'recall')


@torch.inference_mode()
def predict_proba(model, x, device, batch_size=1024, progress=False, desc='eval'):
    """Softmax probabilities of model on x ((N, C, L) array or tensor), in eval mode."""
    model.eval()
    x = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=None if progress else True, leave=False):
        batch = x[i:i + batch_size].to(device, non_blocking=True).unsqueeze(-1)
        out.append(torch.softmax(model(batch).float(), dim=1).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def binary_metrics(y_true, y_pred):
    """F1, accuracy, precision and recall of class 1 (AF); 0 where undefined (no positives)."""
    return {
        'f1': float(f1_score(y_true, y_pred, zero_division=0)),
        'accuracy': float(accuracy_score(y_true, y_pred)),
        'precision': float(precision_score(y_true, y_pred, zero_division=0)),
        'recall': float(recall_score(y_true, y_pred, zero_division=0)),
    }


def _percent_digits(value):
    # The original's int(100*v), but immune to binary fractions: 0.57*100 = 56.999999...
    return int(math.floor(100 * value + 1e-9))


def score_digits(metrics):
    """(xx, yy) = (int(100*max), int(100*min)) of the four metrics; 1.0 gives 100."""
    values = [metrics[name] for name in METRIC_NAMES]
    return _percent_digits(max(values)), _percent_digits(min(values))


def worst_metric(metrics):
    """The minimum of F1, accuracy, precision and recall (what pruning and targets use)."""
    return min(metrics[name] for name in METRIC_NAMES)
