"""Contest scoring for binary AF detectors: pooled and per-subject F-beta, the generalisation
score G, and the IESD-2024 / TDC-2022 algorithm scores.

Pure functions on arrays; numpy and the standard library only. `y_true` and `y_pred` are 1-D
arrays of 0/1 (1 = AF, the positive class), `subjects` an array of the same length naming
each segment's subject (patient). Subjects are identified by their string form, and every
per-subject list is sorted by it.

F-beta of the positive class
----------------------------
From the confusion counts of the positive class (TP, FP, FN):

    F_beta = (1 + beta^2) TP / ((1 + beta^2) TP + beta^2 FN + FP)

beta = 2 in both contests (recall weighs four times precision: a missed AF costs more than
a false alarm). `fbeta` is the pooled figure over all segments and equals
`sklearn.metrics.fbeta_score(y_true, y_pred, beta=beta, zero_division=0)`: 0.0 when the
denominator is 0 (no positive segment and none predicted).

Per-subject figures and the no-positive rule
--------------------------------------------
IESD-2024 computes F-beta per test patient and averages the patients (`subject_average`).
A subject with no positive (AF) segment has TP = FN = 0, so its F-beta is 0/0 when nothing
was predicted positive and 0 after a single false alarm: the formula says nothing useful
there. `per_subject(..., no_positive=...)` chooses what such a subject scores (F-beta and
F1 alike):

- 'accuracy' (default, ATML's rule): its accuracy, i.e. the share of its segments correctly
  predicted negative (its specificity). Reason: F-beta is undefined there (0/0); the score
  stays in [0, 1], equals 1.0 when the model raises no false alarm on the subject and falls
  in proportion to the false alarms (one in 4 segments: 0.75), instead of all-or-nothing.
- 'skip': F-beta and F1 are None and the subject is left out of `subject_average` and
  `generalisation`, as a pure average of F-beta must.
- 'zero_division_1': 1.0 when nothing was predicted positive for the subject, else 0.0
  (sklearn's zero_division=1 per subject; one false alarm costs the whole subject).
- 'contest': 1.0 whatever was predicted. This is what the organisers' evaluation helpers
  do (the TDC-2022 demo's `help_code_demo.py`: `PPV` and `Sensitivity` return 1 when
  TP + FN = 0; the same `FB` is imported by the per-patient, G-scoring AF evaluation
  scripts in IESD-2024 participants' repositories): false alarms on a patient without AF
  cost nothing in F-beta or G there. Use it to reproduce a contest's figure.

A subject with no negative (non-AF) segment needs no rule: it has positives, so F-beta is
well defined from its counts (FP = 0, so F-beta = (1 + beta^2) TP / ((1 + beta^2) TP +
beta^2 FN), 0.0 when no AF segment was found).

Precision and recall in the rows follow the same logic: recall is None for a subject with no
positive (1.0 under 'contest'); precision is 0.0 for a subject with positives and no positive
prediction (as sklearn's zero_division=0 and the contest helpers), and None for a subject with
no positive and no positive prediction (0/0; 1.0 under 'contest', which also gives 1.0 after
false alarms there). `subject_average` and `generalisation` ignore None values.

The generalisation score G
--------------------------
IESD-2024's G is the share of test patients whose F-beta exceeds 0.9: `generalisation`
counts subjects whose value is strictly greater than the threshold (a subject at exactly
0.9 does not count; values within 1e-9 of the threshold count as equal to it, so float
noise cannot push an exact 0.9 over). The contest's script rounds each F-beta to 5 decimals
before comparing; the difference matters only for values in (0.9, 0.900005).

Contest scores
--------------
Each term x is normalised linearly over its range [lo, hi] and clipped to [0, 1]:
higher-is-better terms as (x - lo) / (hi - lo), lower-is-better ones as (hi - x) / (hi - lo).

- IESD-2024 (AF vs non-AF, 5 s at 250 Hz, Loongson 2K0500 board; ranges from the contest's
  problem page):
      score = 25 Fbn + 15 Gn + 35 Ln + 5 Mn, maximum 80,
  F-beta (beta = 2, averaged over test patients) over 0.5-1, G over 0-1, latency L (mean
  inference latency) over 0.5-50 ms, flash M (the program's size) over 50-1000 KiB;
  latency and flash lower is better, so Ln = (50 - L) / (50 - 0.5).
- TDC-2022 (ICCAD 2022 TinyML Design Contest scoring; 1250-sample IEGM segments, VA vs
  non-VA, STM32 board):
      score = 100 Fb + 20 Ln + 20 Mn, maximum 140,
  F-beta (beta = 2; the demo's test script pools all test segments) raw over 0-1, latency
  over 1-200 ms, memory over 5-256 KiB, lower is better.

`contest_terms` gives the normalised terms, `contest_score` the weighted sum, and
`normalised_contest_score` the score divided by the contest's maximum, in [0, 1] like
ATML's other selection metrics.

Proxies: the contests measure latency and flash on their boards. ATML measures onnxruntime
latency on the development machine and the ONNX file size; both are proxies for the board.
`latency_scale` multiplies the measured latency (e.g. the board's latency over this
machine's for a reference model) before it is normalised; the size is used as given (pass
the figure that best stands for the flash, in KiB).
"""
import math

