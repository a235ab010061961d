"""Results bookkeeping: the CSV results tables and atomically replaced result folders.

    table = ResultsTable('multi-result/results.csv', STAGE1_COLUMNS)
    table.append(row)                 # one line, flushed and fsynced: survives kill -9
    replace_folder(parent, '95-91', build)   # build(tmp_dir) fills it; then one rename

A result folder is built under a hidden temporary name, marked complete, and only then
renamed into place; the folder it replaces is moved aside first and deleted last. A crash
at any point leaves either the old folder or the new one, never a half-written one:
`recover_folders(parent)` (run at start) finishes or undoes what a crash interrupted.
"""
import csv
import json
import os
import shutil
import uuid

import pandas as pd

from public.config import write_settings
from public.test import METRIC_NAMES

_TMP_PREFIX = '.tmp-'
_OLD_PREFIX = '.old-'
_COMPLETE = '.complete'

_METRIC_COLUMNS = [f"{split}_{m}" for split in ('val', 'test')
                   for m in METRIC_NAMES + ('auc', 'abs_sum')]
STAGE1_COLUMNS = (['model', 'lr', 'status', 'stop_reason', 'epochs', 'best_epoch']
                  + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'pruned', 'onnx_kb', 'onnx_bytes', 'latency_ms',
                     'params', 'wall_s', 'seed', 'settings_key', 'finished_at', 'error'])
STAGE2_COLUMNS = (['candidate', 'channel_scale', 'fc_scale', 'predicted_bytes', 'status',
                   'stop_reason', 'epochs', 'best_epoch'] + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'meets_metric', 'onnx_kb', 'onnx_bytes',
                     'int8_bytes', 'int8_metrics', 'latency_ms', 'params', 'lr', 'wall_s',
                     'seed', 'settings_key', 'finished_at', 'error'])


