"""Stage one: every registered model over the learning-rate grid, with avoid.txt pruning.

    candidates = learning_rate_candidates(0.0015, 0.0050, 0.0005)   # exactly 8 values
    avoid = AvoidList('avoid.txt', step=0.0005)
    avoid.pruned_by(0.0025, 'AFNet', key)   # the entry within 2*STEP that prunes it, or None
    run_stage_one(settings, data, models, interrupts)   # the whole search; resumable

avoid.txt: one learning rate per line, optionally followed by a model name; `#` starts a
comment. A line a user writes (a bare number, or `<lr> <Model>`) always applies: a bare
number to every model, a named one to that model. The search appends its own lines as
`<lr> <Model>  # atml:<settings key> <why>`: they apply only to searches with the same
trial settings, and RESUME=False removes only them.

What a stage-one search means under concurrency (StageOne): candidates are dispatched in
order (model by model, learning rates in grid order); a candidate is checked against
avoid.txt when it is about to start, so a rate pruned by a finished trial is skipped; a
trial already running when its rate becomes prunable finishes and is recorded; once a
model reaches STAGE1_TARGET its other trials are cancelled.
"""
import functools
import math
import os
import re
import shutil
import time
from decimal import Decimal

import pandas as pd

from public.errors import AvoidFileError
from public.executor import Job
from public.results import (STAGE1_COLUMNS, ResultsTable, atml_made, best_rank, durable,
                            lr_key, read_info, recover_folders, replace_folder,
                            settings_key, trial_row, write_atomic, write_info, write_result_files,
                            MODEL_FILES)
from public.test import percent
from public.trial import STATUS_DIVERGED, STATUS_FAILED, STATUS_OK, TrialResult, TrialSpec

RESULTS_CSV = 'results.csv'
SUMMARY_CSV = 'summary.csv'
STORE = '.store'
_RESULT_FOLDER = re.compile(r'^\d{1,3}-\d{1,3}$')
_MODEL_NAME = re.compile(r'^[A-Za-z_][A-Za-z0-9_.]*$')
_TAG = re.compile(r'#\s*atml:([0-9a-f]{10})\b')

__all__ = ['AvoidFileError', 'AvoidList', 'learning_rate_candidates', 'run_stage_one',
           'settings_key', 'result_folders', 'summarize', 'best_rank', 'lr_key']


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
        self.entries = []      # (lr, model or None for every model, line number, atml key or None)
        self.reload()

    def reload(self):
        self.entries = []
        if os.path.isdir(self.path):
            raise AvoidFileError(f"AVOID_FILE_PATH={self.path!r} is a folder; it must name a "
                                 f"text file (created when missing)")
        if not os.path.exists(self.path):
            return
        with open(self.path, errors='replace') as f:
            for number, line in enumerate(f, start=1):
                text, _, comment = line.partition('#')
                text = text.strip()
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
                tag = _TAG.search('#' + comment) if comment else None
                self.entries.append((lr, tokens[1] if len(tokens) == 2 else None, number,
                                     tag.group(1) if tag else None))

    def pruned_by(self, lr, model, key=None):
        """The (lr, model) entry within 2*STEP of lr that applies to model, or None. Lines the
        search wrote under other trial settings (another key) do not apply."""
        reach = 2 * self.step * (1 + 1e-9)
        for entry_lr, entry_model, _, tag in self.entries:
            if (entry_model in (None, model) and tag in (None, key)
                    and abs(lr - entry_lr) <= reach):
                return entry_lr, entry_model
        return None

    def contains(self, lr, model, key=None):
        return any(m == model and tag in (None, key) and math.isclose(e, lr, rel_tol=1e-9)
                   for e, m, _, tag in self.entries)

    def add(self, lr, model, note='', key=None):
        """Append the search's own entry (tagged with its settings key) on a line of its own."""
        if os.path.exists(self.path) and os.path.getsize(self.path):
            with open(self.path, 'rb') as f:
                f.seek(-1, os.SEEK_END)
                needs_newline = f.read(1) != b'\n'
            if needs_newline:
                with open(self.path, 'a') as f:
                    f.write('\n')
        comment = ' '.join(p for p in (f"atml:{key}" if key else '', note) if p)
        with open(self.path, 'a') as f:
            f.write(f"{lr!r} {model}" + (f"  # {comment}" if comment else '') + '\n')
            f.flush()
            os.fsync(f.fileno())
        durable('avoid.txt line')
        self.entries.append((lr, model, None, key))

    def remove_search_lines(self):
        """Drop the lines the search wrote (tagged `# atml:`), keep the user's; for RESUME=False."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            lines = f.readlines()
        keep = [ln for ln in lines if not _TAG.search(ln)]
        if keep != lines:
            write_atomic(self.path, ''.join(keep))
        self.reload()

    def unknown_models(self, known):
        """Lines naming a model that is not registered: (line number, name, closest name)."""
        import difflib
        out = []
        for _, model, number, _ in self.entries:
            if model and model not in known:
                close = difflib.get_close_matches(model, list(known), n=1)
                out.append((number, model, close[0] if close else None))
        return out


def result_folders(model_dir):
    """The visible xx-yy result folders of a model directory."""
    if not os.path.isdir(model_dir):
        return []
    return sorted(e for e in os.listdir(model_dir)
                  if _RESULT_FOLDER.match(e) and os.path.isdir(os.path.join(model_dir, e)))


def archive_results(settings, log):
    """RESUME=False: move the earlier search's results aside (kept, never deleted)."""
    stamp = time.strftime('%Y%m%d-%H%M%S')
    root = settings.MODEL_SAVE_PATH.rstrip('/\\')
    archive = f"{root}-archive-{stamp}"
    count = 1
    while os.path.exists(archive):         # two fresh starts within one second
        count += 1
        archive = f"{root}-archive-{stamp}-{count}"
    entries = ([e for e in os.listdir(root) if e != '.atml.lock' and
                (not e.startswith('.') or e == STORE)] if os.path.isdir(root) else [])
    if entries:               # the folder itself stays (it is part of the project layout)
        os.makedirs(archive)
        if os.path.exists(settings.AVOID_FILE_PATH):
            shutil.copy(settings.AVOID_FILE_PATH, os.path.join(archive, 'avoid.txt'))
        for entry in entries:
            shutil.move(os.path.join(root, entry), os.path.join(archive, entry))
        log(f"RESUME=False: earlier results moved to {archive}")
    AvoidList(settings.AVOID_FILE_PATH, settings.STEP).remove_search_lines()