import numpy as np

__all__ = ('CONTESTS', 'NO_POSITIVE_RULES', 'confusion_counts', 'fbeta', 'per_subject',
           'subject_average', 'generalisation', 'contest_terms', 'contest_score',
           'normalised_contest_score')

NO_POSITIVE_RULES = ('accuracy', 'skip', 'zero_division_1', 'contest')

# Values within this distance of the G threshold count as equal to it (not above).
_THRESHOLD_TOLERANCE = 1e-9

CONTESTS = {
    'iesd2024': {
        'title': 'IESD-2024 (AF detection on a Loongson 2K0500 board)',
        'beta': 2.0,
        'fbeta_average': 'subject',
        'terms': {
            'fbeta': {'weight': 25.0, 'range': (0.5, 1.0), 'higher_is_better': True},
            'g': {'weight': 15.0, 'range': (0.0, 1.0), 'higher_is_better': True},
            'latency_ms': {'weight': 35.0, 'range': (0.5, 50.0), 'higher_is_better': False},
            'size_kib': {'weight': 5.0, 'range': (50.0, 1000.0), 'higher_is_better': False},
        },
        'maximum': 80.0,
        'source': 'IESD-2024 contest problem page: 25*Fbn + 15*Gn + 35*Ln + 5*Mn',
    },
    'tdc2022': {
        'title': 'TDC-2022 (ACM/IEEE TinyML Design Contest at ICCAD 2022)',
        'beta': 2.0,
        'fbeta_average': 'pooled',
        'terms': {
            'fbeta': {'weight': 100.0, 'range': (0.0, 1.0), 'higher_is_better': True},
            'latency_ms': {'weight': 20.0, 'range': (1.0, 200.0), 'higher_is_better': False},
            'size_kib': {'weight': 20.0, 'range': (5.0, 256.0), 'higher_is_better': False},
        },
        'maximum': 140.0,
        'source': 'ICCAD 2022 TinyML Design Contest scoring: 100*Fb + 20*Ln + 20*Mn',
    },
}


# --------------------------------------------------------------------------- arrays

def _labels(values, name):
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        bad = sorted({str(v) for v in arr[~np.isin(arr, (0, 1))].tolist()})[:5]
        raise ValueError(f"{name} must hold only 0 and 1, found {', '.join(bad)}")
    return arr.astype(np.int64)


def _pair(y_true, y_pred):
    t, p = _labels(y_true, 'y_true'), _labels(y_pred, 'y_pred')
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    return t, p


