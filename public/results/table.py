"""Results bookkeeping for both stages: what is authoritative on disk, and what is derived.

The rule (README, "Crash safety"):
- A stage's results table (`multi-result/results.csv`, `temp/stage2_results.csv`) is the
  only authoritative record. A trial is finished when, and only when, its row is in the
  table: each row is one line, flushed and fsynced (it survives kill -9).
- Before its row is written, a trial's artifacts (state dict, ONNX, result.json) are stored
  under a name derived from the row (`multi-result/.store/<key>/<Model>/<lr>/`, stage two:
  `temp/c<C>-f<F>/`), so every derived file can be rebuilt from the table alone.
- Everything else is derived and rebuilt on every start: the best folders
  (`multi-result/<Model>/<xx>-<yy>/`), `summary.csv`, the scoped lines of avoid.txt, and
  stage two's result folder. A missing, stale or doubled derived file is repaired from
  the table; an artifact without a row (a kill between the two) is deleted.
- Folders are replaced atomically (`replace_folder`): built under `.atml-tmp-*`, marked,
  renamed into place; what they replace goes to `.atml-old-*` and is deleted last. Crash
  recovery (`recover_folders`) touches only entries with those prefixes that carry ATML's
  marker, nothing a user made.
- One run per results folder: `RunLock` (an flock, released by the kernel even on kill -9).

    table = ResultsTable('multi-result/results.csv', STAGE1_COLUMNS)
    table.append(row)                          # the commit point of a trial
    replace_folder(parent, '95-91', build)     # build(tmp_dir) fills it; then one rename
"""
import csv
import fcntl
import hashlib
import json
import os
import shutil
import signal
import time
import uuid

import pandas as pd

from public.config import INTRODUCED_AT, ONLY_WITH, settings_dict, trial_settings, write_settings
from public.errors import BusyError, DiskFullError, disk_full_cause, disk_full_reason
from public.test import METRIC_NAMES, score_digits, selection_score

TMP_PREFIX = '.atml-tmp-'
OLD_PREFIX = '.atml-old-'
OWNED = '.atml-owned'        # marker file in every folder ATML builds (tmp and result folders)
_COMPLETE = '.complete'
_LEGACY = ('.tmp-', '.old-')   # an older ATML's names, recovered only when they hold its files

_METRIC_COLUMNS = [f"{split}_{m}" for split in ('val', 'test')
                   for m in METRIC_NAMES + ('auc', 'abs_sum')]
_TAIL = ['latency_ms', 'params', 'wall_s', 'seed', 'settings_key', 'finished_at', 'error',
         'node', 'attempts', 'history', 'refit']
# The model files of a result folder (saved.val.* only with REFIT: the validation-chosen
# model, while saved.* is the refit one that is delivered).
MODEL_FILES = ('saved.pth', 'saved.onnx', 'saved.int8.onnx', 'saved.val.pth', 'saved.val.onnx',
               'saved.val.int8.onnx', 'params_used.py', 'per_subject.csv')
STAGE1_COLUMNS = (['model', 'lr', 'status', 'stop_reason', 'epochs', 'best_epoch']
                  + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'pruned', 'onnx_kb',
                     'onnx_bytes'] + _TAIL)
STAGE2_COLUMNS = (['candidate', 'channel_scale', 'fc_scale', 'prune_fraction', 'predicted_bytes', 'status',
                   'stop_reason', 'epochs', 'best_epoch'] + _METRIC_COLUMNS
                  + ['select_on', 'select_metric', 'score', 'xx', 'yy', 'meets_metric', 'onnx_kb',
                     'onnx_bytes', 'int8_bytes', 'int8_metrics', 'lr'] + _TAIL)
TIMING_COLUMNS = ('latency_ms', 'wall_s', 'finished_at', 'node', 'attempts')


# ----------------------------------------------------------------------------- write steps

_steps = {'count': 0}


def durable(what):
    """Mark one durable write step (a row, a rename, a removal). For the kill-at-every-step
    test: ATML_STEP_LOG=path appends each step's name there; ATML_KILL_AT_STEP=N kills the
    process with SIGKILL right after the N-th step."""
    _steps['count'] += 1
    log = os.environ.get('ATML_STEP_LOG')
    if log:
        with open(log, 'a') as f:
            f.write(f"{_steps['count']} {what}\n")
    if os.environ.get('ATML_KILL_AT_STEP') == str(_steps['count']):
        os.kill(os.getpid(), signal.SIGKILL)