# ----------------------------------------------------------------------------- the stage

def _build(model_class, input_size, in_channels, num_classes):
    return model_class(input_size=input_size, in_channels=in_channels, num_classes=num_classes)


class StageOne:
    """Stage one's decisions, for the dispatch loop (public/dispatch.py)."""

    def __init__(self, settings, data, models, log=print, progress=True, trainer=None):
        self.settings, self.data, self.log = settings, data, log
        self.models = {m.__name__: m for m in models}
        self.progress, self.trainer = progress, trainer
        self.root = settings.MODEL_SAVE_PATH
        self.table = ResultsTable(os.path.join(self.root, RESULTS_CSV), STAGE1_COLUMNS)
        self.avoid = AvoidList(settings.AVOID_FILE_PATH, settings.STEP)
        self.key = settings_key(settings)
        self.candidates = learning_rate_candidates(settings.LR_MIN, settings.LR_MAX,
                                                   settings.STEP)
        self.queue = [(name, lr) for name in self.models for lr in self.candidates]
        self.done = set()              # models whose search ended (target, or cannot build)
        self.announced = set()
        self.rows = []                 # this key's rows, in table order

    # -- start: repair everything derived from the table
    def start(self):
        lost = self.table.quarantine()
        if lost:
            self.log(f"warning: {self.table.path}: line(s) {', '.join(map(str, lost))} are not "
                     f"rows of this table; moved to {self.table.path}.rejected")
        for action in recover_folders(self.root):
            self.log(f"  {self.root}: {action}")
        all_rows = self.table.rows()
        self.rows = [r for r in all_rows if r['settings_key'] == self.key]
        finished = self.finished()
        if all_rows:
            other = len(all_rows) - len(self.rows)
            self.log(f"Resuming from {self.table.path}: {len(finished)} finished trial(s) will "
                     f"not be repeated" + (f"; {other} row(s) from other settings are kept but "
                                           f"not reused" if other else ''))
        else:
            self.log(f"Starting a fresh search; results go to {self.root}/")
        for r in finished.values():                # a kill between the row and avoid.txt
            if r['pruned'] == 'True' and not self.avoid.pruned_by(float(r['lr']), r['model'], self.key):
                self.avoid.add(float(r['lr']), r['model'], 'restored from results.csv', self.key)
        for name in self.models:
            model_dir = os.path.join(self.root, name)
            for action in recover_folders(model_dir):
                self.log(f"  {name}: {action}")
            self.reconcile(name)
            ok = [r for r in finished.values() if r['model'] == name and r['status'] == STATUS_OK]
            if any(percent(float(r['score'])) >= self.settings.STAGE1_TARGET for r in ok):
                self.log(f"{name}: STAGE1_TARGET={self.settings.STAGE1_TARGET} already reached; skipped")
                self.done.add(name)
        self._remove_orphan_stores()
        self.write_summary()
        self.log(f"Learning rates: {', '.join(lr_key(c) for c in self.candidates)}")

    def finished(self):
        return {(r['model'], r['lr']): r for r in self.rows
                if r['status'] in (STATUS_OK, STATUS_DIVERGED)}

    # -- the dispatch loop's questions
    def next_job(self):
        finished = self.finished()
        while self.queue:
            name, lr = self.queue[0]
            if name in self.done:
                self.queue.pop(0)
                continue
            if name not in self.announced:
                self.announced.add(name)
                self.log(f"{name}: searching {len(self.candidates)} learning rate(s)")
            self.queue.pop(0)
            if (name, lr_key(lr)) in finished:
                self.log(f"  {name} lr={lr_key(lr)}: finished in an earlier run; skipped")
                continue
            hit = self.avoid.pruned_by(lr, name, self.key)
            if hit:
                scope = f"for {hit[1]}" if hit[1] else 'for every model'
                self.log(f"  {name} lr={lr_key(lr)}: pruned (avoid.txt has {hit[0]!r} {scope}, within 2*STEP)")
                continue
            data = self.data
            spec = TrialSpec(key=f"{name}@{lr_key(lr)}", lr=lr, settings=self.settings,
                             build=functools.partial(_build, self.models[name], data.input_size,
                                                     data.in_channels, data.num_classes),
                             trainer=self.trainer, progress=self.progress,
                             refit_above=self.best_score(name))
            return Job(key=spec.key, fn=_run_job, payload=spec)
        return None

    def obsolete(self, job):
        return job.payload.key.split('@')[0] in self.done

    def best_score(self, name):
        """The best score recorded for a model under this key (0 before any): REFIT retrains
        only a trial that reaches it, as only such a trial can become the best folder."""
        scores = [float(r['score']) for r in self.rows
                  if r['model'] == name and r['status'] == STATUS_OK and r['score'] != '']
        return max(scores, default=0.0)

    def record(self, outcome):
        spec = outcome.job.payload
        name, lr = spec.key.split('@')[0], spec.lr
        result = outcome.result if outcome.ok else TrialResult(status=STATUS_FAILED,
                                                               error=outcome.error)
        result.node, result.attempts = outcome.node, outcome.attempts
        settings = self.settings
        score = self.score(result)
        pruned = result.status == STATUS_DIVERGED or (
            result.status == STATUS_OK and score < settings.AVOID_PARAM)
        row = trial_row(result, settings, self.key, model=name, lr=lr_key(lr), pruned=pruned)
        if result.status == STATUS_OK:
            self._store(name, lr, result)          # artifacts first: the row may rebuild from them
        self.table.append(row)                     # the commit point
        self.rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        if pruned:
            why = ('diverged' if result.status == STATUS_DIVERGED else
                   f"{settings.SELECT_METRIC} on {settings.SELECT_ON} {score:.3f} < AVOID_PARAM {settings.AVOID_PARAM}")
            self.avoid.add(lr, name, why, self.key)
        model_dir = os.path.join(self.root, name)
        if result.status == STATUS_FAILED:
            _write_error(model_dir, name, lr, result)
            self.log(f"  {name} lr={lr_key(lr)}: FAILED ({row['error']}); traceback in "
                     f"{os.path.join(model_dir, 'error.txt')}; going on")
            if result.epochs == 0 and outcome.ok:   # did not build or run: other rates won't either
                self.done.add(name)
        else:
            self.log(f"  {name} lr={lr_key(lr)}: {result.status}, {result.stop_reason} after "
                     f"{result.epochs} epoch(s), {settings.SELECT_ON} {row['xx']}-{row['yy']}"
                     f"{' (pruned)' if pruned else ''}, {row['onnx_kb'] or '-'} KB, "
                     f"{result.wall_s:.1f} s" + (f" on node {result.node}" if result.node not in ('', 'local') else ''))
            self.reconcile(name)
        if result.status == STATUS_OK and percent(score) >= settings.STAGE1_TARGET \
                and name not in self.done:
            self.log(f"  {name}: {settings.SELECT_METRIC} {percent(score)} >= STAGE1_TARGET="
                     f"{settings.STAGE1_TARGET}; next model")
            self.done.add(name)
        self.write_summary()

    def score(self, result):
        from public.test import selection_score
        selected = result.selected(self.settings.SELECT_ON)
        return selection_score(selected, self.settings.SELECT_METRIC) if selected else 0.0

    # -- derived files
    def _store_dir(self, name):
        return os.path.join(self.root, STORE, self.key, name)

    def _store(self, name, lr, result):
        def build(folder):
            write_result_files(folder, result=result, name='', model_name=name, lr=lr,
                               settings=self.settings, onnx_bytes=result.onnx_bytes,
                               info={'settings_key': self.key})
        replace_folder(self._store_dir(name), lr_key(lr), build)

    def reconcile(self, name):
        """Make <Model>/ hold exactly the best folder the table names for this key: build it
        from the store when missing, remove stale or doubled ones, keep other settings' best
        folders under <Model>/settings-<key>/; prune the store to the best trial."""
        model_dir = os.path.join(self.root, name)
        ok = [r for r in self.rows if r['model'] == name and r['status'] == STATUS_OK]
        best = max(ok, key=best_rank) if ok else None    # max keeps the first of equals
        target = f"{best['xx']}-{best['yy']}" if best else None
        for folder in result_folders(model_dir):
            path = os.path.join(model_dir, folder)
            info = read_info(path)
            if not atml_made(path) or info is None:
                continue                              # not ATML's: never touched
            key = info.get('settings_key')
            if key and key != self.key:
                keep = os.path.join(model_dir, f"settings-{key}")
                os.makedirs(keep, exist_ok=True)
                shutil.rmtree(os.path.join(keep, folder), ignore_errors=True)
                os.rename(path, os.path.join(keep, folder))
                durable('kept other settings folder')
                self.log(f"  {name}: {folder}/ of other settings moved to settings-{key}/{folder}/")
            elif folder != target or key is None or info.get('lr_key') != best['lr']:
                shutil.rmtree(path)
                durable('removed stale best folder')
        if best is None:
            return
        path = os.path.join(model_dir, target)
        source = os.path.join(self._store_dir(name), best['lr'])
        info = read_info(source)
        if not os.path.isdir(path):
            if info is None:
                self.log(f"  warning: {name}: the files of its best trial (lr={best['lr']}) are "
                         f"missing from {source}; its best folder cannot be rebuilt")
                return

            def build(folder):
                for f in MODEL_FILES:
                    if os.path.exists(os.path.join(source, f)):
                        shutil.copy2(os.path.join(source, f), os.path.join(folder, f))
                write_info(folder, {**info, 'folder': target, 'settings_key': self.key,
                                    'lr_key': best['lr']})
            replace_folder(model_dir, target, build)
            shutil.rmtree(os.path.join(model_dir, f"settings-{self.key}"), ignore_errors=True)
            self.log(f"  new best for {name}: {path}")
        for entry in os.listdir(self._store_dir(name)):     # only the best trial's files stay
            if entry != best['lr'] and not entry.startswith('.'):
                shutil.rmtree(os.path.join(self._store_dir(name), entry))
                durable('pruned store')

    def _remove_orphan_stores(self):
        # Artifacts of a trial killed before its row was written: nothing refers to them.
        for name in self.models:
            store = self._store_dir(name)
            if not os.path.isdir(store):
                continue
            recover_folders(store)
            rows = {r['lr'] for r in self.rows if r['model'] == name}
            for entry in os.listdir(store):
                if entry not in rows:
                    shutil.rmtree(os.path.join(store, entry), ignore_errors=True)
                    durable('removed orphan store entry')

    def write_summary(self):
        summary = summarize(self.settings, self.rows, list(self.models))
        write_atomic(os.path.join(self.root, SUMMARY_CSV), summary.to_csv(index=False))
        return summary


def _run_job(spec, data):
    from public.trial import run_job
    return run_job(spec, data)


def _write_error(model_dir, name, lr, result):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'error.txt'), 'a') as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {name} lr={lr_key(lr)}\n{result.error}\n")


def run_stage_one(settings, data, models, interrupts, log=print, progress=True, executor=None,
                  trainer=None, on_record=None):
    """The stage-one search over `models` (classes); returns the summary DataFrame.
    `executor` defaults to the in-process serial one; `on_record()` runs after each trial."""
    from public.dispatch import run_dispatch
    from public.executor import SerialExecutor
    if not settings.RESUME:
        archive_results(settings, log)
    os.makedirs(settings.MODEL_SAVE_PATH, exist_ok=True)
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    stage = StageOne(settings, data, models, log, progress, trainer)
    stage.start()
    own = executor is None
    executor = executor or SerialExecutor(data)
    try:
        run_dispatch(stage, executor, interrupts, on_record)
    finally:
        if own:
            executor.shutdown()
    return stage.write_summary()


def summarize(settings, rows, model_names):
    """One row per model: its best trial (best_rank: score, then yy, then xx) with metrics,
    size and speed; `rows` are the current settings' rows of results.csv."""
    from public.test import METRIC_NAMES
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
