"""The results tables: append-only CSV files, one row per finished trial, the only
authoritative record of a stage (results.store says what is derived from them).

    table = ResultsTable('multi-result/results.csv', STAGE1_COLUMNS)
    table.append(row)                          # the commit point of a trial
    rows = table.rows()                        # dicts of strings; a torn last line dropped

Each row is one physical line, flushed and fsynced (it survives kill -9). A table of an
older ATML (fewer columns) is rewritten under the current header, atomically.
"""
import csv
import json
import os
import time

import pandas as pd

from public.core.atomic import durable, replacing
from public.train.metrics import CONTEST_METRICS, METRIC_NAMES

_METRIC_COLUMNS = [f"{split}_{m}" for split in ('val', 'test')
                   for m in METRIC_NAMES + ('auc', 'abs_sum')]
_TAIL = ['latency_ms', 'params', 'wall_s', 'seed', 'settings_key', 'finished_at', 'error',
         'node', 'attempts', 'history', 'refit']
STAGE1_COLUMNS = (['model', 'lr', 'status', 'stop_reason', 'epochs', 'best_epoch']
                  + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'pruned', 'onnx_kb',
                     'onnx_bytes'] + _TAIL)
STAGE2_COLUMNS = (['candidate', 'channel_scale', 'fc_scale', 'prune_fraction', 'predicted_bytes', 'status',
                   'stop_reason', 'epochs', 'best_epoch'] + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'meets_metric', 'onnx_kb',
                     'onnx_bytes', 'int8_bytes', 'int8_metrics', 'lr'] + _TAIL)
TIMING_COLUMNS = ('latency_ms', 'wall_s', 'finished_at', 'node', 'attempts')
# Added after tables existed, so at the end (an older table is rewritten under the new header,
# its rows blank there): the contest figures of both splits (binary tasks; else blank) and
# the deployment figures of the exported graph (stage two with INT8: the INT8 file's).
CONTEST_COLUMNS = [f"{split}_{m}" for split in ('val', 'test') for m in CONTEST_METRICS]
GRAPH_COLUMNS = ['macs', 'param_bytes', 'peak_act_bytes', 'peak_act_int8_bytes']
STAGE1_COLUMNS += CONTEST_COLUMNS + GRAPH_COLUMNS
STAGE2_COLUMNS += CONTEST_COLUMNS + GRAPH_COLUMNS + ['probe_latency_ms', 'probe_peak_act_bytes']
# SCHEDULER='halving': the rung of the row (1, 2, ...) and the epochs that rung allowed in all
# (blank in a grid search).
RUNG_COLUMNS = ['rung', 'rung_epochs']
STAGE1_COLUMNS += RUNG_COLUMNS
STAGE2_COLUMNS += RUNG_COLUMNS


class ResultsTable:
    """An append-only CSV table (pandas-readable); rows are dicts of the given columns. The
    one change to a written row: set_status(), a halving rung's decision (atomic rewrite)."""

    def __init__(self, path, columns):
        self.path = path
        self.columns = list(columns)

    def rows(self):
        """Rows written so far. Each row is one physical line (cells never hold newlines),
        parsed on its own, so a line torn by a crash mid-write (even inside a quoted cell)
        is dropped alone and never swallows the rows after it."""
        return self._read()[0]

    def _read(self):
        if not os.path.exists(self.path):
            return [], []
        with open(self.path, newline='', errors='replace') as f:
            data = f.read()
        lines = data.splitlines()
        if not lines:
            return [], []
        header = _parse_line(lines[0])
        rows, foreign = [], []
        torn = not data.endswith('\n')
        for number, line in enumerate(lines[1:], start=2):
            cells = _parse_line(line)
            if cells is not None and len(cells) == len(header):
                rows.append(dict(zip(header, cells)))
            elif not (torn and number == len(lines)) and line.strip():
                foreign.append((number, line))
        return rows, foreign

    def quarantine(self):
        """Move lines that are not rows of this table (a foreign or damaged line) out of it,
        into `<table>.rejected`, so pandas can read the table again; returns their numbers."""
        if not os.path.exists(self.path):
            return []
        rows, foreign = self._read()
        if not foreign:
            return []
        with open(self.path + '.rejected', 'a') as f:
            for number, line in foreign:
                f.write(f"# {time.strftime('%Y-%m-%dT%H:%M:%S')} line {number} of {self.path}\n"
                        f"{line}\n")
        self._rewrite(rows, self.columns if header(self.path) == self.columns else None)
        return [n for n, _ in foreign]

    def append(self, row):
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path}: unknown column(s) {sorted(unknown)}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            self._drop_torn_tail()
            if header(self.path) != self.columns:
                self._rewrite(self.rows())
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, self.columns, extrasaction='raise', lineterminator='\n')
            if new:
                writer.writeheader()
            writer.writerow({c: _cell(row.get(c, '')) for c in self.columns})
            f.flush()
            os.fsync(f.fileno())
        durable(f"row {os.path.basename(self.path)}")

    def set_status(self, match, status):
        """Give the rows for which match(row) is true this status, in one atomic rewrite
        (SCHEDULER='halving': a trial recorded 'stopped' at its rung goes on, 'promoted')."""
        rows = self.rows()
        changed = [r for r in rows if match(r) and r['status'] != status]
        if changed:
            for r in changed:
                r['status'] = status
            self._rewrite(rows)
        return len(changed)

    def _drop_torn_tail(self):
        # A kill mid-write leaves a last line without its newline: an incomplete row (its
        # trial is rerun). Cut it off so the next row starts clean.
        with open(self.path, 'rb+') as f:
            data = f.read()
            if data and not data.endswith(b'\n'):
                f.truncate(data.rfind(b'\n') + 1)

    def _rewrite(self, rows, columns=None):
        # Under the current header (an older ATML's table has fewer columns), atomically.
        columns = columns or self.columns
        with replacing(self.path) as tmp:
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, columns, extrasaction='ignore', lineterminator='\n')
                writer.writeheader()
                for r in rows:
                    writer.writerow({c: r.get(c, '') for c in columns})
        durable(f"rewrite {os.path.basename(self.path)}")

    def frame(self):
        return pd.DataFrame(self.rows(), columns=self.columns)


def header(path):
    """The column names of a CSV file's first line (None when it does not parse)."""
    with open(path, newline='', errors='replace') as f:
        return _parse_line(f.readline().rstrip('\r\n'))


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
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value)
    return value