def _beta(beta):
    b = float(beta)
    if not (math.isfinite(b) and b > 0):
        raise ValueError(f"beta must be a positive number, got {beta!r}")
    return b


def _fbeta_counts(tp, fp, fn, beta):
    b2 = beta * beta
    den = (1.0 + b2) * tp + b2 * fn + fp
    return float((1.0 + b2) * tp / den) if den else 0.0


def confusion_counts(y_true, y_pred):
    """(tp, fp, fn, tn) of the positive class, as ints."""
    t, p = _pair(y_true, y_pred)
    tp = int(np.sum((t == 1) & (p == 1)))
    fp = int(np.sum((t == 0) & (p == 1)))
    fn = int(np.sum((t == 1) & (p == 0)))
    return tp, fp, fn, int(t.size - tp - fp - fn)


def fbeta(y_true, y_pred, beta=2.0):
    """Pooled F-beta of the positive class over all segments; equals
    sklearn.metrics.fbeta_score(y_true, y_pred, beta=beta, zero_division=0)."""
    b = _beta(beta)
    t, p = _pair(y_true, y_pred)
    if t.size == 0:
        raise ValueError("fbeta needs at least one segment")
    tp, fp, fn, _ = confusion_counts(t, p)
    return _fbeta_counts(tp, fp, fn, b)


# --------------------------------------------------------------------------- per subject

def _subject_row(subject, tp, fp, fn, tn, beta, no_positive):
    n = tp + fp + fn + tn
    positives = tp + fn
    accuracy = (tp + tn) / n
    if positives:
        fb, f1 = _fbeta_counts(tp, fp, fn, beta), _fbeta_counts(tp, fp, fn, 1.0)
        recall = tp / positives
        precision = tp / (tp + fp) if tp + fp else 0.0
    elif no_positive == 'contest':
        fb = f1 = recall = precision = 1.0
    else:
        recall = None
        precision = 0.0 if fp else None
        if no_positive == 'accuracy':
            fb = f1 = accuracy
        elif no_positive == 'zero_division_1':
            fb = f1 = 0.0 if fp else 1.0
        else:  # 'skip'
            fb = f1 = None
    return {'subject': subject, 'n': n, 'positives': positives, 'fbeta': fb, 'f1': f1,
            'accuracy': accuracy, 'precision': precision, 'recall': recall,
            'tp': tp, 'fp': fp, 'fn': fn, 'tn': tn}


def per_subject(y_true, y_pred, subjects, beta=2.0, no_positive='accuracy'):
    """One dict per subject, sorted by subject id as a string, with keys subject (str), n,
    positives, fbeta, f1, accuracy, precision, recall and the counts tp, fp, fn, tn.

    `no_positive` says what F-beta and F1 are for a subject without a positive segment
    (0/0 there): 'accuracy' (default: the share of its segments predicted negative), 'skip'
    (None), 'zero_division_1' (1.0 if nothing was predicted positive, else 0.0) or 'contest'
    (1.0, as the contests' evaluation helpers). See the module docstring."""
    b = _beta(beta)
    if no_positive not in NO_POSITIVE_RULES:
        raise ValueError(f"no_positive must be one of {', '.join(NO_POSITIVE_RULES)}, "
                         f"got {no_positive!r}")
    t, p = _pair(y_true, y_pred)
    subj = np.asarray(subjects)
    if subj.ndim != 1 or subj.shape != t.shape:
        raise ValueError(f"subjects must be a 1-D array as long as y_true ({t.size}), "
                         f"got shape {subj.shape}")
    if t.size == 0:
        return []
    keys = np.array([str(s) for s in subj.tolist()])
    names, idx = np.unique(keys, return_inverse=True)
    k = names.size
    tp = np.bincount(idx, weights=(t == 1) & (p == 1), minlength=k)
    fp = np.bincount(idx, weights=(t == 0) & (p == 1), minlength=k)
    fn = np.bincount(idx, weights=(t == 1) & (p == 0), minlength=k)
    tn = np.bincount(idx, weights=(t == 0) & (p == 0), minlength=k)
    order = sorted(range(k), key=lambda i: str(names[i]))
    return [_subject_row(str(names[i]), int(tp[i]), int(fp[i]), int(fn[i]), int(tn[i]), b,
                         no_positive) for i in order]


