"""Stage one: every registered model over the learning-rate grid, with avoid.txt pruning.

    run_stage_one(settings, data, models, interrupts)   # the whole search; resumable

The grid and avoid.txt are public/search/avoid.py's (learning_rate_candidates, AvoidList).

What a stage-one search means under concurrency (StageOne): candidates are dispatched in
order (model by model, learning rates in grid order); a candidate is checked against
avoid.txt when it is about to start, so a rate pruned by a finished trial is skipped; a
trial already running when its rate becomes prunable finishes and is recorded; once a
model reaches STAGE1_TARGET its other trials are cancelled.

SCHEDULER='halving' (successive halving): the serial order of a model is its rung 1 (every
rate of the grid, HALVING_MIN_EPOCHS epochs), then rung 2 (the best ceil(n/HALVING_ETA) of
the n trained in rung 1 that can go on, continuing from their checkpoints to eta times the
epochs), and so on to NUM_EPOCHS (a rung of one goes straight there). A rung's promotions are
decided when the walk reaches its end (every candidate of the rung committed), from the
scores alone, ties to the smaller rate: the same answer with any number of workers and after
any interruption. Inside a rung ATML's rules hold: early stopping (a trial that stops early is
finished), avoid.txt (a trial that diverges, or finishes below AVOID_PARAM, prunes its rate
and neighbours, as in the grid), STAGE1_TARGET (reached at any rung, the model's search
ends). A trial that trained its rung is recorded 'stopped' (not pruned, not in avoid.txt,
even below AVOID_PARAM), and 'promoted' at the rung's end if it goes on, its next rung's row
holding what followed.
"""
import math
import functools
import os
import re
import shutil
import time

import pandas as pd

from public.core.atomic import atml_made, durable, replace_folder, write_atomic
from public.results.files import MODEL_FILES, kb2, read_info, write_info, write_result_files
from public.results.keys import best_rank, lr_key, settings_key, trial_row
from public.results.store import recover_folders
from public.results.table import STAGE1_COLUMNS, ResultsTable
from public.search.avoid import AvoidList, learning_rate_candidates
from public.search.dispatch import SpeculativeWork, run_stage
from public.search.executor import Job
from public.search.progress import PlanChanged
from public.results.summary import SUMMARY_CSV, read_summary, recommended_pick  # noqa: F401 (API)
from public.search.teacher import attach_teacher
from public.search.trial import TrialSpec, drop_unneeded_refit, outcome_result, run_trial_job
from public.search.trial import checkpoint_path, clean_checkpoints, remove_checkpoint
from public.train.loop import STOP_BUDGET
from public.train.metrics import METRIC_NAMES, percent, selection_score
from public.train.outcome import TrialStatus

RESULTS_CSV = 'results.csv'
STORE = '.store'
_RESULT_FOLDER = re.compile(r'^\d{1,3}-\d{1,3}$')
__all__ = ['StageOne', 'run_stage_one', 'result_folders', 'summarize', 'archive_results',
           'rung_budgets', 'RungEnd', 'promotions', 'next_rung']
# The statuses of a row that ends its trial under this key (a rerun does not train it again).
FINAL = (TrialStatus.OK, TrialStatus.DIVERGED, TrialStatus.STOPPED)


def rung_budgets(settings):
    """The epochs each rung trains to in all: [NUM_EPOCHS] for the grid; for halving r,
    r*eta, r*eta^2, ... and NUM_EPOCHS last (3, 9, 27, 30 at r=3, eta=3, NUM_EPOCHS=30)."""
    if settings.SCHEDULER != 'halving':
        return [settings.NUM_EPOCHS]
    budgets, b = [], settings.HALVING_MIN_EPOCHS
    while b < settings.NUM_EPOCHS:
        budgets.append(b)
        b *= settings.HALVING_ETA
    return budgets + [settings.NUM_EPOCHS]


def row_rung(row):
    """The 0-based rung of a results row (0 for a grid search's rows)."""
    return int(row['rung']) - 1 if row.get('rung') not in (None, '') else 0


class RungEnd:
    """An entry of a halving search's serial order after a rung's candidates: where its
    promotions are decided (`name`: the model, in stage one; None in stage two)."""

    def __init__(self, rung, name=None):
        self.rung, self.name = rung, name


