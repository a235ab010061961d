"""Stage one: every registered model over the learning-rate grid, with avoid.txt pruning.

    candidates = learning_rate_candidates(0.0015, 0.0050, 0.0005)   # exactly 8 values
    avoid = AvoidList('avoid.txt', step=0.0005)
    avoid.pruned_by(0.0025, 'AFNet')      # the entry within 2*STEP that prunes it, or None
    run_stage_one(settings, data)         # the whole search; resumable

avoid.txt: one learning rate per line, optionally followed by a model name; `#` starts a
comment. A bare number (what a user writes by hand) prunes that rate and its neighbours
(within 2*STEP) for every model; the search appends `<lr> <Model>` lines, scoped to the
model it was searching.
"""
import hashlib
import json
import math
import os
import re
import shutil
import time
from decimal import Decimal

import pandas as pd

from public.config import settings_dict
from public.export import size_kb
from public.results import (STAGE1_COLUMNS, ResultsTable, recover_folders, replace_folder,
                            write_result_files)
from public.test import METRIC_NAMES, percent, score_digits, selection_score
from public.trial import STATUS_DIVERGED, STATUS_FAILED, STATUS_OK, run_trial

RESULTS_CSV = 'results.csv'
SUMMARY_CSV = 'summary.csv'
_RESULT_FOLDER = re.compile(r'^\d{1,3}-\d{1,3}$')
_MODEL_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_.]*$')

# Settings whose change makes earlier trials incomparable (they are then not reused).
_TRIAL_SETTINGS = ('DATA_DIR', 'TEST_DIR', 'DATA_FORMAT', 'INPUT_SIZE', 'PAD_TOLERANCE',
                   'SHORTER', 'LONGER', 'POSITIVE_LABELS', 'CLASSES', 'VAL_FRACTION', 'VAL_FOLDS',
                   'SKIP_BAD_FILES', 'NUM_EPOCHS', 'BATCH_SIZE', 'PATIENCE', 'OVERFIT_GAP',
                   'WEIGHT_DECAY', 'SEED', 'SELECT_ON', 'SELECT_METRIC', 'ONNX_OPSET')


class AvoidFileError(ValueError):
    """A malformed avoid.txt line; the message names the file, line, text and rule."""


def learning_rate_candidates(lr_min, lr_max, step):
    """LR_MIN, LR_MIN+STEP, ... up to LR_MAX inclusive, in decimal arithmetic (no drift)."""
    lo, hi, st = (Decimal(repr(float(v))) for v in (lr_min, lr_max, step))
    if st <= 0:
        raise ValueError(f"STEP must be > 0, got STEP={step!r}")
    if lo > hi:
        raise ValueError(f"LR_MIN must be <= LR_MAX, got LR_MIN={lr_min!r}, LR_MAX={lr_max!r}")
    count = int((hi - lo) / st)
    return [float(lo + i * st) for i in range(count + 1)]


