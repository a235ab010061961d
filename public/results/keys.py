"""The keys and rows of the results tables: which settings make two trials the same trial,
a trial's row, and the order that picks the best row.

    key = settings_key(settings)               # 10 hex digits of the KEY settings
    row = trial_row(result, settings, key, model='AFNet', lr=lr_key(0.0025), pruned=False)
    best = max(rows, key=best_rank)            # score, then yy, then xx, then the smaller lr

trial_row takes the trial's result duck-typed (public.train.outcome.TrialResult or any
object with its fields): this wing records trials, it does not run them.
"""
import hashlib
import json
import os
import time

from public.compress.export import size_kb
from public.core.settings import INTRODUCED_AT, ONLY_WITH, settings_dict, trial_settings
from public.results.summary import teacher_folder
from public.results.table import TIMING_COLUMNS
from public.train.metrics import CONTEST_METRICS, METRIC_NAMES, score_digits, selection_score

def settings_key(settings, stage=1, extra=None):
    """The key of the settings that make two trials the same trial (config's KEY marks);
    rows with another key are kept but never reused."""
    values = settings_dict(settings)
    keyed = {k: values[k] for k in trial_settings(stage)
             if (k not in INTRODUCED_AT or values[k] != INTRODUCED_AT[k])
             and (k not in ONLY_WITH or values[ONLY_WITH[k][0]] == ONLY_WITH[k][1])}
    if keyed.get('DISTILL_FROM'):
        keyed['DISTILL_FROM'] = teacher_fingerprint(settings)
    keyed.update(extra or {})
    blob = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def sha256_of(data):
    """The SHA-256 hex digest of bytes, or of the file at a path (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    if isinstance(data, (bytes, memoryview)):
        digest.update(data)
    else:
        with open(data, 'rb') as f:
            for block in iter(lambda: f.read(1 << 20), b''):
                digest.update(block)
    return digest.hexdigest()


def teacher_fingerprint(settings):
    """DISTILL_FROM as the settings key holds it: the value and the SHA-256 of the teacher's
    saved.onnx it names now ('auto': of MODEL_SAVE_PATH/summary.csv's pick), so rows trained
    against another teacher are never reused; the bare value when there is no such file
    (public.search.teacher then stops the run with the rule)."""
    folder = teacher_folder(settings)
    path = os.path.join(folder, 'saved.onnx') if folder else ''
    if not os.path.isfile(path):
        return settings.DISTILL_FROM
    return f"{settings.DISTILL_FROM}@{sha256_of(path)[:16]}"


def lr_key(lr):
    return repr(float(lr))


def best_rank(row):
    """Sort key of a results row: the SELECT_METRIC score, then yy, then xx (max is best);
    among equals the smaller learning rate, i.e. the one the serial search tries first, so
    the answer does not depend on the order in which parallel trials finish."""
    return (float(row['score']), int(row['yy']), int(row['xx']), -float(row.get('lr') or 0))


def trial_row(result, settings, key, **fields):
    """The row of a finished trial (both stages; `fields` adds the stage's own columns)."""
    selected = result.selected(settings.SELECT_ON)
    xx, yy = score_digits(selected) if selected else ('', '')
    row = dict(status=result.status, stop_reason=result.stop_reason, epochs=result.epochs,
               best_epoch=result.best_epoch, select_on=settings.SELECT_ON,
               select_metric=settings.SELECT_METRIC,
               score=selection_score(selected, settings.SELECT_METRIC) if selected else '',
               xx=xx, yy=yy, onnx_kb=size_kb(result.onnx_bytes) if result.onnx_bytes else '',
               onnx_bytes=result.onnx_bytes or '', latency_ms=result.latency_ms,
               params=result.params, wall_s=result.wall_s, seed=settings.SEED, settings_key=key,
               finished_at=time.strftime('%Y-%m-%dT%H:%M:%S'),
               error=result.error.splitlines()[0] if result.error else '',
               node=getattr(result, 'node', '') or 'local',
               attempts=getattr(result, 'attempts', 1) or 1,
               history=[[round(float(v), 6) for v in h] for h in (result.history or [])],
               refit=_refit_summary(getattr(result, 'refit', None)))
    for split, metrics in (('val', result.val_metrics), ('test', result.test_metrics)):
        for m in METRIC_NAMES + ('auc', 'abs_sum') + CONTEST_METRICS:
            row[f"{split}_{m}"] = metrics.get(m, '') if metrics else ''
    row.update(graph_columns(getattr(result, 'graph', None)))
    row.update(fields)
    return row


def graph_columns(stats):
    """The deployment columns of graph_stats' figures ('' where there are none)."""
    stats = stats or {}
    return {'macs': stats.get('macs', ''), 'param_bytes': stats.get('param_bytes', ''),
            'peak_act_bytes': stats.get('peak_activation_bytes', ''),
            'peak_act_int8_bytes': stats.get('peak_activation_bytes_int8', '')}


def _refit_summary(refit):
    # The refit model's record in the tables: its epochs and test metrics (no val: it saw them).
    if not refit:
        return ''
    summary = {'epochs': refit['epochs'], 'onnx_bytes': refit.get('onnx_bytes'),
               'test': {k: round(float(v), 6) for k, v in (refit.get('test_metrics') or {}).items()}}
    if refit.get('int8'):
        summary['int8_test'] = {k: round(float(v), 6) for k, v in refit['int8']['test'].items()}
    return summary


def same_trial(a, b, ignore=TIMING_COLUMNS):
    """Whether two rows record the same trial outcome (timing columns aside)."""
    return {k: v for k, v in a.items() if k not in ignore} == \
        {k: v for k, v in b.items() if k not in ignore}
