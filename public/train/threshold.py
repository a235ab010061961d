"""CALIBRATE_THRESHOLD: choose a binary classifier's decision threshold on validation and
fold it into the model, so the exported ONNX file's argmax is the calibrated decision.

    t = pick_threshold(probs_val, y_val, 'min4', subjects, scoring)   # P(class 1) > t
    fold_threshold(model, t, example)                                 # argmax == (p1 > t)

Pure functions (numpy, torch). A 2-logit softmax head decides class 1 when
p1 > t  <=>  z1 - z0 > log(t / (1 - t)), so subtracting log(t / (1 - t)) from the class-1
bias of the last nn.Linear moves the argmax decision to t: no post-processing, and every
consumer of the logits (evaluation, the ONNX file, predict.py, INT8 quantization) sees it.

Candidates: the midpoints between consecutive distinct validation probabilities (at most
GRID of them, spread evenly over the sorted distinct values, i.e. their quantiles), so no
validation segment lies on a boundary, plus 0.5 (the uncalibrated decision, so the choice
never scores below it on validation). The best score wins; ties go to the candidate
nearest 0.5, then to the smaller. SELECT_METRIC decides; 'auc' (rank-based, unchanged by
the fold) and 'abs_sum' (probabilities, not decisions) do not depend on a threshold, so
they choose it by 'min4', the original's worst of F1/accuracy/precision/recall.
"""
import math

import numpy as np
import torch
from torch import nn

from public.train.metrics import (METRIC_NAMES, Scoring, add_contest_score, contest_metrics,
                                  predict_proba)

GRID = 200                     # candidate thresholds at most (plus 0.5)
THRESHOLD_FREE = ('auc', 'abs_sum')     # SELECT_METRIC values a threshold does not decide
_TIE = 1e-12


def decision_metric(select_metric):
    """The metric that chooses the threshold for SELECT_METRIC (min4 for auc, abs_sum)."""
    return 'min4' if select_metric in THRESHOLD_FREE else select_metric


def candidate_thresholds(p1, grid=GRID):
    """Sorted candidate thresholds in (0, 1) for the probabilities p1 of class 1."""
    p1 = np.asarray(p1, dtype=np.float64)
    values = np.unique(p1[np.isfinite(p1)])
    cands = [0.5]
    if len(values) > 1:
        idx = np.unique(np.round(np.linspace(0, len(values) - 2,
                                             min(grid, len(values) - 1))).astype(np.int64))
        mids = (values[idx] + values[idx + 1]) / 2.0
        cands += [float(m) for m in mids if 0.0 < m < 1.0]
    return np.unique(np.asarray(cands, dtype=np.float64))


def _counts(p1, y, thresholds):
    """(tp, fp, fn, tn) arrays, one entry per threshold, of the decision p1 > t."""
    order = np.sort(p1)
    pos = np.sort(p1[y == 1])
    n, n_pos = len(p1), len(pos)
    above = n - np.searchsorted(order, thresholds, side='right')        # predicted 1
    tp = n_pos - np.searchsorted(pos, thresholds, side='right')
    fp = above - tp
    fn = n_pos - tp
    tn = n - n_pos - fp
    return tp, fp, fn, tn


def _ratio(num, den):
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def threshold_scores(probs, y, metric, subjects=None, scoring=None, grid=GRID):
    """(candidates, scores): the score of each candidate threshold on (probs, y) by
    `metric` (a SELECT_METRIC value; decision_metric() maps the threshold-free ones).
    probs: (N, 2) class probabilities or (N,) P(class 1); y: 0/1 labels."""
    probs = np.asarray(probs, dtype=np.float64)
    p1 = probs[:, 1] if probs.ndim == 2 else probs
    y = np.asarray(y).astype(np.int64)
    metric = decision_metric(metric)
    cands = candidate_thresholds(p1, grid)
    if len(p1) == 0:
        return cands, np.zeros(len(cands))
    if metric in ('min4', 'f1', 'accuracy', 'fbeta'):
        # vectorised over the candidates; the definitions of metrics.binary_metrics
        # (sklearn, zero_division=0) and contest.fbeta
        tp, fp, fn, tn = _counts(p1, y, cands)
        beta2 = (scoring or Scoring()).beta ** 2
        values = {'f1': _ratio(2 * tp, 2 * tp + fp + fn),
                  'accuracy': _ratio(tp + tn, tp + fp + fn + tn),
                  'precision': _ratio(tp, tp + fp), 'recall': _ratio(tp, tp + fn),
                  'fbeta': _ratio((1 + beta2) * tp, (1 + beta2) * tp + beta2 * fn + fp)}
        if metric == 'min4':
            return cands, np.min([values[m] for m in METRIC_NAMES], axis=0)
        return cands, values[metric]
    scoring = scoring or Scoring()
    scores = []
    for t in cands:                      # subj_fbeta, gen, contest: per-subject figures
        m = contest_metrics(y, (p1 > t).astype(np.int64), subjects, scoring)
        if metric == 'contest':          # latency and size do not depend on the threshold
            m = add_contest_score(m, scoring, 1.0, 1024, macs=0)
        value = m.get(metric, float('nan'))
        scores.append(0.0 if value != value else float(value))
    return cands, np.asarray(scores, dtype=np.float64)


