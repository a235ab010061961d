"""Stage two: scale the chosen architecture's widths until metric and size targets both meet.

    plan = plan_candidates(settings, input_size, in_channels)   # exact ONNX sizes, untrained
    run_stage_two(settings, data, interrupts)

A model's ONNX size depends only on its architecture, so each candidate (channel factor,
FC factor) is exported untrained to learn its exact size before any training. Candidates
over SIZE_TARGET_KB are recorded as 'over-size' and never trained; the others are trained
smallest first with the stage-one trial procedure, so the first that meets METRIC_TARGET is
the smallest model that meets both. Every candidate's files live in temp/c<C>-f<F>/; the
winner is copied atomically to <FINAL_RESULT_DIR>/<xx>-<yy>/.

SCHEDULER='halving': successive halving over the feasible candidates, smallest first in every
rung: all train HALVING_MIN_EPOCHS epochs; at a rung's end the best ceil(n/eta) of the n
trained (by score; ties to the smaller) that can go on continue from their checkpoints, the
others are recorded 'stopped'. A candidate whose rung result meets both targets is final at
once; the answer is still the smallest candidate that meets both, decided when every smaller
one is final (stopped counts as not meeting), and nothing larger than a meeting candidate is
trained or promoted.
"""
import functools
import hashlib
import inspect
import os
import shutil
import time
from dataclasses import dataclass

import torch

from public.compress.channel_prune import prune_model
from public.compress import export
from public.compress.export import export_onnx, like_trained, size_kb
from public.compress.graph_stats import graph_stats
from public.compress.qat import check_quantizable
from public.compress.quantize import quantize_int8
from public.core.atomic import atml_made, replace_folder
from public.core.errors import SettingsError, disk_full_cause
from public.data.prepare import calibration_sample
from public.results.files import kb2, read_info, write_info, write_result_files
from public.results.keys import best_rank, graph_columns, settings_key, trial_row
from public.results.store import clean_scratch, recover_folders
from public.results.table import STAGE2_COLUMNS, ResultsTable
from public.search.dispatch import SpeculativeWork, run_stage
from public.search.progress import PlanChanged
from public.search.teacher import attach_teacher
from public.search.stage_one import (SUMMARY_CSV, RungEnd, next_rung, promotions,
                                     read_summary, recommended_pick, row_rung, rung_budgets,
                                     scores_note)
from public.train.loop import STOP_BUDGET
from public.search.executor import Job
from public.search.trial import TrialSpec, drop_unneeded_refit, outcome_result, run_trial_job
from public.search.trial import checkpoint_path, clean_checkpoints, remove_checkpoint
from public.train.metrics import score_digits, selection_score
from public.train.outcome import TrialStatus
from public.train.recipe import add_normalization

STAGE2_CSV = 'stage2_results.csv'


@dataclass
class Candidate:
    channel_scale: int
    fc_scale: int
    config: dict
    predicted_bytes: int
    prune: float = 0.0        # PRUNE_FRACTIONS: this fraction of channels removed after training
    latency_ms: float = None  # the probe's onnxruntime latency (measured when a target or
                              # CANDIDATE_ORDER='fastest' needs it; weights do not change it)
    peak_act_bytes: int = None    # the probe graph's peak activation memory (INT8 figure
                                  # with QUANTIZE_INT8): what RAM_TARGET_KB is checked on

    @property
    def name(self):
        base = f"c{self.channel_scale}-f{self.fc_scale}"
        return f"{base}-p{round(100 * self.prune)}" if self.prune else base


class SizeBudget:
    """The feasibility question: does an ONNX file of this many bytes fit SIZE_TARGET_KB?"""

    def __init__(self, size_target_kb):
        self.limit_bytes = int(size_target_kb * 1024)

    def fits(self, size_bytes):
        return size_bytes <= self.limit_bytes


# Borderline latencies are measured again: a probe within this fraction of LATENCY_TARGET_MS
# is re-measured LATENCY_REPEATS - 1 more times and decided on the median of the medians
# (on this 2-core machine one median of 200 runs varies by up to ~±10 % between repeats;
# docs/contest-scoring.md).
LATENCY_BORDER = 0.15
LATENCY_REPEATS = 5


class DeployBudget:
    """The feasibility question of a candidate before training: which target (size, latency,
    peak activation memory) does it miss? verdict() answers None (feasible) or the status
    it is recorded with (over-size, over-latency, over-ram)."""

    def __init__(self, settings):
        self.size = SizeBudget(settings.SIZE_TARGET_KB)
        self.latency_ms = settings.LATENCY_TARGET_MS
        self.ram_bytes = int(settings.RAM_TARGET_KB * 1024)

    def verdict(self, candidate):
        if not self.size.fits(candidate.predicted_bytes):
            return TrialStatus.OVER_SIZE
        if self.latency_ms and candidate.latency_ms is not None \
                and candidate.latency_ms > self.latency_ms:
            return TrialStatus.OVER_LATENCY
        if self.ram_bytes and candidate.peak_act_bytes is not None \
                and candidate.peak_act_bytes > self.ram_bytes:
            return TrialStatus.OVER_RAM
        return None