def _values(rows, metric):
    vals = []
    for row in rows:
        if metric not in row:
            raise KeyError(f"per-subject row has no metric {metric!r} "
                           f"(has {', '.join(map(str, row))})")
        if row[metric] is not None:
            vals.append(float(row[metric]))
    return vals


def subject_average(rows, metric='fbeta'):
    """Mean over subjects of a per-subject metric, ignoring subjects whose value is None
    (skipped); None when no subject has a value."""
    vals = _values(rows, metric)
    return float(sum(vals) / len(vals)) if vals else None


def generalisation(rows, metric='fbeta', threshold=0.9):
    """Share of subjects whose metric is strictly greater than `threshold` (IESD-2024's G:
    the share of test patients whose F-beta exceeds 0.9). Subjects whose value is None are
    left out of the count and of the total; None when no subject has a value."""
    vals = _values(rows, metric)
    if not vals:
        return None
    above = sum(1 for v in vals if v > threshold + _THRESHOLD_TOLERANCE)
    return above / len(vals)


# --------------------------------------------------------------------------- contest scores

def _contest(name):
    try:
        return CONTESTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown contest {name!r}; known: {', '.join(CONTESTS)}") from None


def _number(value, what):
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return x


def contest_terms(name, fbeta, g=None, latency_ms=None, size_kib=None, latency_scale=1.0):
    """The contest's normalised terms, each clipped to [0, 1], keyed like the arguments
    ('fbeta', 'g', 'latency_ms', 'size_kib'; only the contest's own terms). The measured
    latency is multiplied by `latency_scale` first. A term the contest uses must be given;
    one it does not use (G for TDC-2022) is ignored."""
    spec = _contest(name)
    scale = _number(latency_scale, 'latency_scale')
    if scale <= 0:
        raise ValueError(f"latency_scale must be positive, got {latency_scale!r}")
    given = {'fbeta': fbeta, 'g': g, 'latency_ms': latency_ms, 'size_kib': size_kib}
    terms = {}
    for key, term in spec['terms'].items():
        if given[key] is None:
            raise ValueError(f"contest {name!r} scores {key}: pass it")
        x = _number(given[key], key)
        if key in ('fbeta', 'g') and not 0.0 <= x <= 1.0:
            raise ValueError(f"{key} must be in [0, 1], got {given[key]!r}")
        if key in ('latency_ms', 'size_kib') and x < 0:
            raise ValueError(f"{key} must not be negative, got {given[key]!r}")
        if key == 'latency_ms':
            x *= scale
        lo, hi = term['range']
        v = (x - lo) / (hi - lo) if term['higher_is_better'] else (hi - x) / (hi - lo)
        terms[key] = min(1.0, max(0.0, v))
    return terms


def contest_score(name, fbeta, g=None, latency_ms=None, size_kib=None, latency_scale=1.0):
    """The contest's score: the sum of weight x normalised term (IESD-2024 at most 80,
    TDC-2022 at most 140)."""
    terms = contest_terms(name, fbeta, g, latency_ms, size_kib, latency_scale)
    spec = _contest(name)['terms']
    return float(sum(spec[k]['weight'] * v for k, v in terms.items()))


def normalised_contest_score(name, fbeta, g=None, latency_ms=None, size_kib=None,
                             latency_scale=1.0):
    """contest_score divided by the contest's maximum: in [0, 1], like the other
    selection metrics."""
    score = contest_score(name, fbeta, g, latency_ms, size_kib, latency_scale)
    return score / _contest(name)['maximum']