def promotions(able, trained, eta, tie):
    """A rung's end (both stages): of the `trained` candidates of the rung, the best
    ceil(trained / eta) of those that can go on (`able`, rows), by score as the results
    tables hold it (6 significant digits: a resumed search ranks the rows it reads back as
    the search that wrote them did), then yy, then xx, then `tie(row)` (larger first)."""
    keep = min(len(able), math.ceil(trained / eta))
    return sorted(able, key=lambda r: (float(f"{float(r['score']):.6g}"), int(r['yy']),
                                       int(r['xx']), tie(r)), reverse=True)[:keep]


def next_rung(budgets, rung, promoted, num_epochs):
    """(the epochs the rung after `rung` trains to, whether it is the last): a rung of one
    goes straight to NUM_EPOCHS."""
    last = len(promoted) == 1 or rung + 1 >= len(budgets) - 1
    return (num_epochs if last else budgets[rung + 1]), last


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
    clean_checkpoints(settings.TEMP_DIR, 's1-', None, [], log)


# ----------------------------------------------------------------------------- the stage

def _build(model_class, input_size, in_channels, num_classes):
    return model_class(input_size=input_size, in_channels=in_channels, num_classes=num_classes)


class StageOne:
    """Stage one's decisions: a dispatch.Stage (next_job, record, obsolete)."""

    def __init__(self, settings, data, models, log=print, progress=True, trainer=None):
        self.settings, self.data, self.log = settings, data, log
        self.models = {m.__name__: m for m in models}
        self.progress, self.trainer = progress, trainer
        self.root = settings.MODEL_SAVE_PATH
        self.table = ResultsTable(os.path.join(self.root, RESULTS_CSV), STAGE1_COLUMNS)
        self.avoid = AvoidList(settings.AVOID_FILE_PATH, settings.STEP)
        self.key = settings_key(settings)
        self.checkpoints = f"s1-{self.key}"    # this key's folder of trial checkpoints
        self.candidates = learning_rate_candidates(settings.LR_MIN, settings.LR_MAX,
                                                   settings.STEP)
        self.halving = settings.SCHEDULER == 'halving'
        self.budgets = rung_budgets(settings)
        # The serial order: model by model, learning rates in grid order (halving: rung 1 of
        # a model, its RungEnd, the rungs it promotes to, then the next model). The serial
        # search walks it one candidate at a time; `self.pos` is how far this search walked.
        self.order = []
        for name in self.models:
            self.order += [(name, lr, 0) for lr in self.candidates]
            if self.halving and len(self.budgets) > 1:
                self.order.append(RungEnd(0, name))
        self.pos = 0
        self.rung_budget = {}          # (model, rung) -> the epochs that rung trains to
        self.waiting = {}              # key -> Outcome: finished, not yet reached by the walk
        self.dispatched = {}           # key -> time.time() when it was handed out (this run)
        self.discarded = set()         # keys the walk decided the serial search never runs
        self.speculative = SpeculativeWork()
        self.done = set()              # models whose search ended (target, or cannot build)
        self.announced = set()
        self.rows = []                 # this key's rows, in table order
        self.notify = lambda event: None   # progress events of the plan (watch())
        self.report_to = None              # where a trial reports its epochs (TrialSpec)
        self.skipped = 0               # candidates decided without training (progress)
        self.on_cluster = False        # name a trial's node only when attached to a cluster

    def watch(self, watch):
        """Report progress to a dispatch.Watch (None: report nothing)."""
        if watch is not None:
            self.notify, self.report_to = watch.event, watch.report_to
            self.notify(PlanChanged(planned=self.planned(), skipped=0))

    def planned(self):
        """Trials in the plan so far (halving: rungs are added as they are decided)."""
        return sum(1 for entry in self.order if not isinstance(entry, RungEnd))

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
        finished = self.finished_trials()
        self.finished_before = {(r['model'], r['lr'], row_rung(r)) for r in self.rows
                                if r['status'] in FINAL + (TrialStatus.PROMOTED,)}
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
            ok = [r for r in finished.values() if r['model'] == name and r['status'] == TrialStatus.OK]
            if any(percent(float(r['score'])) >= self.settings.STAGE1_TARGET for r in ok):
                self.log(f"{name}: STAGE1_TARGET={self.settings.STAGE1_TARGET} already reached; skipped")
                self.done.add(name)
        self._remove_orphan_stores()
        clean_checkpoints(self.settings.TEMP_DIR, 's1-', self.checkpoints,   # a 'stopped' one
                          [f"{m}@{lr}" for (m, lr), r in finished.items()    # may still be
                           if r['status'] != TrialStatus.STOPPED], self.log)  # promoted
        self.write_summary()
        self.log(f"Learning rates: {', '.join(lr_key(c) for c in self.candidates)}")
        self.log(scores_note(self.settings))

    def avoid_skipped(self):
        """{model: how many of its grid rates avoid.txt keeps from training} (not trained
        under this key; the summary's `skipped`, apart from `pruned`)."""
        trained = {(r['model'], r['lr']) for r in self.rows        # as the serial search
                   if r['status'] != TrialStatus.SPECULATIVE}
        return {name: sum(1 for lr in self.candidates if (name, lr_key(lr)) not in trained
                          and self.avoid.pruned_by(lr, name, self.key))
                for name in self.models}

    def finished_trials(self):
        """(model, lr) -> row of the trials of this key that finished (ok or diverged; halving:
        or stopped at a rung)."""
        return {(r['model'], r['lr']): r for r in self.rows if r['status'] in FINAL}

    # -- the serial order: decisions are applied only as the serial search would reach them
    @staticmethod
    def _key(name, lr, rung=0):
        """A candidate's job key: 'AFNet@0.0025' (halving: 'AFNet@0.0025#r2' from rung 2 on)."""
        return f"{name}@{lr_key(lr)}" + (f"#r{rung + 1}" if rung else '')

    def _skip_reason(self, name, lr, rung=0):
        """Why the serial search, standing at this candidate now, would not train it (None:
        it would train it). Only committed outcomes count: they are the serial prefix."""
        if name in self.done:
            return 'its model is done'
        if (name, lr_key(lr), rung) in self.finished_before:
            return 'finished in an earlier run; skipped'
        # a promoted trial already trained without harm: avoid.txt keeps rates from starting
        hit = self.avoid.pruned_by(lr, name, self.key) if not rung else None
        if hit:
            scope = f"for {hit[1]}" if hit[1] else 'for every model'
            return f"skipped (avoid.txt has {hit[0]!r} {scope}, within 2*STEP)"
        return None

    def _walk(self):
        """Walk the serial order as far as committed outcomes allow: skip what the serial
        search skips, commit a waiting outcome where the serial search would train; stop at
        the first candidate it would train whose outcome has not arrived."""
        while self.pos < len(self.order):
            if isinstance(self.order[self.pos], RungEnd):
                end = self.order[self.pos]
                self.pos += 1
                self._end_rung(end.name, end.rung)
                continue
            name, lr, rung = self.order[self.pos]
            key = self._key(name, lr, rung)
            if name not in self.done and name not in self.announced:
                self.announced.add(name)
                self.log(f"{name}: searching {len(self.candidates)} learning rate(s)" + (
                    f"; successive halving, rungs of {', '.join(map(str, self.budgets))} "
                    f"epochs, the best 1/{self.settings.HALVING_ETA} of each rung go on"
                    if self.halving else ''))
            why = self._skip_reason(name, lr, rung)
            if why is None and key not in self.waiting:
                return                          # the serial search would train it: wait
            self.pos += 1
            if why is None:
                self._commit(self.waiting.pop(key))
                continue
            if key not in self.dispatched:   # a dispatched one ends as cancelled or speculative
                self.skipped += 1
                self.notify(PlanChanged(skipped=self.skipped))
            if why != 'its model is done':
                self.log(f"  {name} lr={lr_key(lr)}" + (f" rung {rung + 1}" if rung else '')
                         + f": {why}")
            if rung and (name, lr_key(lr), rung) not in self.finished_before:
                # promoted, then ruled out (its model done, a neighbour pruned the rate)
                remove_checkpoint(self._checkpoint(name, lr))
            self._discard(key, why)

    def _discard(self, key, why):
        """The serial search never trains `key`: a waiting outcome becomes a speculative row
        (kept, drives nothing); a running job is cancelled by obsolete()."""
        self.discarded.add(key)
        outcome = self.waiting.pop(key, None)
        if outcome is not None:
            self._record_speculative(outcome, why)

    def _record_speculative(self, outcome, why):
        spec = outcome.job.payload
        result = outcome_result(outcome)
        row = trial_row(result, self.settings, self.key, model=spec.key.split('@')[0],
                        lr=lr_key(spec.lr), pruned=False,
                        **self._rung_fields(spec.key.split('@')[0], self._rung_of(spec)))
        row.update(status=TrialStatus.SPECULATIVE,
                   error=f"ran ahead of the serial order; not used: {why}")
        self.table.append(row)
        remove_checkpoint(spec.checkpoint)
        self.speculative.discarded(result)

    def speculative_note(self):
        """One line on the work done ahead of the serial order and thrown away, or ''."""
        return self.speculative.note('trial', 'ran ahead of the serial order and were not used')

    def next_job(self):
        """The next candidate to start. The serial search's next one first; then those no
        unfinished earlier candidate can prune (farther than 2*STEP from every earlier
        candidate of their model still open; the next model's first rates); then the rest,
        in serial order (they may turn out speculative)."""
        self._walk()
        open_ = []                             # undecided, not yet handed out, in serial order
        for i in range(self.pos, len(self.order)):
            if isinstance(self.order[i], RungEnd):
                continue
            name, lr, rung = self.order[i]
            key = self._key(name, lr, rung)
            if key in self.dispatched or key in self.discarded:
                continue
            if self._skip_reason(name, lr, rung) is not None:
                continue                       # the walk will skip it when it gets there
            open_.append((i, name, lr, key, rung))
        if not open_:
            return None
        reach = 2 * self.settings.STEP * (1 + 1e-9)
        choice = open_[0] if open_[0][0] == self.pos else None
        if choice is None:
            for i, name, lr, key, rung in open_:
                earlier = [e[1] for e in self.order[self.pos:i] if not isinstance(e, RungEnd)
                           and e[0] == name and self._key(*e) not in self.discarded
                           and self._skip_reason(*e) is None]
                if all(abs(lr - e) > reach for e in earlier):
                    choice = (i, name, lr, key, rung)
                    break
        choice = choice or open_[0]
        _, name, lr, key, rung = choice
        self.dispatched[key] = time.time()
        data = self.data
        budget = self.rung_budget.get((name, rung), self.budgets[0]) if self.halving else 0
        spec = TrialSpec(key=key, lr=lr, settings=self.settings,
                         build=functools.partial(_build, self.models[name], data.input_size,
                                                 data.in_channels, data.num_classes),
                         trainer=self.trainer, progress=self.progress,
                         refit_above=self.best_score(name), report_to=self.report_to,
                         checkpoint=self._checkpoint(name, lr), budget=budget)
        return Job(key=spec.key, fn=run_trial_job, payload=spec)

    def _checkpoint(self, name, lr):
        # one file per trial through all its rungs: a promoted trial goes on from it
        return checkpoint_path(self.settings.TEMP_DIR, self.checkpoints, self._key(name, lr))

    @staticmethod
    def _rung_of(spec):
        return int(spec.key.rsplit('#r', 1)[1]) - 1 if '#r' in spec.key else 0

    def obsolete(self, job):
        name, lr = job.payload.key.split('@')[0], job.payload.lr
        rung = self._rung_of(job.payload)
        if job.key in self.discarded or self._skip_reason(name, lr, rung) is not None:
            self.discarded.add(job.key)
            self.speculative.cancel(self.dispatched.get(job.key, time.time()))
            remove_checkpoint(job.payload.checkpoint)      # never trained on: never resumed
            return True
        return False

    def best_score(self, name):
        """The best score recorded for a model under this key (0 before any): REFIT retrains
        only a trial that reaches it, as only such a trial can become the best folder."""
        scores = [float(r['score']) for r in self.rows
                  if r['model'] == name and r['status'] == TrialStatus.OK and r['score'] != '']
        return max(scores, default=0.0)

    def record(self, outcome):
        """A finished job: held until the walk of the serial order reaches it."""
        if outcome.job.key in self.discarded:
            self._record_speculative(outcome, 'the serial search skips it')
        else:
            self.waiting[outcome.job.key] = outcome
        self._walk()

    def _commit(self, outcome):
        """Apply a finished trial as the serial search would at this point of its order."""
        spec = outcome.job.payload
        name, lr = spec.key.split('@')[0], spec.lr
        rung = self._rung_of(spec)
        result = outcome_result(outcome)
        settings = self.settings
        score = self.score(result)
        if (result.status == TrialStatus.OK and result.stop_reason == STOP_BUDGET
                and percent(score) < settings.STAGE1_TARGET):
            # halving: it may go on. Not pruned, even below AVOID_PARAM: a rate judged after a
            # few epochs is not a bad rate (bench/README.md, "Halving vs grid")
            self._wait_for_rung(name, lr, rung, result)
            return
        drop_unneeded_refit(result, settings, self.best_score(name))
        pruned = result.status == TrialStatus.DIVERGED or (
            result.status == TrialStatus.OK and score < settings.AVOID_PARAM)
        row = trial_row(result, settings, self.key, model=name, lr=lr_key(lr), pruned=pruned,
                        **self._rung_fields(name, rung))
        if result.status == TrialStatus.OK:
            self._store(name, lr, result)          # artifacts first: the row may rebuild from them
        self.table.append(row)                     # the commit point
        remove_checkpoint(spec.checkpoint)
        self.rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        if pruned:
            why = ('diverged' if result.status == TrialStatus.DIVERGED else
                   f"{settings.SELECT_METRIC} on {settings.SELECT_ON} {score:.3f} < AVOID_PARAM {settings.AVOID_PARAM}")
            self.avoid.add(lr, name, why, self.key)
        model_dir = os.path.join(self.root, name)
        if result.status == TrialStatus.FAILED:
            _write_error(model_dir, name, lr, result)
            self.log(f"  {name} lr={lr_key(lr)}: FAILED ({row['error']}); traceback in "
                     f"{os.path.join(model_dir, 'error.txt')}; going on")
            if result.epochs == 0 and outcome.ok:   # did not build or run: other rates won't either
                self.done.add(name)
        else:
            self.log(f"  {self._trial_words(name, lr, rung)}: {result.status}, "
                     f"{result.stop_reason} after "
                     f"{result.epochs} epoch(s), {settings.SELECT_ON} {row['xx']}-{row['yy']}"
                     f"{' (pruned)' if pruned else ''}, "
                     f"{kb2(result.onnx_bytes) if result.onnx_bytes else '-'} KB, "
                     f"{result.wall_s:.1f} s" + self._where(name, rung, result))
            self.reconcile(name)
        if result.status == TrialStatus.OK and percent(score) >= settings.STAGE1_TARGET \
                and name not in self.done:
            self.log(f"  {name}: {settings.SELECT_METRIC} {percent(score)} >= STAGE1_TARGET="
                     f"{settings.STAGE1_TARGET}; next model")
            self.done.add(name)
        self.write_summary()

    # -- successive halving (SCHEDULER='halving')
    def _rung_fields(self, name, rung):
        """The row's rung columns: blank in a grid search."""
        if not self.halving:
            return {'rung': '', 'rung_epochs': ''}
        return {'rung': rung + 1, 'rung_epochs': self.rung_budget.get((name, rung), self.budgets[0])}

    def _trial_words(self, name, lr, rung):
        return f"{name} lr={lr_key(lr)}" + (f" rung {rung + 1}" if self.halving else '')

    def _where(self, name, rung, result):
        """The end of a trial's log line: its node on a cluster; where a checkpoint resumed it
        (a promoted trial going on from its last rung's epochs is not a resume)."""
        went_on = self.rung_budget.get((name, rung - 1), self.budgets[0]) if rung else 0
        return ((f" on node {result.node}" if self.on_cluster else '')
                + (f" (resumed at epoch {result.resumed_at})"
                   if result.resumed_at and result.resumed_at != went_on else ''))

    def _wait_for_rung(self, name, lr, rung, result):
        """A trial that trained its rung's epochs: recorded 'stopped' now (its row, so that a
        rerun never trains it again nor judges it against later avoid.txt lines), 'promoted'
        at the rung's end if it is among the best; its checkpoint is kept till then."""
        row = trial_row(result, self.settings, self.key, model=name, lr=lr_key(lr), pruned=False,
                        **self._rung_fields(name, rung))
        row['status'] = TrialStatus.STOPPED
        self.table.append(row)
        self.rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        self.log(f"  {self._trial_words(name, lr, rung)}: {result.epochs} epoch(s), "
                 f"{self.settings.SELECT_ON} {row['xx']}-{row['yy']}, {result.wall_s:.1f} s"
                 f"{self._where(name, rung, result)}; waits for the end of its rung")
        self.write_summary()

    def _end_rung(self, name, rung):
        """Every candidate of the rung is committed: the best ceil(n/eta) of the n trained
        (by score, then yy, xx, the smaller rate) that can go on are promoted and continue
        from their checkpoints; the others stay 'stopped'. Decided from the rows alone, so a
        resumed or parallel search decides the same."""
        settings = self.settings
        trained = [r for r in self.rows if r['model'] == name and r.get('rung') not in ('', None)
                   and row_rung(r) == rung and r['status'] != TrialStatus.SPECULATIVE]
        able = [r for r in trained if r['status'] in (TrialStatus.STOPPED, TrialStatus.PROMOTED)]
        promoted = {r['lr'] for r in promotions([] if name in self.done else able, len(trained),
                                                settings.HALVING_ETA, lambda r: -float(r['lr']))}
        self.table.set_status(lambda r: (r['settings_key'] == self.key and r['model'] == name
                                         and r.get('rung') not in ('', None) and row_rung(r) == rung
                                         and r['lr'] in promoted), TrialStatus.PROMOTED)
        self.rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        stopped = sorted((r['lr'] for r in able if r['lr'] not in promoted), key=float)
        for k in stopped:
            remove_checkpoint(self._checkpoint(name, float(k)))
        if not promoted:
            if stopped:
                self.log(f"  {name} rung {rung + 1}: {len(stopped)} stopped ({', '.join(stopped)})"
                         f"; the model's search has ended")
            self.write_summary()
            return
        budget, last = next_rung(self.budgets, rung, promoted, settings.NUM_EPOCHS)
        self.rung_budget[(name, rung + 1)] = budget
        entries = [(name, lr, rung + 1) for lr in self.candidates if lr_key(lr) in promoted]
        if not last:
            entries.append(RungEnd(rung + 1, name))
        self.order[self.pos:self.pos] = entries
        self.notify(PlanChanged(planned=self.planned()))
        self.log(f"  {name} rung {rung + 1} done ({len(trained)} trained): "
                 f"{', '.join(sorted(promoted, key=float))} go on to {budget} epochs"
                 + (f"; stopped: {', '.join(stopped)}" if stopped else ''))
        self.write_summary()

    def score(self, result):
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
        ok = [r for r in self.rows if r['model'] == name and r['status'] == TrialStatus.OK]
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
            rows = {r['lr'] for r in self.rows
                    if r['model'] == name and r['status'] != TrialStatus.SPECULATIVE}
            for entry in os.listdir(store):
                if entry not in rows:
                    shutil.rmtree(os.path.join(store, entry), ignore_errors=True)
                    durable('removed orphan store entry')

    def write_summary(self):
        summary = summarize(self.settings, self.rows, list(self.models), self.avoid_skipped())
        write_atomic(os.path.join(self.root, SUMMARY_CSV), summary.to_csv(index=False))
        return summary