class AvoidList:
    """The pruned learning rates of avoid.txt and the +-2*STEP neighbourhood rule."""

    RULE = "'<learning rate> [<ModelName>] [# comment]', e.g. '0.0025' or '0.0025 AFNet'"

    def __init__(self, path, step):
        self.path = path
        self.step = step
        self.entries = []      # (lr, model name or None for every model, line number)
        self.reload()

    def reload(self):
        self.entries = []
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            for number, line in enumerate(f, start=1):
                text = line.split('#', 1)[0].strip()
                if not text:
                    continue
                tokens = text.split()
                try:
                    lr = float(tokens[0])
                except ValueError:
                    lr = None
                if (lr is None or not math.isfinite(lr) or lr <= 0 or len(tokens) > 2
                        or (len(tokens) == 2 and not _MODEL_NAME.match(tokens[1]))):
                    raise AvoidFileError(f"{self.path}: line {number}: {line.strip()!r} is not "
                                         f"a valid entry; expected {self.RULE} with a "
                                         f"learning rate > 0")
                self.entries.append((lr, tokens[1] if len(tokens) == 2 else None, number))

    def pruned_by(self, lr, model):
        """The (lr, model) entry within 2*STEP of lr that applies to model, or None."""
        reach = 2 * self.step * (1 + 1e-9)
        for entry_lr, entry_model, _ in self.entries:
            if entry_model in (None, model) and abs(lr - entry_lr) <= reach:
                return entry_lr, entry_model
        return None

    def contains(self, lr, model):
        return any(m == model and math.isclose(e, lr, rel_tol=1e-9) for e, m, _ in self.entries)

    def add(self, lr, model, note=''):
        """Append a scoped entry (the search's own), on a line of its own."""
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, 'rb') as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b'\n'
            if needs_newline:
                with open(self.path, 'a') as f:
                    f.write('\n')
        with open(self.path, 'a') as f:
            f.write(f"{lr!r} {model}" + (f"  # {note}" if note else '') + '\n')
            f.flush()
            os.fsync(f.fileno())
        self.entries.append((lr, model, None))

    def remove_scoped(self):
        """Drop every search-written (scoped) line, keep the user's lines; for a fresh start."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if len(ln.split('#', 1)[0].split()) != 2]
        with open(self.path, 'w') as f:
            f.writelines(keep)
        self.reload()


def settings_key(settings):
    values = settings_dict(settings)
    blob = json.dumps({k: values[k] for k in _TRIAL_SETTINGS}, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:10]


def lr_key(lr):
    return repr(float(lr))


def best_rank(row):
    """Sort key of a results row: the SELECT_METRIC score, then yy, then xx."""
    return (float(row['score']), int(row['yy']), int(row['xx']))


def score_of(result, settings):
    """The selection score of a trial on the SELECT_ON split (0 when it has no metrics)."""
    selected = result.selected(settings.SELECT_ON)
    return selection_score(selected, settings.SELECT_METRIC) if selected else 0.0


def result_folders(model_dir):
    """The visible xx-yy result folders of a model directory."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(e for e in os.listdir(model_dir)
                  if _RESULT_FOLDER.match(e) and os.path.isdir(os.path.join(model_dir, e)))


def _archive(settings, log):
    stamp = time.strftime('%Y%m%d-%H%M%S')
    root = settings.MODEL_SAVE_PATH.rstrip('/\\')
    archive = f"{root}-archive-{stamp}"
    count = 1
    while os.path.exists(archive):         # two fresh starts within one second
        count += 1
        archive = f"{root}-archive-{stamp}-{count}"
    entries = [e for e in os.listdir(root) if not e.startswith('.')] if os.path.isdir(root) else []
    if entries:               # the folder itself stays (it is part of the project layout)
        os.makedirs(archive)
        for entry in entries:
            shutil.move(os.path.join(root, entry), os.path.join(archive, entry))
        if os.path.exists(settings.AVOID_FILE_PATH):
            shutil.copy(settings.AVOID_FILE_PATH, os.path.join(archive, 'avoid.txt'))
        log(f"RESUME=False: earlier results moved to {archive}")
    AvoidList(settings.AVOID_FILE_PATH, settings.STEP).remove_scoped()


def _row(model_name, lr, result, settings, key, pruned):
    selected = result.selected(settings.SELECT_ON)
    xx, yy = score_digits(selected) if selected else ('', '')
    row = dict(model=model_name, lr=lr_key(lr) if lr is not None else '', status=result.status,
               stop_reason=result.stop_reason, epochs=result.epochs, best_epoch=result.best_epoch,
               select_on=settings.SELECT_ON, select_metric=settings.SELECT_METRIC,
               score=score_of(result, settings) if selected else '', xx=xx, yy=yy, pruned=pruned,
               onnx_kb=size_kb(result.onnx_bytes) if result.onnx_bytes else '',
               onnx_bytes=result.onnx_bytes or '', latency_ms=result.latency_ms,
               params=result.params, wall_s=result.wall_s, seed=settings.SEED,
               settings_key=key, finished_at=time.strftime('%Y-%m-%dT%H:%M:%S'),
               error=result.error.splitlines()[0] if result.error else '')
    for split, metrics in (('val', result.val_metrics), ('test', result.test_metrics)):
        for m in METRIC_NAMES + ('auc', 'abs_sum'):
            row[f"{split}_{m}"] = metrics.get(m, '') if metrics else ''
    return row