def probe_latency_ms(path, settings):
    """The latency that LATENCY_TARGET_MS is checked on: the median of LATENCY_RUNS runs,
    and for a borderline figure (within LATENCY_BORDER of the target) the median of
    LATENCY_REPEATS such medians, so timer noise cannot flip the verdict."""
    first = export.onnx_latency_ms(path, settings.LATENCY_RUNS)
    target = settings.LATENCY_TARGET_MS
    if not target or abs(first - target) > LATENCY_BORDER * target:
        return first
    more = [export.onnx_latency_ms(path, settings.LATENCY_RUNS)
            for _ in range(LATENCY_REPEATS - 1)]
    return float(sorted([first] + more)[LATENCY_REPEATS // 2])


def _ss_model():
    import public.ss_model as ss_model      # the user-edited file: read at run time, on purpose
    for attr in ('generate_config', 'AFNet'):
        if not hasattr(ss_model, attr):
            raise SettingsError(f"public/ss_model.py must define {attr}; see its docstring")
    return ss_model


def build_candidate_model(ss_model, config):
    return ss_model.AFNet(config)


def build_from_config(config):
    """A fresh stage-two model (picklable as functools.partial, for workers)."""
    return build_candidate_model(_ss_model(), config)


def plan_candidates(settings, input_size, in_channels, num_classes=2, probe_dir=None,
                    calibration_x=None):
    """Every (channel, fc) pair with its exact ONNX size, smallest first.

    A config that does not build or run is a misconfiguration of public/ss_model.py: it
    raises SettingsError naming the factors and the cause, before any training."""
    ss_model = _ss_model()
    probe_dir = probe_dir or settings.TEMP_DIR
    os.makedirs(probe_dir, exist_ok=True)
    probe = os.path.join(probe_dir, 'size-probe.onnx')
    candidates = []
    for c in settings.CHANNEL_SCALES:
        for f in settings.FC_SCALES:
            try:
                config = ss_model.generate_config(c, f, input_size, in_channels=in_channels,
                                                  num_classes=num_classes)
                model = build_candidate_model(ss_model, config)
                if settings.NORMALIZE == 'segment':      # part of the exported graph
                    add_normalization(model)
                model.eval()
                with torch.no_grad():
                    out = model(torch.zeros(2, in_channels, input_size, 1))
                if tuple(out.shape) != (2, num_classes):
                    raise ValueError(f"output shape {tuple(out.shape)}, expected (2, {num_classes})")
                size, latency, peak = _probe_size(model, probe, settings, in_channels,
                                                  input_size, calibration_x)
            except SettingsError:
                raise
            except Exception as exc:
                if disk_full_cause(exc) is not None:
                    raise                    # a full TEMP_DIR, not a fault of ss_model.py
                raise SettingsError(
                    f"public/ss_model.py: generate_config({c}, {f}, input_size={input_size}) "
                    f"does not give a model that builds and runs on input "
                    f"(N, {in_channels}, {input_size}, 1): {type(exc).__name__}: {exc}") from exc
            candidates.append(Candidate(c, f, config, size, latency_ms=latency,
                                        peak_act_bytes=peak))
            for fraction in settings.PRUNE_FRACTIONS:
                # Which channels go depends on the trained weights; how many does not, so
                # the pruned probe's file has the pruned model's exact size.
                pruned = prune_model(like_trained(model), fraction,
                                     torch.zeros(2, in_channels, input_size, 1)).eval()
                size, latency, peak = _probe_size(pruned, probe, settings, in_channels,
                                                  input_size, calibration_x)
                candidates.append(Candidate(c, f, config, size, prune=fraction,
                                            latency_ms=latency, peak_act_bytes=peak))
    if os.path.exists(probe):
        os.remove(probe)
    if settings.CANDIDATE_ORDER == 'fastest':
        return sorted(candidates, key=lambda k: (k.latency_ms, k.predicted_bytes,
                                                 k.channel_scale, k.fc_scale, k.prune))
    return sorted(candidates, key=lambda k: (k.predicted_bytes, k.channel_scale, k.fc_scale,
                                             k.prune))


def _probe_size(model, probe, settings, in_channels, input_size, calibration_x):
    """(size, latency, peak activation bytes) of `model` once trained, known before training:
    the exact ONNX size (the INT8 size when QUANTIZE_INT8), the probe file's latency (the INT8
    file's when quantizing; None unless LATENCY_TARGET_MS or CANDIDATE_ORDER='fastest' asks)
    and graph_stats' peak activation memory (its INT8 figure when quantizing)."""
    size = export_onnx(like_trained(model), probe, in_channels, input_size, settings.ONNX_OPSET)
    stats = graph_stats(probe)
    peak = stats['peak_activation_bytes']
    timed = probe
    if settings.QUANTIZE_INT8:
        # INT8 files vary by a few bytes with the weights: a prediction, re-checked on the
        # trained model.
        size = quantize_int8(probe, probe + '.int8', calibration_x,
                             reduce_range=settings.INT8_REDUCE_RANGE)
        peak, timed = stats['peak_activation_bytes_int8'], probe + '.int8'
    latency = None
    if settings.LATENCY_TARGET_MS or settings.CANDIDATE_ORDER == 'fastest':
        latency = probe_latency_ms(timed, settings)
    if settings.QUANTIZE_INT8:
        os.remove(probe + '.int8')
    return size, latency, peak


def stage_two_key(settings):
    """Stage one's trial settings, LEARNING_RATE, QUANTIZE_INT8 and public/ss_model.py itself."""
    import public.ss_model as ss_model      # the user-edited file: read at run time, on purpose
    return settings_key(settings, stage=2, extra={
        'ss_model': hashlib.sha1(inspect.getsource(ss_model).encode()).hexdigest()})


def _deliverable_fits(row, budget, settings):
    """Whether the file that would be delivered (INT8 when quantizing) fits the budget now."""
    size = row.get('int8_bytes') if settings.QUANTIZE_INT8 else row.get('onnx_bytes')
    return bool(size) and budget.fits(int(size))


def _meets_metric(row, settings):
    return (row['status'] == TrialStatus.OK and row['score'] != ''
            and 100 * float(row['score']) >= settings.METRIC_TARGET - 1e-9)


def _row(candidate, settings, key, result=None, status=None, **rung):
    fields = dict(candidate=candidate.name, channel_scale=candidate.channel_scale,
                  fc_scale=candidate.fc_scale, prune_fraction=candidate.prune or '',
                  predicted_bytes=candidate.predicted_bytes,
                  lr=repr(settings.LEARNING_RATE), meets_metric=False)
    fields.update(probe_latency_ms='' if candidate.latency_ms is None else candidate.latency_ms,
                  probe_peak_act_bytes='' if candidate.peak_act_bytes is None
                  else candidate.peak_act_bytes)
    if result is None:
        return dict(fields, status=status, seed=settings.SEED, settings_key=key,
                    select_on=settings.SELECT_ON, select_metric=settings.SELECT_METRIC)
    row = trial_row(result, settings, key, **fields, **rung)
    if result.int8:
        # With QUANTIZE_INT8 the INT8 model is the deliverable: its metrics and size decide.
        xx, yy = score_digits(result.int8[settings.SELECT_ON])
        row.update(xx=xx, yy=yy, int8_bytes=result.int8['bytes'],
                   onnx_kb=size_kb(result.int8['bytes']),
                   score=selection_score(result.int8[settings.SELECT_ON], settings.SELECT_METRIC),
                   int8_metrics={'val': result.int8['val'], 'test': result.int8['test'],
                                 'method': result.int8.get('method', 'ptq'),
                                 **({'ptq': {s: result.int8['ptq'][s] for s in ('val', 'test')}}
                                    if result.int8.get('ptq') else {})})
        if result.int8.get('graph'):
            row.update(graph_columns(result.int8['graph']))
    return row


class StageTwo:
    """Stage two's decisions: a dispatch.Stage (next_job, record, obsolete).

    Candidates are dispatched smallest first. The answer is the smallest candidate that
    meets both targets: it is decided only once every smaller candidate has a recorded
    outcome, so a larger one finishing first never wins while a smaller one still runs.
    Once it is decided, queued and running larger candidates are cancelled."""

    def __init__(self, settings, data, log=print, progress=True, trainer=None):
        self.settings, self.data, self.log = settings, data, log
        self.progress, self.trainer = progress, trainer
        self.budget = SizeBudget(settings.SIZE_TARGET_KB)
        self.deploy = DeployBudget(settings)
        self.table = ResultsTable(os.path.join(settings.TEMP_DIR, STAGE2_CSV), STAGE2_COLUMNS)
        self.key = stage_two_key(settings)
        self.notify = lambda event: None   # progress events of the plan (watch())
        self.report_to = None              # where a trial reports its epochs (TrialSpec)
        self.skipped = 0
        self.on_cluster = False            # name a trial's node only when attached to a cluster
        self.checkpoints = f"s2-{self.key}"    # this key's folder of trial checkpoints

    def start(self):
        settings, log = self.settings, self.log
        lost = self.table.quarantine()
        if lost:
            log(f"warning: {self.table.path}: line(s) {', '.join(map(str, lost))} are not rows "
                f"of this table; moved to {self.table.path}.rejected")
        for folder in (settings.TEMP_DIR, settings.FINAL_RESULT_DIR):
            for action in recover_folders(folder):      # a crash mid-write in an earlier run
                log(f"  {folder}: {action}")
        clean_scratch(settings.TEMP_DIR)
        data = self.data
        self.plan = plan_candidates(settings, data.input_size, data.in_channels, data.num_classes,
                                    calibration_x=calibration_sample(data) if settings.QUANTIZE_INT8 else None)
        if settings.QAT_EPOCHS and self.plan:     # a model QAT cannot take stops the run now
            check_quantizable(build_from_config(self.plan[0].config), data.in_channels,
                              data.input_size, settings.ONNX_OPSET)
        self.feasible = [k for k in self.plan if self.deploy.verdict(k) is None]
        self.outcomes = {}          # candidate name -> its row, once recorded (this key)
        self.halving = settings.SCHEDULER == 'halving'
        self.budgets = rung_budgets(settings)
        self.rungs_done = set()     # (candidate, rung) with a row (halving: resumed past them)
        for r in self.table.rows():
            if r['settings_key'] != self.key or r['status'] in (
                    TrialStatus.FAILED, TrialStatus.OVER_SIZE, TrialStatus.OVER_LATENCY,
                    TrialStatus.OVER_RAM, TrialStatus.SPECULATIVE, TrialStatus.NOT_NEEDED):
                continue
            self.rungs_done.add((r['candidate'], row_rung(r)))
            if r['status'] in (TrialStatus.PROMOTED, TrialStatus.STOPPED):
                continue            # a rung's end decides (again) whether it goes on
            if r['status'] == TrialStatus.OK and not os.path.isdir(self._dir(r['candidate'])):
                continue            # its files are gone: train it again
            self.outcomes[r['candidate']] = r
        for line in stage_two_intro(settings):
            log(line)
        over = len(self.plan) - len(self.feasible)
        limits = 'a target' if settings.LATENCY_TARGET_MS or settings.RAM_TARGET_KB else 'size'
        log(f"Stage two plan: {len(self.plan)} candidate(s) at LEARNING_RATE={settings.LEARNING_RATE}"
            f" ({len(self.feasible)} to train (in order), {settings.CANDIDATE_ORDER} first; "
            f"{over} over {limits}); "
            f"targets: {settings.SELECT_METRIC} >= {settings.METRIC_TARGET} %, ONNX <= "
            f"{settings.SIZE_TARGET_KB} KB ({self.budget.limit_bytes} bytes)"
            + (f", latency <= {settings.LATENCY_TARGET_MS} ms" if settings.LATENCY_TARGET_MS else '')
            + (f", peak activations <= {settings.RAM_TARGET_KB} KB" if settings.RAM_TARGET_KB
               else ''))
        for k in self.plan:
            verdict = self.deploy.verdict(k)
            fits = verdict is None
            fate = 'to train (in order)' if fits else {
                TrialStatus.OVER_SIZE: 'over size budget: never trained',
                TrialStatus.OVER_LATENCY: 'over latency target: never trained',
                TrialStatus.OVER_RAM: 'over memory target: never trained'}[verdict]
            measured = ('' if k.latency_ms is None else f", {k.latency_ms:.3f} ms") + (
                '' if k.peak_act_bytes is None else f", act {k.peak_act_bytes / 1024:.2f} KB")
            done = ' (finished earlier: not retrained)' if k.name in self.outcomes and fits else ''
            pruned = f" -{100 * k.prune:.0f} %" if k.prune else ''
            channels = k.config.get('channels', '?')
            channels = ','.join(map(str, channels)) if isinstance(channels, (list, tuple)) else channels
            log(f"  {k.name:>8}  ch {channels} fc {k.config.get('fc_hidden', '?')}{pruned}: "
                f"{k.predicted_bytes} B ({kb2(k.predicted_bytes)} KB){measured}  {fate}{done}")
        if self.outcomes:
            log(f"Resuming from {self.table.path}: {len(self.outcomes)} candidate(s) already recorded")
        recorded = {(r['candidate'], r['status']) for r in self.table.rows()
                    if r['settings_key'] == self.key}
        for k in self.plan:                       # the plan's verdicts, recorded up front
            verdict = self.deploy.verdict(k)
            if verdict is not None and (k.name, verdict) not in recorded:
                self.table.append(_row(k, settings, self.key, status=verdict))
        self.queue = [k for k in self.feasible if k.name not in self.outcomes]
        # halving: the serial order of rung 1, then of the rungs its ends promote to
        self.order = [(k.name, 0) for k in self.feasible] + (
            [RungEnd(0)] if self.halving and len(self.budgets) > 1 else [])
        self.rung_budget = {}         # rung -> the epochs it trains to
        self.discarded = set()
        clean_checkpoints(settings.TEMP_DIR, 's2-', self.checkpoints, list(self.outcomes), log)
        self.pos = 0                  # how far the walk of the serial order has committed
        self.waiting = {}             # name -> Outcome: finished, a smaller one still open
        self.dispatched = {}          # name -> time.time() when it was handed out
        self.speculative = SpeculativeWork()
        for k in self.feasible:
            if self.outcomes.get(k.name, {}).get('status') == TrialStatus.DIVERGED:
                log(f"  {k.name}: diverged in an earlier run; not retrained")
        self.skipped = len(self.plan) - len(self.queue)   # over size, or recorded earlier
        self.notify(PlanChanged(planned=len(self.plan), skipped=self.skipped))

    def watch(self, watch):
        """Report progress to a dispatch.Watch (None: report nothing); before start()."""
        if watch is not None:
            self.notify, self.report_to = watch.event, watch.report_to

    def _dir(self, name):
        return os.path.join(self.settings.TEMP_DIR, name)

    def _meets(self, row):
        return _meets_metric(row, self.settings) and _deliverable_fits(row, self.budget, self.settings)

    def winner(self):
        """(decided, row of the smallest candidate meeting both targets or None)."""
        for k in self.feasible:
            row = self.outcomes.get(k.name)
            if row is None:
                return False, None          # a smaller candidate has no outcome yet
            if self._meets(row):
                return True, row
        return True, None

    def _index(self, name):
        return next(i for i, k in enumerate(self.feasible) if k.name == name)

    def _first_meeting(self):
        """The index of the decided answer (every smaller candidate committed), or None."""
        decided, row = self.winner()
        return self._index(row['candidate']) if row is not None else None

    def _bound(self):
        """The smallest index whose outcome (committed or waiting) meets both targets: the
        serial answer is this candidate or a smaller one, so larger ones are never needed."""
        meeting = [self._index(n) for n, r in self.outcomes.items() if self._meets(r)]
        for key, outcome in self.waiting.items():
            name = key.split('#')[0]
            result = outcome_result(outcome)
            if result.status == TrialStatus.OK:
                row = _row(self.feasible[self._index(name)], self.settings, self.key, result)
                if self._meets({k: str(v) for k, v in row.items()}):
                    meeting.append(self._index(name))
        return min(meeting, default=None)

    def _beyond(self, name):
        bound = self._bound()
        return bound is not None and self._index(name.split('#')[0]) > bound

    # -- the serial order: outcomes are committed smallest first, as the serial search would
    def _walk(self):
        """Commit waiting outcomes in the order of `feasible` until one is missing, or the
        answer is decided (a committed candidate meets both targets): larger candidates
        are then never reached by the serial search, and waiting ones become speculative."""
        if self.halving:
            return self._walk_rungs()
        while self.pos < len(self.feasible) and self._first_meeting() is None:
            name = self.feasible[self.pos].name
            if name in self.outcomes:           # committed (this run or an earlier one)
                self.pos += 1
            elif name in self.waiting:
                self._commit(self.waiting.pop(name))
                self.pos += 1
            else:
                return
        if self._first_meeting() is not None:
            for name in list(self.waiting):
                self._record_speculative(self.waiting.pop(name))

    def next_job(self):
        self._walk()
        if self.halving:
            return self._next_rung_job()
        while self.queue:
            k = self.queue.pop(0)
            if self._beyond(k.name):
                self.skipped += 1 + len(self.queue)
                self.notify(PlanChanged(skipped=self.skipped))
                self.queue = []             # a smaller candidate already meets both targets
                return None
            self.dispatched[k.name] = time.time()
            spec = TrialSpec(key=k.name, lr=self.settings.LEARNING_RATE, settings=self.settings,
                             build=functools.partial(build_from_config, k.config),
                             quantize=self.settings.QUANTIZE_INT8, trainer=self.trainer,
                             progress=self.progress, prune=k.prune,
                             refit_above=self._refit_above(), report_to=self.report_to,
                             checkpoint=checkpoint_path(self.settings.TEMP_DIR, self.checkpoints,
                                                        k.name))
            return Job(key=k.name, fn=run_trial_job, payload=spec)
        return None

    def _refit_above(self):
        # REFIT only a candidate that could be delivered: one meeting METRIC_TARGET, or the
        # best so far (the fallback publishes the best under the size cap).
        scores = [float(r['score']) for r in self.outcomes.values()
                  if r['status'] == TrialStatus.OK and r['score'] != '']
        return min(max(scores, default=0.0), self.settings.METRIC_TARGET / 100)

    def obsolete(self, job):
        if self._beyond(job.key) or job.key in self.discarded:
            self.speculative.cancel(self.dispatched.get(job.key, time.time()))
            remove_checkpoint(job.payload.checkpoint)      # never trained on: never resumed
            return True
        return False

    def record(self, outcome):
        """A finished job: held until every smaller candidate is committed."""
        if self._beyond(outcome.job.key) or outcome.job.key in self.discarded:
            self._record_speculative(outcome)
        else:
            self.waiting[outcome.job.key] = outcome
        self._walk()

    def _record_speculative(self, outcome):
        k = self.feasible[self._index(outcome.job.key.split('#')[0])]
        result = outcome_result(outcome)
        row = _row(k, self.settings, self.key, result, **self._rung_fields(_rung_of(outcome.job.key)))
        row.update(status=TrialStatus.SPECULATIVE, meets_metric=False,
                   error="ran ahead of the serial order; not used: a smaller candidate meets "
                         "both targets")
        self.table.append(row)
        remove_checkpoint(outcome.job.payload.checkpoint)
        self.speculative.discarded(result)

    def speculative_note(self):
        """One line on the work done ahead of the serial order and thrown away, or ''."""
        return self.speculative.note('candidate', 'trained ahead of the serial order and not used')

    def _commit(self, outcome):
        settings = self.settings
        k = self.feasible[self._index(outcome.job.key.split('#')[0])]
        rung = _rung_of(outcome.job.key)
        result = outcome_result(outcome)
        drop_unneeded_refit(result, settings, self._refit_above())   # the serial bar is higher
        if result.status == TrialStatus.OK and not settings.QUANTIZE_INT8 and result.onnx_bytes != k.predicted_bytes:
            self.log(f"  warning: {k.name}: trained ONNX is {result.onnx_bytes} bytes, predicted "
                     f"{k.predicted_bytes}")
        row = _row(k, settings, self.key, result, **self._rung_fields(rung))
        row['meets_metric'] = self._meets({k2: str(v) for k2, v in row.items()})
        if (result.status == TrialStatus.OK and result.stop_reason == STOP_BUDGET
                and not row['meets_metric']):
            row['status'] = TrialStatus.STOPPED   # halving: it may go on ('promoted' at its
            self.table.append(row)                # rung's end); its checkpoint is kept
            self.log(f"  {k.name} rung {rung + 1}: {result.epochs} epoch(s), {settings.SELECT_ON} "
                     f"{row.get('xx', '')}-{row.get('yy', '')}, {result.wall_s:.1f} s; waits for "
                     f"the end of its rung")
            return
        if result.status == TrialStatus.OK:
            _save_candidate(settings, k, result, self._dir(k.name), self.key)   # artifacts first
        self.table.append(row)                                                # the commit point
        remove_checkpoint(outcome.job.payload.checkpoint)
        recorded = [r for r in self.table.rows()
                    if r['settings_key'] == self.key and r['candidate'] == k.name]
        self.outcomes[k.name] = recorded[-1]
        size = row.get('int8_bytes') or row.get('onnx_bytes')
        went_on = self.rung_budget.get(rung - 1, self.budgets[0]) if rung else 0
        self.log(f"  {k.name}{f' rung {rung + 1}' if self.halving else ''}: {result.status}, "
                 f"{settings.SELECT_ON} {row.get('xx', '')}-{row.get('yy', '')}, "
                 f"{kb2(size) if size else '-'} KB, {result.wall_s:.1f} s"
                 + (f" ({row['error']})" if result.error else '')
                 + (f" on node {result.node}" if self.on_cluster else '')
                 + (f" (resumed at epoch {result.resumed_at})"
                    if result.resumed_at and result.resumed_at != went_on else ''))

    # -- successive halving (SCHEDULER='halving')
    def _rung_fields(self, rung):
        if not self.halving:
            return {}
        return {'rung': rung + 1, 'rung_epochs': self.rung_budget.get(rung, self.budgets[0])}

    def _open(self, name, rung):
        """Whether the serial search, standing at this entry now, trains it."""
        return (name not in self.outcomes and (name, rung) not in self.rungs_done
                and not self._beyond(name) and _job_key(name, rung) not in self.discarded)

    def _walk_rungs(self):
        """The halving walk: commit waiting outcomes in the serial order of the rungs; at a
        rung's end decide who goes on; stop at the first entry still training."""
        while self.pos < len(self.order):
            entry = self.order[self.pos]
            if isinstance(entry, RungEnd):
                self.pos += 1
                self._end_rung(entry.rung)
                continue
            name, rung = entry
            key = _job_key(name, rung)
            if not self._open(name, rung):
                self.pos += 1
                if key not in self.dispatched and rung and name not in self.outcomes \
                        and (name, rung) not in self.rungs_done:
                    remove_checkpoint(self._checkpoint(name))     # promoted, then not needed
                self.discarded.add(key)
                if key in self.waiting:
                    self._record_speculative(self.waiting.pop(key))
                continue
            if key not in self.waiting:
                return
            self.pos += 1
            self._commit(self.waiting.pop(key))

    def _next_rung_job(self):
        for entry in self.order[self.pos:]:
            if isinstance(entry, RungEnd):
                return None                 # the next rung is not decided yet
            name, rung = entry
            key = _job_key(name, rung)
            if key in self.dispatched or not self._open(name, rung):
                continue
            k = self.feasible[self._index(name)]
            self.dispatched[key] = time.time()
            spec = TrialSpec(key=key, lr=self.settings.LEARNING_RATE, settings=self.settings,
                             build=functools.partial(build_from_config, k.config),
                             quantize=self.settings.QUANTIZE_INT8, trainer=self.trainer,
                             progress=self.progress, prune=k.prune,
                             refit_above=self._refit_above(), report_to=self.report_to,
                             checkpoint=self._checkpoint(name),
                             budget=self.rung_budget.get(rung, self.budgets[0]))
            return Job(key=key, fn=run_trial_job, payload=spec)
        return None

    def _checkpoint(self, name):
        return checkpoint_path(self.settings.TEMP_DIR, self.checkpoints, name)

    def _end_rung(self, rung):
        """Every candidate of the rung is committed: the best ceil(n/eta) of the n trained
        that can go on (and are smaller than any candidate meeting both targets) continue,
        'promoted'; the others stay 'stopped' (final: they count as not meeting). Decided
        from the rows alone, so a resumed or parallel search decides the same."""
        settings = self.settings

        def of_rung(r):
            return (r['settings_key'] == self.key and r.get('rung') not in (None, '')
                    and row_rung(r) == rung)
        trained = [r for r in self.table.rows() if of_rung(r)
                   and r['status'] not in (TrialStatus.SPECULATIVE, TrialStatus.NOT_NEEDED)]
        able = [r for r in trained if r['status'] in (TrialStatus.STOPPED, TrialStatus.PROMOTED)
                and not self._beyond(r['candidate'])]
        promoted = {r['candidate'] for r in promotions(
            able, len(trained), settings.HALVING_ETA, lambda r: -self._index(r['candidate']))}
        self.table.set_status(lambda r: of_rung(r) and r['candidate'] in promoted,
                              TrialStatus.PROMOTED)
        for r in self.table.rows():
            if of_rung(r) and r['status'] == TrialStatus.STOPPED:
                self.outcomes[r['candidate']] = r          # final: counts as not meeting
                remove_checkpoint(self._checkpoint(r['candidate']))
        trained = len(trained)
        stopped = [n for n in (r['candidate'] for r in able) if n not in promoted]
        if not promoted:
            return
        budget, last = next_rung(self.budgets, rung, promoted, settings.NUM_EPOCHS)
        self.rung_budget[rung + 1] = budget
        entries = [(k.name, rung + 1) for k in self.feasible if k.name in promoted]
        if not last:
            entries.append(RungEnd(rung + 1))
        self.order[self.pos:self.pos] = entries
        self.notify(PlanChanged(planned=len(self.plan) + sum(
            1 for e in self.order if not isinstance(e, RungEnd) and e[1])))
        self.log(f"  rung {rung + 1} done ({trained} trained): "
                 f"{', '.join(e[0] for e in entries if not isinstance(e, RungEnd))} go on to {budget} epochs"
                 + (f"; stopped: {', '.join(stopped)}" if stopped else ''))

    def _record_not_needed(self, winner):
        """A row (status not-needed, with its known size) for every feasible candidate larger
        than the answer that was never trained, so the tables and the report's grid account
        for it; such rows are never outcomes (a rerun with another target trains them)."""
        have = {r['candidate'] for r in self.table.rows()     # speculative rows aside: the
                if r['settings_key'] == self.key                  # serial search has none
                and r['status'] != TrialStatus.SPECULATIVE}
        after = self.feasible[self._index(winner['candidate']) + 1:]
        for k in after:
            if k.name not in have:
                self.table.append(_row(k, self.settings, self.key, status=TrialStatus.NOT_NEEDED))

    def finish(self):
        """Publish the answer (or the best under the size cap); (folder or None, met, rows)."""
        settings, log = self.settings, self.log
        rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        decided, winner = self.winner()
        if winner:
            log(f"{winner['candidate']} meets both targets: the smallest such model.")
            self._record_not_needed(winner)
            rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
            return self._publish(winner, True), True, rows
        trained = [r for r in self.outcomes.values() if r['status'] == TrialStatus.OK
                   and _deliverable_fits(r, self.budget, settings)]
        if not trained:
            log("No candidate meets both targets, and none under the size cap trained successfully "
                f"(SIZE_TARGET_KB={settings.SIZE_TARGET_KB}: raise it or lower CHANNEL_SCALES / FC_SCALES).")
            return None, False, rows
        best = max(sorted(trained, key=lambda r: self._index(r['candidate'])), key=best_rank)
        log(miss_sentence(best, settings))
        return self._publish(best, False), False, rows

    def accounting(self):
        """{fate: count} of every planned candidate (the final table's and the plan's words)."""
        return candidate_fates(self.plan, self.table.rows(), self.key, self.budget,
                               self.settings)

    def _publish(self, row, met):
        """Derive <FINAL_RESULT_DIR>/<xx>-<yy>/ from the candidate's folder (atomically); an
        earlier result folder of this same search under another name is stale: removed."""
        settings = self.settings
        name = result_folder_name(row, met)
        source = self._dir(row['candidate'])
        verdict = (f"Verdict: {'meets' if met else 'does NOT meet'} both targets "
                   f"(METRIC_TARGET={settings.METRIC_TARGET}, SIZE_TARGET_KB={settings.SIZE_TARGET_KB})"
                   + ('' if met else f". {miss_sentence(row, settings)}"))

        def build(folder):
            for f in os.listdir(source):
                if f not in ('result.json', 'evaluation_metrics.txt', '.atml-owned'):
                    shutil.copy2(os.path.join(source, f), os.path.join(folder, f))
            write_info(folder, {**read_info(source), 'folder': name, 'verdict': verdict,
                                'stage2_key': self.key})
            if os.path.exists(self.table.path):
                shutil.copy2(self.table.path, os.path.join(folder, STAGE2_CSV))
        final = replace_folder(settings.FINAL_RESULT_DIR, name, build)
        for entry in os.listdir(settings.FINAL_RESULT_DIR):
            path = os.path.join(settings.FINAL_RESULT_DIR, entry)
            if entry != name and atml_made(path) and (read_info(path) or {}).get('stage2_key') == self.key:
                shutil.rmtree(path)
        self.log(f"Result: {final}/")
        return final


def _job_key(name, rung):
    """'c2-f1' (halving: 'c2-f1#r2' from rung 2 on)."""
    return name + (f"#r{rung + 1}" if rung else '')


def _rung_of(key):
    return int(key.rsplit('#r', 1)[1]) - 1 if '#r' in key else 0


def run_stage_two(settings, data, interrupts, log=print, progress=True, trainer=None,
                  executor=None, on_event=None):
    """The stage-two search; returns (result folder or None, met: bool, rows). Live
    progress is drawn when stdout is a terminal; `on_event(event)` gets every progress
    event when given (tests)."""
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    attach_teacher(settings, data, log)
    stage = run_stage(lambda log, progress: StageTwo(settings, data, log, progress, trainer),
                      data, interrupts, executor, on_event=on_event, label='stage 2', log=log,
                      progress=progress, critical_start=True)
    with interrupts.critical():
        folder, met, rows = stage.finish()
    stage.log(fates_line(stage.accounting()))
    return folder, met, rows


MISS = '-MISS'    # a result folder's suffix when its model does not meet both targets

# The fates of stage two's candidates, in the order the final table and the plan count them.
FATES = ('met', 'trained and missed', 'stopped at a rung', 'not needed', 'over size',
         'over latency or memory', 'failed', 'speculative')
_FATE_NOTES = {'not needed': 'a smaller one met first'}


def result_folder_name(row, met):
    """'<xx>-<yy>' (the original's) for a model meeting both targets, else '<xx>-<yy>-MISS'."""
    return f"{row['xx']}-{row['yy']}" + ('' if met else MISS)


def miss_sentence(row, settings):
    """What was closest and by how much, in one sentence."""
    score = 100 * float(row['score'])
    size = row.get('int8_bytes') if settings.QUANTIZE_INT8 else row.get('onnx_bytes')
    kb = f" ({kb2(int(size))} KB)" if size not in (None, '') else ''
    return (f"No candidate met METRIC_TARGET={settings.METRIC_TARGET}: the closest, "
            f"{row['candidate']}{kb}, reached {score:.1f} "
            f"({settings.METRIC_TARGET - score:.1f} points short).")


def candidate_fates(plan, rows, key, budget, settings):
    """{fate: count} over every candidate of the plan (each counted once, by its latest
    row of this key): met, trained and missed, not needed (never trained: a smaller one met
    first), over size, failed (or diverged), speculative (trained ahead, not used)."""
    latest = {r['candidate']: r for r in rows if r.get('settings_key') == key}
    counts = dict.fromkeys(FATES, 0)
    for k in plan:
        row = latest.get(k.name)
        status = row['status'] if row else None
        if not budget.fits(k.predicted_bytes) or status == TrialStatus.OVER_SIZE:
            fate = 'over size'
        elif status in (TrialStatus.OVER_LATENCY, TrialStatus.OVER_RAM):
            fate = 'over latency or memory'
        elif status in (None, TrialStatus.NOT_NEEDED):
            fate = 'not needed'
        elif status == TrialStatus.SPECULATIVE:
            fate = 'speculative'
        elif status in (TrialStatus.STOPPED, TrialStatus.PROMOTED):
            fate = 'stopped at a rung'       # SCHEDULER='halving'
        elif status == TrialStatus.OK:
            met = _meets_metric(row, settings) and _deliverable_fits(row, budget, settings)
            fate = 'met' if met else 'trained and missed'
        else:
            fate = 'failed'
        counts[fate] += 1
    return counts


def fates_line(counts):
    """'Candidates (16): 1 met, 2 trained and missed, 3 not needed (a smaller one met first), ...'."""
    parts = [f"{counts[f]} {f}" + (f" ({_FATE_NOTES[f]})" if f in _FATE_NOTES else '')
             for f in FATES if counts[f] or f != 'stopped at a rung']   # that one: halving only
    return f"Candidates ({sum(counts.values())}): {', '.join(parts)}"


def scaled_architecture():
    """(file, class name, first docstring line or '') of what stage two scales."""
    ss_model = _ss_model()
    doc = (inspect.getdoc(ss_model) or inspect.getdoc(ss_model.AFNet) or '').strip()
    return (os.path.relpath(inspect.getsourcefile(ss_model)), ss_model.AFNet.__name__,
            doc.splitlines()[0] if doc else '')


def stage_two_intro(settings):
    """The lines that open stage two: what it scales, at which rate, to which targets, the
    scores' words, and warnings when it does not follow stage one's pick."""
    path, name, doc = scaled_architecture()
    lines = [f"Stage two scales {name} of {path}" + (f": {doc}" if doc else ''),
             f"  at LEARNING_RATE={settings.LEARNING_RATE}; targets: METRIC_TARGET="
             f"{settings.METRIC_TARGET} ({settings.SELECT_METRIC} on {settings.SELECT_ON}), "
             f"SIZE_TARGET_KB={settings.SIZE_TARGET_KB}", scores_note(settings)]
    summary = os.path.join(settings.MODEL_SAVE_PATH, SUMMARY_CSV)
    pick = recommended_pick(read_summary(summary))
    if pick is None:
        return lines + [f"warning: no stage-one results in {summary}: LEARNING_RATE and "
                        f"{path} are not checked against a stage-one pick (run train_multi.py "
                        f"first, or go on if you chose them yourself)"]
    source = inspect.getsource(_ss_model())
    lines.append(f"Stage one's pick ({summary}): {pick['model']} at learning rate {pick['lr']} "
                 f"({settings.SELECT_ON} {pick['result']})")
    if pick['model'] != name and pick['model'] not in source:
        lines.append(f"warning: stage one's best model is {pick['model']} (lr {pick['lr']}, "
                     f"{pick['result']}), but {path} scales {name}, which does not mention it; "
                     f"see docs/stage-two.md to scale {pick['model']}")
    if abs(float(pick['lr']) - float(settings.LEARNING_RATE)) > 1e-12:
        lines.append(f"warning: LEARNING_RATE={settings.LEARNING_RATE}, but stage one's best "
                     f"model {pick['model']} did best at {pick['lr']} "
                     f"(python train_final.py LEARNING_RATE={pick['lr']})")
    return lines


def _save_candidate(settings, candidate, result, candidate_dir, key):
    def build(folder):
        write_result_files(folder, result=result, name=candidate.name, model_name='ss_model.AFNet',
                           lr=settings.LEARNING_RATE, settings=settings,
                           onnx_bytes=result.onnx_bytes, int8_onnx=result.int8_onnx,
                           info={'channel_scale': candidate.channel_scale,
                                 'fc_scale': candidate.fc_scale, 'config': candidate.config,
                                 **({'prune_fraction': candidate.prune,
                                     'pruned_shapes': {k: list(v.shape) for k, v in
                                                       result.state_dict.items()}}
                                    if candidate.prune else {}),
                                 'int8': result.int8, 'settings_key': key})
    replace_folder(os.path.dirname(candidate_dir), os.path.basename(candidate_dir), build)
