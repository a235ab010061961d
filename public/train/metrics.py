"""Evaluation: predictions in batches, the metrics, the original's xx/yy digits, and the
per-subject rows of per_subject.csv (public/test.py is its face).

    probs = predict_proba(model, x, device)                 # (N, classes) softmax
    metrics = classification_metrics(y, probs, classes)    # f1, accuracy, precision, recall,
                                                            # abs_sum, auc (binary)
    xx, yy = score_digits(metrics)                          # int(100*max), int(100*min)
    score = selection_score(metrics, 'min4')                # what SELECT_METRIC decides on
    metrics, confusion, rows = evaluate(model, x, y, subjects, 'val', data)   # + per subject

Binary tasks measure F1/precision/recall of class 1 (AF); multi-class tasks their macro
averages. abs_sum is seed 003's metric: the mean over samples of sum_i |p_i - y_i|
(one-hot y), lower is better; ROC AUC is reported for binary tasks.

Multi-label tasks (seed 004; y is (N, K) multi-hot, probabilities are per-label sigmoids):
each label is scored as its own binary task at threshold 0.5 (F1, accuracy, precision,
recall, ROC AUC); the figures without a prefix are their macro averages (what
SELECT_METRIC, xx-yy and the targets use) and `<label>_<metric>` keys hold each label's.
"""
import math

import numpy as np
import torch
from sklearn.metrics import (accuracy_score, f1_score, precision_score, recall_score,
                             roc_auc_score)
from tqdm import tqdm

from public.train import contest as _contest

METRIC_NAMES = ('f1', 'accuracy', 'precision', 'recall')
# The contests' figures (binary tasks only, else absent): pooled F-beta, the means over
# subjects of their F-beta and F1, the share of subjects with F-beta > a threshold (G),
# and the normalised contest score (needs the latency and size, added after export).
CONTEST_METRICS = ('fbeta', 'subj_fbeta', 'subj_f1', 'gen', 'contest')


class Scoring:
    """How the contest figures are computed: FBETA_BETA, NO_AF_SUBJECT, GEN_THRESHOLD,
    CONTEST, CONTEST_LATENCY, MACS_PER_MS and LATENCY_SCALE of a settings object (the
    defaults are the settings')."""

    def __init__(self, beta=2.0, no_af='contest', threshold=0.9, contest='iesd2024',
                 latency_scale=1.0, latency='macs', macs_per_ms=100000):
        self.beta, self.no_af, self.threshold = beta, no_af, threshold
        self.contest, self.latency_scale = contest, latency_scale
        self.latency, self.macs_per_ms = latency, macs_per_ms

    @classmethod
    def of(cls, settings):
        return cls(settings.FBETA_BETA, settings.NO_AF_SUBJECT, settings.GEN_THRESHOLD,
                   settings.CONTEST, settings.LATENCY_SCALE, settings.CONTEST_LATENCY,
                   settings.MACS_PER_MS)

    def latency_ms(self, measured_ms, macs):
        """The contest's latency L in ms before LATENCY_SCALE: MACs / MACS_PER_MS under
        'macs' (None without MACs), the measured onnxruntime figure under 'measured'."""
        if self.latency == 'macs':
            return None if macs is None else macs / self.macs_per_ms
        return measured_ms

    def scale(self):
        """The factor the latency is multiplied by: LATENCY_SCALE for a measured latency
        only (MACS_PER_MS already is the board's)."""
        return self.latency_scale if self.latency == 'measured' else 1.0


def contest_metrics(y_true, y_pred, subjects, scoring):
    """fbeta (pooled), subj_fbeta, subj_f1 and gen of binary predictions (public/train/
    contest.py); the subject figures are NaN without subjects (or when every subject is
    skipped), all NaN for an empty split."""
    nan = float('nan')
    out = dict.fromkeys(CONTEST_METRICS[:4], nan)
    if len(y_true) == 0:
        return out
    out['fbeta'] = _contest.fbeta(y_true, y_pred, scoring.beta)
    if subjects is not None and len(subjects) == len(y_true):
        rows = _contest.per_subject(y_true, y_pred, subjects, scoring.beta, scoring.no_af)
        for key, value in (('subj_fbeta', _contest.subject_average(rows, 'fbeta')),
                           ('subj_f1', _contest.subject_average(rows, 'f1')),
                           ('gen', _contest.generalisation(rows, 'fbeta', scoring.threshold))):
            out[key] = nan if value is None else value
        out['gen_subjects'] = sum(1 for r in rows if r['fbeta'] is not None)   # G's total
    return out