def pick_threshold(probs, y, metric, subjects=None, scoring=None, grid=GRID):
    """The threshold t (P(class 1) > t decides class 1) that maximises `metric` on
    (probs, y); ties go to the candidate nearest 0.5, then the smaller; 0.5 for no data."""
    cands, scores = threshold_scores(probs, y, metric, subjects, scoring, grid)
    best = scores.max()
    tied = cands[scores >= best - _TIE]
    return float(min(tied, key=lambda t: (abs(t - 0.5), t)))


def threshold_logit(t):
    """log(t / (1 - t)): the logit margin z1 - z0 at which p1 = t."""
    if not 0.0 < t < 1.0:
        raise ValueError(f"a decision threshold must be in (0, 1), got {t!r}")
    return math.log(t / (1.0 - t))


def _head(model, example):
    """The nn.Linear whose output is the model's output (found by a forward pass on
    `example`), else the last nn.Linear with 2 outputs."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if example is not None:
        outputs, hooks = {}, []
        for m in linears:
            hooks.append(m.register_forward_hook(
                lambda mod, args, out: outputs.__setitem__(id(mod), out)))
        try:
            with torch.no_grad():
                final = model(example)
        finally:
            for h in hooks:
                h.remove()
        for m in linears:
            if outputs.get(id(m)) is final:
                return m
    heads = [m for m in linears if m.out_features == 2]
    return heads[-1] if heads else None


def fold_threshold(model, t, example=None):
    """Make argmax(model(x)) decide class 1 exactly when p1 > t (p1 = the softmax of the
    model's logits before the fold): subtract log(t / (1 - t)) from the class-1 bias of its
    output layer (the last nn.Linear, 2 outputs, with a bias). With `example` (an input
    batch) the head is found by a forward pass and the fold is checked on it: a model whose
    logits are not that layer's output plus a constant raises ValueError, unchanged.
    Returns the model (changed in place; the state dict keeps its keys)."""
    shift = threshold_logit(t)
    if shift == 0.0:
        return model
    was_training = model.training
    model.eval()
    try:
        head = _head(model, example)
        if head is None or head.out_features != 2 or head.bias is None:
            raise ValueError(
                "CALIBRATE_THRESHOLD: cannot fold the threshold into this model: it needs a "
                "final nn.Linear with 2 outputs and a bias (the logits of a binary task), "
                f"found {head!r}")
        before = None
        if example is not None:
            with torch.no_grad():
                before = model(example).double()
        with torch.no_grad():
            head.bias[1] -= shift
        if before is not None:
            with torch.no_grad():
                after = model(example).double()
            expected = before.clone()
            expected[:, 1] -= shift
            if not torch.allclose(after, expected, rtol=1e-4, atol=1e-4 * (1 + abs(shift))):
                with torch.no_grad():
                    head.bias[1] += shift
                raise ValueError(
                    "CALIBRATE_THRESHOLD: cannot fold the threshold into this model: changing "
                    "the bias of its last nn.Linear does not shift its class-1 logit (the "
                    "layer is not the output layer)")
    finally:
        model.train(was_training)
    return model


def calibrate(model, data, settings):
    """CALIBRATE_THRESHOLD on a trained model: pick the threshold on the validation split
    (data.trial.x_val / y_val, data.val_subjects) by SELECT_METRIC and fold it into the
    model (in place). Returns the threshold (0.5: nothing changed)."""
    x_val = data.trial.x_val
    if len(x_val) == 0:
        return 0.5
    probs = predict_proba(model, x_val, data.device)
    t = pick_threshold(probs, data.trial.y_val.cpu().numpy(), settings.SELECT_METRIC,
                       data.val_subjects, Scoring.of(settings))
    fold_threshold(model, t, x_val[:16].to(data.device).unsqueeze(-1))
    return t
