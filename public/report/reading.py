"""Reading what a search left on disk, for the report pages: the results tables as
DataFrames, the rows of the current settings, result.json files.

    trials, others = load_stage_one(settings)                 # numeric rows, other-key count
    rows, others = load_stage_two(settings, result_folder)    # last row per candidate
    folder = find_result_folder(settings)                     # the stage-two <xx>-<yy>/

Only the trials recorded with the current settings (their settings key) belong to the
search shown; 'speculative' rows (run ahead in parallel, never used) are left out.
"""
import json
import os
import re

import numpy as np
import pandas as pd

from public.results.keys import settings_key
from public.results.table import ResultsTable, header
from public.search.stage_two import stage_two_key
from public.train.metrics import selection_score
from public.train.outcome import TrialStatus

METRICS = ('f1', 'accuracy', 'precision', 'recall', 'auc', 'abs_sum')
_RESULT_FOLDER = re.compile(r'^\d{1,3}-\d{1,3}(-MISS)?$')   # a miss: <xx>-<yy>-MISS
_NUMERIC = (['lr', 'epochs', 'best_epoch', 'score', 'xx', 'yy', 'onnx_kb', 'onnx_bytes',
             'latency_ms', 'params', 'wall_s', 'channel_scale', 'fc_scale', 'predicted_bytes',
             'int8_bytes', 'rung', 'rung_epochs']
            + [f"{s}_{m}" for s in ('val', 'test') for m in METRICS])


def read_table(path):
    """A results CSV as a DataFrame of strings, one row per complete line (a line torn by
    a crash is skipped; results.ResultsTable reads it); empty when the file is absent."""
    if not os.path.isfile(path) or not os.path.getsize(path):
        return pd.DataFrame()
    columns = header(path)
    if not columns:
        return pd.DataFrame()
    return pd.DataFrame(ResultsTable(path, columns).rows(), columns=columns)


def numeric_trials(frame):
    """Known numeric columns made numeric (blank -> NaN), pruned made boolean."""
    frame = frame.copy()
    for name in _NUMERIC:
        if name in frame.columns:
            frame[name] = pd.to_numeric(frame[name], errors='coerce')
    for name in ('pruned', 'meets_metric'):
        if name in frame.columns:
            frame[name] = frame[name].astype(str).str.strip().str.lower() == 'true'
    if 'status' not in frame.columns:
        frame['status'] = TrialStatus.OK.value
    frame['status'] = frame['status'].fillna('').astype(str)
    if 'onnx_bytes' in frame.columns:          # exact KB where the bytes are recorded
        exact = frame['onnx_bytes'] / 1024
        frame['onnx_kb'] = exact.where(exact.notna(), frame.get('onnx_kb', np.nan))
    return frame


def read_json(path):
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


def read_text(path):
    try:
        with open(path, encoding='utf-8', errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def current_rows(frame, key):
    """(rows of the current search, number of rows recorded with other settings)."""
    if frame.empty or key is None or 'settings_key' not in frame.columns:
        return frame, 0
    mine = frame['settings_key'] == key
    return frame[mine], int((~mine).sum())


def _fill_scores(frame, settings):
    """A row recorded without a score (an older table) gets it from its metrics."""
    if frame.empty:
        return frame
    split = settings.SELECT_ON
    names = [f"{split}_{m}" for m in METRICS]
    if 'score' not in frame.columns:
        frame['score'] = np.nan
    for i in frame.index[frame['score'].isna() & (frame['status'] == TrialStatus.OK)]:
        metrics = {n[len(split) + 1:]: frame.at[i, n] for n in names if n in frame.columns}
        try:
            frame.at[i, 'score'] = selection_score(metrics, settings.SELECT_METRIC)
        except (KeyError, TypeError):
            pass
    return frame


def _serial_only(frame):
    """The serial search's rows: 'speculative' ones (run ahead in parallel, never used) left out."""
    if 'status' in frame.columns:
        return frame[frame['status'] != TrialStatus.SPECULATIVE]
    return frame


def load_stage_one(settings):
    """The current search's trials (numeric), rows from other settings, best folders."""
    root = settings.MODEL_SAVE_PATH
    frame = read_table(os.path.join(root, 'results.csv'))
    trials, others = current_rows(frame, settings_key(settings))
    trials = _serial_only(trials)
    trials = _fill_scores(numeric_trials(trials).reset_index(drop=True), settings)
    if 'model' not in trials.columns:
        trials['model'] = ''
    return trials, others


def load_stage_two(settings, result_folder):
    """The current stage-two rows (the last row per candidate, smallest first), and the
    number of rows from other settings. The result folder's snapshot of the table wins.

    With SCHEDULER='halving' a candidate has a row per rung, appended in rung order: its last
    row is where it ended ('ok', 'stopped', 'diverged', ...; its rung in 'rung'), or, while
    the search runs, 'promoted' (its next rung not yet recorded)."""
    paths = ([os.path.join(result_folder, 'stage2_results.csv')] if result_folder else []) + \
        [os.path.join(settings.TEMP_DIR, 'stage2_results.csv')]
    frame = next((read_table(p) for p in paths if os.path.isfile(p)), pd.DataFrame())
    rows, others = current_rows(frame, stage_two_key(settings))
    rows = numeric_trials(_serial_only(rows))
    if rows.empty:
        return rows, others
    if 'candidate' not in rows.columns:
        rows['candidate'] = [f"c{c:g}-f{f:g}" for c, f in zip(rows.get('channel_scale', np.nan),
                                                              rows.get('fc_scale', np.nan))]
    rows = rows.drop_duplicates('candidate', keep='last')
    size = rows['predicted_bytes'] if 'predicted_bytes' in rows else rows.get('onnx_bytes')
    order = rows.assign(_size=size).sort_values(['_size', 'candidate'], kind='stable')
    return order.drop(columns='_size').reset_index(drop=True), others


def find_result_folder(settings):
    """The stage-two result folder in FINAL_RESULT_DIR: the <xx>-<yy>/ (<xx>-<yy>-MISS/ for a
    miss) whose result.json has scaling factors (the most recently written if several);
    None when there is none."""
    root = settings.FINAL_RESULT_DIR
    found = []
    for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
        path = os.path.join(root, name, 'result.json')
        if _RESULT_FOLDER.match(name) and 'channel_scale' in read_json(path):
            found.append((os.path.getmtime(path), os.path.join(root, name)))
    return max(found)[1] if found else None