def write_atomic(path, text, step=True):
    """Write a text file whole or not at all (temp file, fsync, rename); returns path.
    step=False for derived files outside the crash tests' step list (the report)."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:6]}.atml-tmp"
    try:
        with open(tmp, 'w', newline='', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        _discard(tmp)
        _raise_disk_full(exc, os.path.dirname(os.path.abspath(path)),
                         needed=len(text.encode('utf-8')))
        raise
    if step:
        durable(f"write {os.path.basename(path)}")
    return path


# ----------------------------------------------------------------------------- the tables

class ResultsTable:
    """An append-only CSV table (pandas-readable); rows are dicts of the given columns."""

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
        self._rewrite(rows, self.columns if _header(self.path) == self.columns else None)
        return [n for n, _ in foreign]

    def append(self, row):
        unknown = set(row) - set(self.columns)
        if unknown:
            raise KeyError(f"{self.path}: unknown column(s) {sorted(unknown)}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        new = not os.path.exists(self.path) or os.path.getsize(self.path) == 0
        if not new:
            self._drop_torn_tail()
            if _header(self.path) != self.columns:
                self._rewrite(self.rows())
        with open(self.path, 'a', newline='') as f:
            writer = csv.DictWriter(f, self.columns, extrasaction='raise', lineterminator='\n')
            if new:
                writer.writeheader()
            writer.writerow({c: _cell(row.get(c, '')) for c in self.columns})
            f.flush()
            os.fsync(f.fileno())
        durable(f"row {os.path.basename(self.path)}")

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
        tmp = f"{self.path}.{os.getpid()}-{uuid.uuid4().hex[:6]}.atml-tmp"
        try:
            with open(tmp, 'w', newline='') as f:
                writer = csv.DictWriter(f, columns, extrasaction='ignore', lineterminator='\n')
                writer.writeheader()
                for r in rows:
                    writer.writerow({c: r.get(c, '') for c in columns})
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException as exc:
            _discard(tmp)
            _raise_disk_full(exc, os.path.dirname(os.path.abspath(self.path)))
            raise
        durable(f"rewrite {os.path.basename(self.path)}")

    def frame(self):
        return pd.DataFrame(self.rows(), columns=self.columns)


def _header(path):
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


# ----------------------------------------------------------------------------- rows and keys

def settings_key(settings, stage=1, extra=None):
    """The key of the settings that make two trials the same trial (config's KEY marks);
    rows with another key are kept but never reused."""
    values = settings_dict(settings)
    keyed = {k: values[k] for k in trial_settings(stage)
             if (k not in INTRODUCED_AT or values[k] != INTRODUCED_AT[k])
             and (k not in ONLY_WITH or values[ONLY_WITH[k]])}
    keyed.update(extra or {})
    blob = json.dumps(keyed, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def lr_key(lr):
    return repr(float(lr))


def best_rank(row):
    """Sort key of a results row: the SELECT_METRIC score, then yy, then xx (max is best);
    among equals the smaller learning rate, i.e. the one the serial search tries first, so
    the answer does not depend on the order in which parallel trials finish."""
    return (float(row['score']), int(row['yy']), int(row['xx']), -float(row.get('lr') or 0))


def trial_row(result, settings, key, **fields):
    """The row of a finished trial (both stages; `fields` adds the stage's own columns)."""
    from public.export import size_kb
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
        for m in METRIC_NAMES + ('auc', 'abs_sum'):
            row[f"{split}_{m}"] = metrics.get(m, '') if metrics else ''
    row.update(fields)
    return row


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


# ----------------------------------------------------------------------------- folders

def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())


def atml_made(path):
    """Whether `path` is a folder ATML built (its marker file, or an older ATML's result.json)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, OWNED))
                                    or os.path.exists(os.path.join(path, 'result.json')))


def replace_folder(parent, name, build, replaces=()):
    """Create parent/name atomically from build(tmp_dir), replacing it and `replaces`.

    `replaces` are other folder names in parent that the new folder supersedes (a model's
    previous best, which has another xx-yy name). A folder in the way that ATML did not
    make is never removed: that is an error naming it."""
    os.makedirs(parent, exist_ok=True)
    final = os.path.join(parent, name)
    if os.path.exists(final) and not atml_made(final):
        raise BusyError(f"{final}: a folder ATML did not make (no {OWNED} or result.json) is "
                        f"in the way of a result folder; move or rename it")
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f"{TMP_PREFIX}{tag}")
    try:
        os.makedirs(tmp)
        open(os.path.join(tmp, OWNED), 'w').close()
        build(tmp)
        with open(os.path.join(tmp, _COMPLETE), 'w') as f:
            f.write(name)
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_disk_full(exc, final)
        raise
    durable(f"built {name}")
    aside = []
    for old in dict.fromkeys([name, *replaces]):
        path = os.path.join(parent, old)
        if old and os.path.isdir(path) and atml_made(path):
            moved = os.path.join(parent, f"{OLD_PREFIX}{tag}-{len(aside)}")
            open(os.path.join(path, OWNED), 'a').close()
            os.rename(path, moved)
            durable(f"set aside {old}")
            aside.append(moved)
    os.rename(tmp, final)
    durable(f"renamed into place {name}")
    os.remove(os.path.join(final, _COMPLETE))
    durable(f"unmarked {name}")
    for path in aside:
        shutil.rmtree(path, ignore_errors=True)
        durable("removed superseded folder")
    return final


def _discard(path):
    """Remove a temporary file of a write that failed (quietly: it may never have been made)."""
    try:
        os.remove(path)
    except OSError:
        pass


def _raise_disk_full(exc, folder, needed=None):
    """After a failed write into folder (its temporary files already removed): raise a
    DiskFullError naming folder when exc says the disk is full; else return (the caller
    re-raises exc)."""
    cause = disk_full_cause(exc)
    if cause is None:
        return
    if isinstance(cause, DiskFullError):
        raise cause.moved(folder) from None
    raise DiskFullError(folder, disk_full_reason(cause), needed) from None


def recover_folders(parent):
    """Undo what a crash left of a replace_folder: ATML's temporary and superseded folders
    are removed (the results table rebuilds whatever they held); returns what it did.
    Only entries with ATML's prefixes *and* its marker are touched."""
    if not os.path.isdir(parent):
        return []
    actions = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        ours = entry.startswith((TMP_PREFIX, OLD_PREFIX)) and os.path.isdir(path) and (
            atml_made(path) or os.path.exists(os.path.join(path, _COMPLETE)))
        legacy = entry.startswith(_LEGACY) and os.path.isdir(path) and (
            os.path.exists(os.path.join(path, _COMPLETE))
            or os.path.exists(os.path.join(path, 'result.json')))
        if ours or legacy:
            shutil.rmtree(path)
            durable("removed interrupted folder")
            actions.append(f"removed {entry} (left by an interrupted write)")
        elif entry.endswith('.atml-tmp') and os.path.isfile(path):
            os.remove(path)
            actions.append(f"removed {entry} (left by an interrupted write)")
    for entry in sorted(os.listdir(parent)):     # a kill between rename and unmark
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and atml_made(path) and os.path.exists(os.path.join(path, _COMPLETE)):
            os.remove(os.path.join(path, _COMPLETE))
    return actions


def clean_scratch(temp_dir):
    """Remove the scratch folders (`.atml-scratch-<pid>-*`) of ATML processes that are gone."""
    if not os.path.isdir(temp_dir):
        return []
    removed = []
    for entry in os.listdir(temp_dir):
        if not entry.startswith('.atml-scratch-'):
            continue
        try:
            pid = int(entry.split('-')[2])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(os.path.join(temp_dir, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the lock

class RunLock:
    """One ATML run per folder: an exclusive flock on `<folder>/.atml.lock`, released by the
    kernel when the process ends, even by kill -9.

        with RunLock('multi-result', 'stage one'):
            ...
    """

    def __init__(self, folder, what):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, '.atml.lock')
        self._file = None

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        self._file = open(self.path, 'a+')
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or 'another process'
            self._file.close()
            raise BusyError(f"{self.folder}: another ATML run ({holder}) is using this folder; "
                            f"wait for it to finish or stop it, then run again") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{self.what}, pid {os.getpid()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        if self._file:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
        return False


def check_writable(folder, setting, source=None):
    """Fail before any training when a results folder cannot be written (DiskFullError when
    its disk is full). source ('params.py', 'command line') is where the setting came from."""
    from public.errors import DISK_FULL_ERRNOS, SettingsError
    where = f"{source}: " if source else ''
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SettingsError(f"{where}{setting}={folder!r} names a file; it must be a folder")
    probe = os.path.join(folder, f".atml-write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('x')
        os.remove(probe)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            _discard(probe)
            raise DiskFullError(folder, exc.strerror, setting=setting, value=folder) from None
        raise SettingsError(f"{where}{setting}={folder!r} is not writable ({exc.strerror}); "
                            f"results could not be saved") from None


# ----------------------------------------------------------------------------- result files

def format_metrics(metrics):
    labels = (('F1 Score', 'f1'), ('Accuracy', 'accuracy'), ('Precision', 'precision'),
              ('Recall', 'recall'), ('ROC AUC', 'auc'), ('Abs-sum', 'abs_sum'))
    lines = [f"{label}: {metrics[m]:.4f}" for label, m in labels
             if m in metrics and not (m == 'abs_sum' and metrics[m] != metrics[m])]
    per_label = sorted({k.rsplit('_', 1)[0] for k in metrics
                        if '_' in k and k != 'abs_sum' and k.rsplit('_', 1)[1] in
                        ('f1', 'accuracy', 'precision', 'recall', 'auc')},
                       key=lambda n: list(metrics).index(f"{n}_f1") if f"{n}_f1" in metrics else 0)
    for name in per_label:         # multi-label: the figures above are macro averages
        lines.append(f"Label {name}: " + ', '.join(
            f"{label} {metrics[f'{name}_{m}']:.4f}" for label, m in labels[:5]
            if f"{name}_{m}" in metrics))
    return '\n'.join(lines)


def kb2(size_bytes):
    """'87.60': KB (1024 bytes) with two decimals, as the original's evaluation_metrics.txt."""
    return f"{size_bytes / 1024:.2f}"


def evaluation_text(info):
    """evaluation_metrics.txt from a result folder's result.json: the original's lines
    (metrics, learning rate, model, `ONNX file size: 87.60 KB`) and ATML's additions."""
    select_on = info['select_on']
    other = 'test' if select_on == 'val' else 'val'
    lines = [format_metrics(info.get(f"{select_on}_metrics") or {}),
             f"Learning Rate: {info['lr']}", f"Model: {info['model']}",
             f"ONNX file size: {kb2(info['onnx_bytes'])} KB"]
    if 'channel_scale' in info:
        lines += [f"Channel scaling factor: {info['channel_scale']}",
                  f"FC scaling factor: {info['fc_scale']}"]
    if info.get('prune_fraction'):
        lines.append(f"Pruned: {100 * info['prune_fraction']:.0f} % of the channels and hidden "
                     f"units removed after training (smallest L1 norm), then fine-tuned. "
                     f"saved.pth loads into public.prune.prune_model(build_from_config(config), "
                     f"{info['prune_fraction']}, example_input) (config: result.json)")
    int8 = info.get('int8')
    if int8:
        lines.append(f"INT8 ONNX file size: {kb2(int8['bytes'])} KB "
                     f"(saved.int8.onnx, the deliverable: QUANTIZE_INT8=True)")
    lines += [f"Metrics above are on the {select_on} split (SELECT_ON={select_on!r}).", '']
    if info.get(f"{other}_metrics"):
        lines += [f"{other} split:", format_metrics(info[f"{other}_metrics"]), '']
    if int8:
        lines += ["INT8 model (saved.int8.onnx, static quantization, QDQ):",
                  f"ONNX file size: {kb2(int8['bytes'])} KB"]
        lines += [f"{split} split: " + ', '.join(f"{m} {v:.4f}" for m, v in int8[split].items())
                  for split in ('val', 'test') if int8.get(split)]
        if int8.get('method') == 'qat':
            ptq = int8.get('ptq') or {}
            lines.append(f"Quantization-aware training: {int8['epochs']} epoch(s) of fine-tuning "
                         f"with fake quantization (QAT_EPOCHS). Post-training INT8 of the same "
                         f"model, for comparison ({kb2(ptq['bytes'])} KB):" if ptq.get('bytes')
                         else f"Quantization-aware training: {int8['epochs']} epoch(s).")
            lines += [f"  {split} split: " + ', '.join(f"{m} {v:.4f}" for m, v in ptq[split].items())
                      for split in ('val', 'test') if ptq.get(split)]
        lines.append('')
    refit = info.get('refit')
    if refit:
        lines += [f"REFIT=True: saved.onnx is the model retrained on all training subjects "
                  f"(train + validation) for {refit['epochs']} epoch(s), the epochs validation "
                  f"chose; the metrics above are of the validation-chosen model, saved.val.onnx.",
                  f"Refit ONNX file size: {kb2(refit['onnx_bytes'])} KB"]
        if refit.get('test_metrics'):
            lines += ["refit model (saved.onnx) test split:", format_metrics(refit['test_metrics'])]
        if (refit.get('int8') or {}).get('test'):
            lines.append("refit INT8 model (saved.int8.onnx) test split: " + ', '.join(
                f"{m} {v:.4f}" for m, v in refit['int8']['test'].items()))
        lines.append('')
    if info.get('verdict'):
        lines += [info['verdict'], '']
    return '\n'.join(lines)


def write_result_files(folder, *, result, name, model_name, lr, settings, onnx_bytes,
                       info=None, int8_onnx=None):
    """The files of a result folder, as the original wrote them plus the settings used:
    saved.pth (state dict), saved.onnx, evaluation_metrics.txt, params_used.py, result.json
    (everything evaluation_metrics.txt and the report are made from). A full disk is a
    DiskFullError with the bytes the folder needs (replace_folder removes what was written
    and names the final folder)."""
    try:
        _write_result_files(folder, result=result, name=name, model_name=model_name, lr=lr,
                            settings=settings, onnx_bytes=onnx_bytes, info=info,
                            int8_onnx=int8_onnx)
    except BaseException as exc:
        cause = disk_full_cause(exc)
        if cause is None or isinstance(cause, DiskFullError):
            raise
        raise DiskFullError(folder, disk_full_reason(cause),
                            needed=_result_bytes(result, int8_onnx)) from None


def _result_bytes(result, int8_onnx):
    """About the bytes a result folder takes: its weights and ONNX files, plus 16 KB for
    result.json, params_used.py, per_subject.csv and the zip framing of saved.pth."""
    def weights(state):
        return sum(v.numel() * v.element_size() for v in (state or {}).values()
                   if hasattr(v, 'numel'))
    refit = getattr(result, 'refit', None) or {}
    total = weights(result.state_dict) + len(result.onnx or b'') + len(int8_onnx or b'')
    total += weights(refit.get('state_dict')) + len(refit.get('onnx') or b'')
    total += len(refit.get('int8_onnx') or b'')
    return total + 16 * 1024


def _write_result_files(folder, *, result, name, model_name, lr, settings, onnx_bytes,
                        info=None, int8_onnx=None):
    import torch
    refit = getattr(result, 'refit', None)
    stem = 'saved.val' if refit else 'saved'     # REFIT: saved.* is the refit model
    torch.save(result.state_dict, os.path.join(folder, f'{stem}.pth'))
    with open(os.path.join(folder, f'{stem}.onnx'), 'wb') as f:
        f.write(result.onnx)
    if int8_onnx:
        with open(os.path.join(folder, f'{stem}.int8.onnx'), 'wb') as f:
            f.write(int8_onnx)
    if refit:
        torch.save(refit['state_dict'], os.path.join(folder, 'saved.pth'))
        with open(os.path.join(folder, 'saved.onnx'), 'wb') as f:
            f.write(refit['onnx'])
        if refit.get('int8_onnx'):
            with open(os.path.join(folder, 'saved.int8.onnx'), 'wb') as f:
                f.write(refit['int8_onnx'])
    select_on = settings.SELECT_ON
    other = 'test' if select_on == 'val' else 'val'
    record = {'folder': name, 'model': model_name, 'lr': lr, 'onnx_bytes': onnx_bytes,
              'select_on': select_on,
              f"{select_on}_metrics": result.selected(select_on),
              f"{other}_metrics": result.selected(other),
              'latency_ms': result.latency_ms, 'params': result.params, 'epochs': result.epochs,
              'best_epoch': result.best_epoch, 'stop_reason': result.stop_reason,
              'history': [list(h) for h in (result.history or [])],
              'confusion': result.confusion or {}, **(info or {})}
    if refit:
        record['refit'] = {k: v for k, v in refit.items()
                           if k not in ('state_dict', 'onnx', 'int8_onnx', 'per_subject', 'model')}
    write_settings(settings, os.path.join(folder, 'params_used.py'))
    write_info(folder, record)
    rows = list(getattr(result, 'per_subject', None) or []) + list((refit or {}).get('per_subject', []))
    if rows:
        from public.trial import PER_SUBJECT_COLUMNS
        pd.DataFrame(rows, columns=list(PER_SUBJECT_COLUMNS)).to_csv(
            os.path.join(folder, 'per_subject.csv'), index=False)


def write_info(folder, info):
    """result.json and the evaluation_metrics.txt made from it (their one writer)."""
    with open(os.path.join(folder, 'result.json'), 'w') as f:
        json.dump(info, f, indent=2, default=_json_default)
    with open(os.path.join(folder, 'evaluation_metrics.txt'), 'w') as f:
        f.write(evaluation_text(info))


def read_info(folder):
    try:
        with open(os.path.join(folder, 'result.json')) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _json_default(value):
    if hasattr(value, 'item'):
        return value.item()
    if hasattr(value, 'tolist'):
        return value.tolist()
    return str(value)