def _save_best(settings, model_name, lr, result, log):
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, model_name)
    xx, yy = score_digits(result.selected(settings.SELECT_ON))
    name = f"{xx}-{yy}"
    other = result.test_metrics if settings.SELECT_ON == 'val' else result.val_metrics

    def build(folder):
        write_result_files(folder, name=name, state_dict=result.state_dict,
                           onnx_path=os.path.join(settings.TEMP_DIR, 'stage1-trial.onnx'),
                           selected_metrics=result.selected(settings.SELECT_ON),
                           other_metrics=other, select_on=settings.SELECT_ON, lr=lr,
                           model_name=model_name, onnx_bytes=result.onnx_bytes,
                           settings=settings,
                           info={'latency_ms': result.latency_ms, 'params': result.params,
                                 'epochs': result.epochs, 'stop_reason': result.stop_reason})
    replace_folder(model_dir, name, build, replaces=result_folders(model_dir))
    log(f"  new best for {model_name}: {os.path.join(model_dir, name)}")


def _write_error(settings, model_name, result):
    model_dir = os.path.join(settings.MODEL_SAVE_PATH, model_name)
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'error.txt'), 'a') as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')}\n{result.error}\n")


def run_stage_one(settings, data, models, interrupts, log=print, progress=True):
    """The stage-one search over `models` (classes); returns the summary DataFrame."""
    if not settings.RESUME:
        _archive(settings, log)
    os.makedirs(settings.MODEL_SAVE_PATH, exist_ok=True)
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    table = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, RESULTS_CSV), STAGE1_COLUMNS)
    avoid = AvoidList(settings.AVOID_FILE_PATH, settings.STEP)
    key = settings_key(settings)
    rows = table.rows()
    current = [r for r in rows if r['settings_key'] == key]
    finished = {(r['model'], r['lr']): r for r in current if r['status'] in (STATUS_OK, STATUS_DIVERGED)}
    if rows:
        log(f"Resuming from {table.path}: {len(finished)} finished trial(s) will not be repeated"
            + (f"; {len(rows) - len(current)} row(s) from other settings are kept but not reused"
               if len(current) < len(rows) else ''))
    else:
        log(f"Starting a fresh search; results go to {settings.MODEL_SAVE_PATH}/")
    for r in finished.values():                    # a kill between the row and avoid.txt
        if r['pruned'] == 'True' and not avoid.pruned_by(float(r['lr']), r['model']):
            avoid.add(float(r['lr']), r['model'], 'restored from results.csv')
    candidates = learning_rate_candidates(settings.LR_MIN, settings.LR_MAX, settings.STEP)
    log(f"Learning rates: {', '.join(lr_key(c) for c in candidates)}")
    for model_class in models:
        name = model_class.__name__
        model_dir = os.path.join(settings.MODEL_SAVE_PATH, name)
        for action in recover_folders(model_dir):
            log(f"  {name}: {action}")
        done = [r for r in finished.values() if r['model'] == name and r['status'] == STATUS_OK]
        if any(percent(float(r['score'])) >= settings.STAGE1_TARGET for r in done):
            log(f"{name}: STAGE1_TARGET={settings.STAGE1_TARGET} already reached; skipped")
            continue
        log(f"{name}: searching {len(candidates)} learning rate(s)")
        for lr in candidates:
            if (name, lr_key(lr)) in finished:
                log(f"  lr={lr_key(lr)}: finished in an earlier run; skipped")
                continue
            hit = avoid.pruned_by(lr, name)
            if hit:
                scope = f"for {hit[1]}" if hit[1] else 'for every model'
                log(f"  lr={lr_key(lr)}: pruned (avoid.txt has {hit[0]!r} {scope}, within 2*STEP)")
                continue
            result = run_trial(lambda: model_class(input_size=data.input_size,
                                                   in_channels=data.in_channels,
                                                   num_classes=data.num_classes),
                               lr, data, settings,
                               os.path.join(settings.TEMP_DIR, 'stage1-trial.onnx'),
                               progress=progress, desc=f"{name} lr={lr_key(lr)}")
            score = score_of(result, settings)
            pruned = result.status == STATUS_DIVERGED or (
                result.status == STATUS_OK and score < settings.AVOID_PARAM)
            row = _row(name, lr, result, settings, key, pruned)
            with interrupts.critical():
                table.append(row)
                if pruned:
                    why = ('diverged' if result.status == STATUS_DIVERGED else
                           f"{settings.SELECT_METRIC} on {settings.SELECT_ON} {score:.3f} < AVOID_PARAM {settings.AVOID_PARAM}")
                    avoid.add(lr, name, why)
                if result.status == STATUS_FAILED:
                    _write_error(settings, name, result)
                    log(f"  lr={lr_key(lr)}: FAILED ({row['error']}); traceback in "
                        f"{os.path.join(model_dir, 'error.txt')}; going on")
                    if result.epochs == 0:     # did not build or run: other rates won't either
                        break
                    continue
                log(f"  lr={lr_key(lr)}: {result.status}, {result.stop_reason} after {result.epochs} "
                    f"epoch(s), {settings.SELECT_ON} {row['xx']}-{row['yy']}"
                    f"{' (pruned)' if pruned else ''}, {row['onnx_kb'] or '-'} KB, {result.wall_s:.1f} s")
                if result.status == STATUS_OK:
                    finished[(name, lr_key(lr))] = row
                    rivals = [r for r in finished.values() if r['model'] == name
                              and r['status'] == STATUS_OK and r is not row]
                    if all(best_rank(row) > best_rank(r) for r in rivals):
                        _save_best(settings, name, lr, result, log)
            if result.status == STATUS_OK and percent(score) >= settings.STAGE1_TARGET:
                log(f"  {name}: {settings.SELECT_METRIC} {percent(score)} >= STAGE1_TARGET="
                    f"{settings.STAGE1_TARGET}; next model")
                break
    summary = summarize(settings, table, key, [m.__name__ for m in models])
    summary.to_csv(os.path.join(settings.MODEL_SAVE_PATH, SUMMARY_CSV), index=False)
    return summary