def _write_error(model_dir, name, lr, result):
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, 'error.txt'), 'a') as f:
        f.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {name} lr={lr_key(lr)}\n{result.error}\n")


def run_stage_one(settings, data, models, interrupts, log=print, progress=True, executor=None,
                  trainer=None, on_record=None, on_event=None):
    """The stage-one search over `models` (classes); returns the summary DataFrame.
    `executor` defaults to the in-process serial one; `on_record()` runs after each trial.
    Live progress (public/search/progress.py) is drawn when stdout is a terminal; every
    progress event also goes to `on_event(event)` when given (tests)."""
    if not settings.RESUME:
        archive_results(settings, log)
    os.makedirs(settings.MODEL_SAVE_PATH, exist_ok=True)
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    attach_teacher(settings, data, log)
    stage = run_stage(lambda log, progress: StageOne(settings, data, models, log, progress, trainer),
                      data, interrupts, executor, on_record, on_event, 'stage 1', log, progress)
    return stage.write_summary()


def _kb(row):
    # KB with two decimals, as evaluation_metrics.txt (the row's onnx_kb is rounded up)
    return round(int(row['onnx_bytes']) / 1024, 2) if row.get('onnx_bytes') not in (None, '') \
        else float(row['onnx_kb'])


def scores_note(settings):
    """The one line that explains the scores' words, said at the start of each stage."""
    return (f"Scores: xx-yy = 100 \u00d7 (best, worst) of F1/accuracy/precision/recall on "
            f"{settings.SELECT_ON}; min4 = the worst (SELECT_METRIC={settings.SELECT_METRIC} "
            f"decides)")