def add_contest_score(metrics, scoring, latency_ms, size_bytes, macs=None):
    """Set metrics['contest'], the normalised score of scoring.contest from the metrics'
    F-beta (subject-averaged or pooled, as the contest scores it) and gen, the latency
    (scoring.latency_ms: the graph's MACs / MACS_PER_MS, or the measured ms times
    LATENCY_SCALE) and the file size; left out when the metrics have no F-beta (not binary)
    or there is no latency (MACs not counted, latency not measured)."""
    latency_ms = scoring.latency_ms(latency_ms, macs)
    if not metrics or 'fbeta' not in metrics or latency_ms is None or not size_bytes:
        return metrics
    spec = _contest.CONTESTS[scoring.contest]
    fb = metrics['subj_fbeta'] if spec['fbeta_average'] == 'subject' else metrics['fbeta']
    g = metrics.get('gen')
    if fb != fb or ('g' in spec['terms'] and (g is None or g != g)):
        metrics['contest'] = float('nan')
        return metrics
    metrics['contest'] = _contest.normalised_contest_score(
        scoring.contest, fb, g, latency_ms, size_bytes / 1024, scoring.scale())
    return metrics


@torch.inference_mode()
def predict_proba(model, x, device, batch_size=1024, progress=False, desc='eval',
                  multilabel=False):
    """Softmax probabilities of model on x ((N, C, L) array or tensor), in eval mode;
    per-label sigmoid probabilities when multilabel."""
    model.eval()
    x = torch.as_tensor(np.asarray(x)) if not torch.is_tensor(x) else x
    out = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=None if progress else True, leave=False):
        batch = x[i:i + batch_size].to(device, non_blocking=True).unsqueeze(-1)
        logits = model(batch).float()
        out.append((torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 2), np.float32)


def binary_metrics(y_true, y_pred):
    """F1, accuracy, precision and recall of class 1 (AF); 0 where undefined (no positives)."""
    return {
        'f1': float(f1_score(y_true, y_pred, zero_division=0)),
        'accuracy': float(accuracy_score(y_true, y_pred)),
        'precision': float(precision_score(y_true, y_pred, zero_division=0)),
        'recall': float(recall_score(y_true, y_pred, zero_division=0)),
    }


def abs_sum(y_true, probs):
    """Seed 003's metric: mean over samples of sum_i |p_i - onehot(y)_i| (0 best, 2 worst)."""
    probs = np.asarray(probs, dtype=np.float64)
    onehot = np.zeros_like(probs)
    onehot[np.arange(len(probs)), np.asarray(y_true)] = 1.0
    return float(np.abs(probs - onehot).sum(axis=1).mean()) if len(probs) else float('nan')


def probabilities(logits, multilabel=False):
    """Logits (N, K) as probabilities: per-label sigmoids (multi-label) or a softmax."""
    logits = np.asarray(logits, dtype=np.float64)
    if multilabel:
        return 1.0 / (1.0 + np.exp(-logits))
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def multilabel_metrics(y_true, probs, names=None):
    """Macro F1/accuracy/precision/recall/AUC over the labels of a multi-hot y_true (N, K),
    each label thresholded at 0.5, plus `<name>_<metric>` per label."""
    y_true, probs = np.asarray(y_true) > 0.5, np.asarray(probs)
    names = [str(n) for n in (names or range(y_true.shape[1]))]
    per = {}
    for j, name in enumerate(names):
        m = binary_metrics(y_true[:, j], probs[:, j] >= 0.5)
        defined = len(np.unique(y_true[:, j])) == 2 and np.isfinite(probs[:, j]).all()
        m['auc'] = float(roc_auc_score(y_true[:, j], probs[:, j])) if defined else float('nan')
        per[name] = m
    metrics = {}
    for metric in METRIC_NAMES + ('auc',):
        values = [per[n][metric] for n in names if per[n][metric] == per[n][metric]]
        metrics[metric] = float(np.mean(values)) if values else float('nan')
    metrics['abs_sum'] = float('nan')       # defined for one label per segment only
    for name in names:
        metrics.update({f"{name}_{k}": v for k, v in per[name].items()})
    return metrics


def classification_metrics(y_true, probs, num_classes=None, names=None, subjects=None,
                           scoring=None):
    """All metrics of class probabilities probs (N, K) against integer labels y_true, or
    of per-label probabilities against a multi-hot y_true (N, K) (multilabel_metrics).
    With a Scoring, binary tasks add the contest figures (contest_metrics) over subjects."""
    if np.ndim(y_true) == 2:
        return multilabel_metrics(y_true, probs, names)
    probs = np.asarray(probs)
    num_classes = num_classes or probs.shape[1]
    y_pred = probs.argmax(1)
    if num_classes == 2:
        metrics = binary_metrics(y_true, y_pred)
        if scoring is not None:
            metrics.update(contest_metrics(y_true, y_pred, subjects, scoring))
        defined = len(np.unique(y_true)) == 2 and np.isfinite(probs).all()
        metrics['auc'] = float(roc_auc_score(y_true, probs[:, 1])) if defined else float('nan')
    else:
        labels = list(range(num_classes))
        metrics = {
            'f1': float(f1_score(y_true, y_pred, labels=labels, average='macro', zero_division=0)),
            'accuracy': float(accuracy_score(y_true, y_pred)),
            'precision': float(precision_score(y_true, y_pred, labels=labels, average='macro',
                                               zero_division=0)),
            'recall': float(recall_score(y_true, y_pred, labels=labels, average='macro',
                                         zero_division=0)),
        }
    metrics['abs_sum'] = abs_sum(y_true, probs)
    return metrics