class ResultsTable:
    """An append-only CSV table (pandas-readable); rows are dicts of the given columns."""

    def __init__(self, path, columns):
        self.path = path
        self.columns = list(columns)

    def rows(self):
        """Rows written so far. Each row is one physical line (cells never hold newlines),
        parsed on its own, so a line torn by a crash mid-write (even inside a quoted cell)
        is dropped alone and never swallows the rows after it."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, newline='') as f:
            lines = f.read().splitlines()
        if not lines:
            return []
        header = _parse_line(lines[0])
        rows = []
        for line in lines[1:]:
            cells = _parse_line(line)
            if cells is not None and len(cells) == len(header):
                rows.append(dict(zip(header, cells)))
        return rows

    def append(self, row):
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path}: unknown column(s) {sorted(unknown)}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            self._drop_torn_tail()
            self._migrate_header()
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, self.columns, extrasaction='raise', lineterminator='\n')
            if new:
                writer.writeheader()
            writer.writerow({c: _cell(row.get(c, '')) for c in self.columns})
            f.flush()
            os.fsync(f.fileno())

    def _drop_torn_tail(self):
        # A kill mid-write leaves a last line without its newline: an incomplete row (its
        # trial is rerun). Cut it off so the next row starts clean.
        with open(self.path, 'rb+') as f:
            data = f.read()
            if data and not data.endswith(b'\n'):
                f.truncate(data.rfind(b'\n') + 1)

    def _migrate_header(self):
        # A table written by an older ATML has fewer columns: rewrite it under the current
        # header (missing cells empty), atomically, so its rows stay readable for resume.
        with open(self.path, newline='') as f:
            header = _parse_line(f.readline().rstrip('\r\n'))
        if header == self.columns:
            return
        rows = self.rows()
        tmp = f"{self.path}.{os.getpid()}.tmp"
        with open(tmp, 'w', newline='') as f:
            writer = csv.DictWriter(f, self.columns, extrasaction='ignore', lineterminator='\n')
            writer.writeheader()
            for r in rows:
                writer.writerow({c: r.get(c, '') for c in self.columns})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def frame(self):
        return pd.DataFrame(self.rows(), columns=self.columns)


def _parse_line(line):
    try:
        return next(csv.reader([line], strict=True))
    except (csv.Error, StopIteration):
        return None


def _cell(value):
    if isinstance(value, str):
        return value.replace('\r', ' ').replace('\n', ' ')
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())


def replace_folder(parent, name, build, replaces=()):
    """Create parent/name atomically from build(tmp_dir), replacing it and `replaces`.

    `replaces` are other folder names in parent that the new folder supersedes (a model's
    previous best, which has another xx-yy name)."""
    os.makedirs(parent, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f"{_TMP_PREFIX}{tag}")
    os.makedirs(tmp)
    try:
        build(tmp)
        with open(os.path.join(tmp, _COMPLETE), 'w') as f:
            f.write(name)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = []
    for old in dict.fromkeys([name, *replaces]):
        path = os.path.join(parent, old)
        if old and os.path.isdir(path):
            moved = os.path.join(parent, f"{_OLD_PREFIX}{tag}-{len(aside)}")
            os.rename(path, moved)
            aside.append(moved)
    final = os.path.join(parent, name)
    os.rename(tmp, final)
    os.remove(os.path.join(final, _COMPLETE))
    for path in aside:
        shutil.rmtree(path, ignore_errors=True)
    return final


def recover_folders(parent):
    """Finish or undo a replace_folder that a crash interrupted; returns what it did."""
    if not os.path.isdir(parent):
        return []
    actions = []
    entries = os.listdir(parent)
    promoted = False
    for entry in entries:
        path = os.path.join(parent, entry)
        if entry.startswith(_TMP_PREFIX):
            marker = os.path.join(path, _COMPLETE)
            if os.path.exists(marker):
                with open(marker) as f:
                    name = f.read().strip()
                if name and not os.path.exists(os.path.join(parent, name)):
                    os.remove(marker)
                    os.rename(path, os.path.join(parent, name))
                    actions.append(f"completed interrupted write of {name}")
                    promoted = True
                    continue
            shutil.rmtree(path, ignore_errors=True)
            actions.append(f"removed incomplete {entry}")
    for entry in entries:
        path = os.path.join(parent, entry)
        if entry.startswith(_OLD_PREFIX) and os.path.isdir(path):
            if promoted:
                shutil.rmtree(path, ignore_errors=True)
                actions.append(f"removed superseded {entry}")
            else:
                name = _old_name(path)
                if name and not os.path.exists(os.path.join(parent, name)):
                    os.rename(path, os.path.join(parent, name))
                    actions.append(f"restored {name}")
                else:
                    shutil.rmtree(path, ignore_errors=True)
    return actions


def _old_name(path):
    # A result folder records its own name in evaluation_metrics.txt's first line.
    info = os.path.join(path, 'result.json')
    if os.path.exists(info):
        with open(info) as f:
            return json.load(f).get('folder')
    return None


def format_metrics(metrics):
    labels = (('F1 Score', 'f1'), ('Accuracy', 'accuracy'), ('Precision', 'precision'),
              ('Recall', 'recall'), ('ROC AUC', 'auc'), ('Abs-sum', 'abs_sum'))
    return '\n'.join(f"{label}: {metrics[m]:.4f}" for label, m in labels if m in metrics)


def write_result_files(folder, *, name, state_dict, onnx_path, selected_metrics, other_metrics,
                       select_on, lr, model_name, onnx_bytes, settings, extra_lines=(),
                       info=None):
    """The files of a result folder, as the original wrote them plus the settings used:
    saved.pth (state dict), saved.onnx, evaluation_metrics.txt, params_used.py, result.json."""
    import torch
    from public.export import size_kb
    torch.save(state_dict, os.path.join(folder, 'saved.pth'))
    shutil.copyfile(onnx_path, os.path.join(folder, 'saved.onnx'))
    other = 'test' if select_on == 'val' else 'val'
    lines = [format_metrics(selected_metrics), f"Learning Rate: {lr}", f"Model: {model_name}",
             f"ONNX file size: {size_kb(onnx_bytes)} KB", *extra_lines,
             f"Metrics above are on the {select_on} split (SELECT_ON={select_on!r}).", '']
    if other_metrics:
        lines += [f"{other} split:", format_metrics(other_metrics), '']
    with open(os.path.join(folder, 'evaluation_metrics.txt'), 'w') as f:
        f.write('\n'.join(lines))
    write_settings(settings, os.path.join(folder, 'params_used.py'))
    with open(os.path.join(folder, 'result.json'), 'w') as f:
        json.dump({'folder': name, 'model': model_name, 'lr': lr, 'onnx_bytes': onnx_bytes,
                   'select_on': select_on, f"{select_on}_metrics": selected_metrics,
                   f"{other}_metrics": other_metrics, **(info or {})}, f, indent=2)