def next_step_lines(pick, settings):
    """How stage one leads into stage two: the pick, what to put in public/ss_model.py and
    the command to run."""
    if pick is None:
        return ["No model trained successfully: nothing to recommend for stage two."]
    lr = pick['lr']
    command = 'python train_final.py' + (
        '' if abs(float(lr) - float(settings.LEARNING_RATE)) <= 1e-12 else f" LEARNING_RATE={lr}")
    kb = f", {pick['onnx_kb']:.2f} KB" if pick['onnx_kb'] is not None else ''
    if pick['model'] == 'AFNet':
        where = "public/ss_model.py already scales AFNet (class AFNet): keep it"
    elif 'AFNet' in pick['model']:
        where = (f"make public/ss_model.py's AFNet class build {pick['model']} (its AFNet "
                 f"scaling fits AFNet-like models; docs/stage-two.md for the details)")
    else:
        where = (f"put {pick['model']} in public/ss_model.py (its AFNet scaling fits AFNet-like "
                 f"models; docs/stage-two.md shows how to scale another class)")
    return [f"Recommended: {pick['model']} at learning rate {lr} ({settings.SELECT_ON} {pick['result']}{kb}; "
            f"the best score over models, ties to the smaller ONNX).",
            f"Next step: {where}; then run:  {command}"]