def summarize(settings, table, key, model_names):
    """One row per model: its best trial (by yy, then xx) with metrics, size and speed."""
    rows = [r for r in table.rows() if r['settings_key'] == key]
    out = []
    for name in model_names:
        mine = [r for r in rows if r['model'] == name]
        ok = [r for r in mine if r['status'] == STATUS_OK]
        entry = {'model': name, 'trials': len(mine), 'pruned': sum(r['pruned'] == 'True' for r in mine),
                 'failed': sum(r['status'] == STATUS_FAILED for r in mine)}
        if ok:
            best = max(ok, key=best_rank)     # max keeps the first of equals
            entry.update(best_lr=best['lr'], result=f"{best['xx']}-{best['yy']}",
                         score=round(float(best['score']), 4),
                         **{f"val_{m}": round(float(best[f'val_{m}']), 4) for m in METRIC_NAMES},
                         **({f"test_{m}": round(float(best[f'test_{m}']), 4) for m in METRIC_NAMES}
                            if best['test_f1'] != '' else {}),
                         onnx_kb=int(best['onnx_kb']), latency_ms=round(float(best['latency_ms']), 3),
                         params=int(best['params']),
                         folder=os.path.join(settings.MODEL_SAVE_PATH, name, f"{best['xx']}-{best['yy']}"))
        entry['wall_s'] = round(sum(float(r['wall_s']) for r in mine), 1)
        out.append(entry)
    return pd.DataFrame(out)