def selection_score(metrics, select_metric):
    """The score in [0, 1] (higher is better) that SELECT_METRIC makes decide: 'min4' is the
    original's worst of F1/accuracy/precision/recall; 'abs_sum' becomes 1 - abs_sum/2."""
    if select_metric == 'min4':
        return worst_metric(metrics)
    if select_metric == 'abs_sum':
        return 1.0 - metrics['abs_sum'] / 2.0
    value = metrics.get(select_metric, float('nan'))    # a row of an older ATML lacks fbeta...
    return 0.0 if value != value or value == '' else float(value)   # an undefined AUC never wins


def percent(value):
    """int(100*value), float-safe: the scale of STAGE1_TARGET and METRIC_TARGET."""
    return _percent_digits(value)


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


def evaluate(model, x, y, subjects, split, data, progress=False, scoring=None):
    """(metrics, confusion matrix, per-subject rows) of model on one labelled split; with a
    Scoring, binary tasks add the contest figures."""
    probs = predict_proba(model, x, data.device, progress=progress, desc=split,
                          multilabel=data.multilabel)
    metrics = classification_metrics(y, probs, data.num_classes, data.class_names or None,
                                     subjects, scoring)
    return (metrics, _confusion(y, probs, data.num_classes),
            per_subject(split, subjects, y, probs, data.num_classes, scoring))


PER_SUBJECT_COLUMNS = ('split', 'subject', 'segments', 'class_mix', 'f1', 'accuracy',
                       'recall', 'precision', 'fbeta')


def per_subject(split, subjects, y_true, probs, num_classes, scoring=None):
    """Where the model fails: the metrics of each subject's segments (rows of per_subject.csv);
    binary tasks with a Scoring add the subject's F-beta (NO_AF_SUBJECT's rule; '' if skipped)."""
    if subjects is None or len(subjects) != len(y_true):
        return []
    y_true, pred = np.asarray(y_true), np.asarray(probs).argmax(1)
    rows = []
    for subject in np.unique(subjects):
        mask = np.asarray(subjects) == subject
        if y_true.ndim == 2:       # multi-label: positives per label; macro metrics
            counts = y_true[mask].sum(0).astype(np.int64)
            m = classification_metrics(y_true[mask], np.asarray(probs)[mask])
        elif num_classes == 2:
            counts = np.bincount(y_true[mask], minlength=num_classes)
            m = binary_metrics(y_true[mask], pred[mask])
        else:
            counts = np.bincount(y_true[mask], minlength=num_classes)
            m = classification_metrics(y_true[mask], np.asarray(probs)[mask], num_classes)
        rows.append(dict(split=split, subject=str(subject), segments=int(mask.sum()),
                         class_mix=' '.join(f"{c}:{n}" for c, n in enumerate(counts.tolist())),
                         **{k: round(float(m[k]), 4) for k in ('f1', 'accuracy', 'recall',
                                                               'precision')}))
        if num_classes == 2 and y_true.ndim == 1 and scoring is not None:
            fb = _contest.per_subject(y_true[mask], pred[mask], np.asarray(subjects)[mask],
                                      scoring.beta, scoring.no_af)[0]['fbeta']
            rows[-1]['fbeta'] = '' if fb is None else round(float(fb), 4)
    return rows


def worst_subjects(rows, split, count=3):
    """The subjects with the lowest accuracy on a split: 'S12 (acc 0.41, 80 segments)'."""
    mine = sorted((r for r in rows if r['split'] == split), key=lambda r: float(r['accuracy']))
    return [f"{r['subject']} (accuracy {float(r['accuracy']):.2f}, {r['segments']} segments)"
            for r in mine[:count]]


def _confusion(y_true, probs, num_classes):
    """Rows: true class, columns: predicted class (counts). Multi-label: one 2x2 matrix per
    label (rows: label absent/present; columns: predicted absent/present, at 0.5)."""
    if np.ndim(y_true) == 2:
        truth, pred = np.asarray(y_true) > 0.5, np.asarray(probs) >= 0.5
        return [[[int((~t & ~p).sum()), int((~t & p).sum())], [int((t & ~p).sum()),
                                                               int((t & p).sum())]]
                for t, p in zip(truth.T, pred.T)]
    pred = np.asarray(probs).argmax(1) if len(probs) else np.zeros(0, np.int64)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), pred), 1)
    return matrix.tolist()