def contest_summary(row):
    """The summary's contest figures of a results row: val_/test_ fbeta, subj_fbeta and gen,
    4 decimals ('' for a multi-class task, or a row of an ATML without them)."""
    out = {}
    for split in ('val', 'test'):
        for m in ('fbeta', 'subj_fbeta', 'gen'):
            value = row.get(f"{split}_{m}", '')
            out[f"{split}_{m}"] = '' if value in ('', None) else round(float(value), 4)
    return out


def graph_summary(row):
    """The summary's deployment figures: MACs and the peak activation bytes (float, INT8)."""
    return {k: row.get(k, '') for k in ('macs', 'peak_act_bytes', 'peak_act_int8_bytes')}


def summarize(settings, rows, model_names, skipped=None):
    """One row per model: its best trial (best_rank: score, then yy, then xx) with metrics,
    size and speed; `rows` are the current settings' rows of results.csv. `skipped`: {model:
    rates avoid.txt kept from training} ('pruned' counts trained trials scoring below
    AVOID_PARAM, or diverged)."""
    skipped = skipped or {}
    out = []
    for name in model_names:
        mine = [r for r in rows if r['model'] == name and r['status'] != TrialStatus.SPECULATIVE]
        ok = [r for r in mine if r['status'] == TrialStatus.OK]
        # a promoted row's trial goes on in a later row: counted there
        entry = {'model': name, 'trials': sum(r['status'] != TrialStatus.PROMOTED for r in mine), 'skipped': skipped.get(name, 0),
                 'pruned': sum(r['pruned'] == 'True' for r in mine),
                 'failed': sum(r['status'] == TrialStatus.FAILED for r in mine)}
        if ok:
            best = max(ok, key=best_rank)     # max keeps the first of equals
            entry.update(best_lr=best['lr'], result=f"{best['xx']}-{best['yy']}",
                         score=round(float(best['score']), 4),
                         **{f"val_{m}": round(float(best[f'val_{m}']), 4) for m in METRIC_NAMES},
                         **({f"test_{m}": round(float(best[f'test_{m}']), 4) for m in METRIC_NAMES}
                            if best['test_f1'] != '' else {}),
                         **contest_summary(best),
                         onnx_kb=_kb(best), latency_ms=round(float(best['latency_ms']), 3),
                         params=int(best['params']), **graph_summary(best),
                         folder=os.path.join(settings.MODEL_SAVE_PATH, name, f"{best['xx']}-{best['yy']}"))
        entry['wall_s'] = round(sum(float(r['wall_s']) for r in mine), 1)
        # halving: trials stopped at a rung, and the epochs trained in all (a trial's last
        # row holds its epochs through every rung)
        entry['stopped'] = sum(r['status'] == TrialStatus.STOPPED for r in mine)
        last = {}
        for r in mine:
            last[r['lr']] = max(last.get(r['lr'], 0), int(r['epochs'] or 0))
        entry['epochs_trained'] = sum(last.values())
        out.append(entry)
    return pd.DataFrame(out)
