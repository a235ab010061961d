"""Stage two: scale the chosen architecture's widths until metric and size targets both meet.

    plan = plan_candidates(settings, input_size, in_channels)   # exact ONNX sizes, untrained
    run_stage_two(settings, data, interrupts)

A model's ONNX size depends only on its architecture, so each candidate (channel factor,
FC factor) is exported untrained to learn its exact size before any training. Candidates
over SIZE_TARGET_KB are recorded as 'over-size' and never trained; the others are trained
smallest first with the stage-one trial procedure, so the first that meets METRIC_TARGET is
the smallest model that meets both. Every candidate's files live in temp/c<C>-f<F>/; the
winner is copied atomically to <FINAL_RESULT_DIR>/<xx>-<yy>/.
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
from public.compress.export import export_onnx, like_trained, size_kb
from public.compress.qat import check_quantizable
from public.compress.quantize import quantize_int8
from public.core.atomic import atml_made, replace_folder
from public.core.errors import SettingsError, disk_full_cause
from public.data.prepare import calibration_sample
from public.results.files import read_info, write_info, write_result_files
from public.results.keys import best_rank, settings_key, trial_row
from public.results.store import clean_scratch, recover_folders
from public.results.table import STAGE2_COLUMNS, ResultsTable
from public.search.dispatch import SpeculativeWork, dispatch
from public.search.executor import Job
from public.search.trial import TrialSpec, drop_unneeded_refit, outcome_result, run_trial_job
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
                size = _probe_size(model, probe, settings, in_channels, input_size, calibration_x)
            except SettingsError:
                raise
            except Exception as exc:
                if disk_full_cause(exc) is not None:
                    raise                    # a full TEMP_DIR, not a fault of ss_model.py
                raise SettingsError(
                    f"public/ss_model.py: generate_config({c}, {f}, input_size={input_size}) "
                    f"does not give a model that builds and runs on input "
                    f"(N, {in_channels}, {input_size}, 1): {type(exc).__name__}: {exc}") from exc
            candidates.append(Candidate(c, f, config, size))
            for fraction in settings.PRUNE_FRACTIONS:
                # Which channels go depends on the trained weights; how many does not, so
                # the pruned probe's file has the pruned model's exact size.
                pruned = prune_model(like_trained(model), fraction,
                                     torch.zeros(2, in_channels, input_size, 1)).eval()
                size = _probe_size(pruned, probe, settings, in_channels, input_size,
                                   calibration_x)
                candidates.append(Candidate(c, f, config, size, prune=fraction))
    if os.path.exists(probe):
        os.remove(probe)
    return sorted(candidates, key=lambda k: (k.predicted_bytes, k.channel_scale, k.fc_scale,
                                             k.prune))


def _probe_size(model, probe, settings, in_channels, input_size, calibration_x):
    """The exact ONNX size of `model` once trained (the INT8 size when QUANTIZE_INT8)."""
    size = export_onnx(like_trained(model), probe, in_channels, input_size, settings.ONNX_OPSET)
    if settings.QUANTIZE_INT8:
        # INT8 files vary by a few bytes with the weights: a prediction, re-checked on the
        # trained model.
        size = quantize_int8(probe, probe + '.int8', calibration_x,
                             reduce_range=settings.INT8_REDUCE_RANGE)
        os.remove(probe + '.int8')
    return size


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


def _row(candidate, settings, key, result=None, status=None):
    fields = dict(candidate=candidate.name, channel_scale=candidate.channel_scale,
                  fc_scale=candidate.fc_scale, prune_fraction=candidate.prune or '',
                  predicted_bytes=candidate.predicted_bytes,
                  lr=repr(settings.LEARNING_RATE), meets_metric=False)
    if result is None:
        return dict(fields, status=status, seed=settings.SEED, settings_key=key,
                    select_on=settings.SELECT_ON, select_metric=settings.SELECT_METRIC)
    row = trial_row(result, settings, key, **fields)
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
        self.table = ResultsTable(os.path.join(settings.TEMP_DIR, STAGE2_CSV), STAGE2_COLUMNS)
        self.key = stage_two_key(settings)

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
        self.feasible = [k for k in self.plan if self.budget.fits(k.predicted_bytes)]
        self.outcomes = {}          # candidate name -> its row, once recorded (this key)
        for r in self.table.rows():
            if r['settings_key'] != self.key or r['status'] in (TrialStatus.FAILED, TrialStatus.OVER_SIZE,
                                                                 TrialStatus.SPECULATIVE):
                continue
            if r['status'] == TrialStatus.OK and not os.path.isdir(self._dir(r['candidate'])):
                continue            # its files are gone: train it again
            self.outcomes[r['candidate']] = r
        log(f"Stage two plan: {len(self.plan)} candidate(s) at LEARNING_RATE={settings.LEARNING_RATE}; "
            f"targets: min metric >= {settings.METRIC_TARGET} %, ONNX <= {settings.SIZE_TARGET_KB} KB "
            f"({self.budget.limit_bytes} bytes)")
        for k in self.plan:
            fate = 'train' if self.budget.fits(k.predicted_bytes) else 'over size budget: never trained'
            done = ' (finished earlier: not retrained)' if k.name in self.outcomes and fate == 'train' else ''
            pruned = f" pruned {100 * k.prune:.0f} %" if k.prune else ''
            log(f"  {k.name:>8}  channels {k.config.get('channels', '?')}, fc {k.config.get('fc_hidden', '?')}"
                f"{pruned}: {k.predicted_bytes} bytes ({size_kb(k.predicted_bytes)} KB)  {fate}{done}")
        if self.outcomes:
            log(f"Resuming from {self.table.path}: {len(self.outcomes)} candidate(s) already recorded")
        recorded = {r['candidate'] for r in self.table.rows()
                    if r['settings_key'] == self.key and r['status'] == TrialStatus.OVER_SIZE}
        for k in self.plan:                       # the plan's verdicts, recorded up front
            if not self.budget.fits(k.predicted_bytes) and k.name not in recorded:
                self.table.append(_row(k, settings, self.key, status=TrialStatus.OVER_SIZE))
        self.queue = [k for k in self.feasible if k.name not in self.outcomes]
        self.pos = 0                  # how far the walk of the serial order has committed
        self.waiting = {}             # name -> Outcome: finished, a smaller one still open
        self.dispatched = {}          # name -> time.time() when it was handed out
        self.speculative = SpeculativeWork()
        for k in self.feasible:
            if self.outcomes.get(k.name, {}).get('status') == TrialStatus.DIVERGED:
                log(f"  {k.name}: diverged in an earlier run; not retrained")

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
        for name, outcome in self.waiting.items():
            result = outcome_result(outcome)
            if result.status == TrialStatus.OK:
                row = _row(self.feasible[self._index(name)], self.settings, self.key, result)
                if self._meets({k: str(v) for k, v in row.items()}):
                    meeting.append(self._index(name))
        return min(meeting, default=None)

    def _beyond(self, name):
        bound = self._bound()
        return bound is not None and self._index(name) > bound

    # -- the serial order: outcomes are committed smallest first, as the serial search would
    def _walk(self):
        """Commit waiting outcomes in the order of `feasible` until one is missing, or the
        answer is decided (a committed candidate meets both targets): larger candidates
        are then never reached by the serial search, and waiting ones become speculative."""
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
        while self.queue:
            k = self.queue.pop(0)
            if self._beyond(k.name):
                self.queue = []             # a smaller candidate already meets both targets
                return None
            self.dispatched[k.name] = time.time()
            spec = TrialSpec(key=k.name, lr=self.settings.LEARNING_RATE, settings=self.settings,
                             build=functools.partial(build_from_config, k.config),
                             quantize=self.settings.QUANTIZE_INT8, trainer=self.trainer,
                             progress=self.progress, prune=k.prune,
                             refit_above=self._refit_above())
            return Job(key=k.name, fn=run_trial_job, payload=spec)
        return None

    def _refit_above(self):
        # REFIT only a candidate that could be delivered: one meeting METRIC_TARGET, or the
        # best so far (the fallback publishes the best under the size cap).
        scores = [float(r['score']) for r in self.outcomes.values()
                  if r['status'] == TrialStatus.OK and r['score'] != '']
        return min(max(scores, default=0.0), self.settings.METRIC_TARGET / 100)

    def obsolete(self, job):
        if self._beyond(job.key):
            self.speculative.cancel(self.dispatched.get(job.key, time.time()))
            return True
        return False

    def record(self, outcome):
        """A finished job: held until every smaller candidate is committed."""
        if self._beyond(outcome.job.key):
            self._record_speculative(outcome)
        else:
            self.waiting[outcome.job.key] = outcome
        self._walk()

    def _record_speculative(self, outcome):
        k = self.feasible[self._index(outcome.job.key)]
        result = outcome_result(outcome)
        row = _row(k, self.settings, self.key, result)
        row.update(status=TrialStatus.SPECULATIVE, meets_metric=False,
                   error="ran ahead of the serial order; not used: a smaller candidate meets "
                         "both targets")
        self.table.append(row)
        self.speculative.discarded(result)

    def speculative_note(self):
        """One line on the work done ahead of the serial order and thrown away, or ''."""
        return self.speculative.note('candidate', 'trained ahead of the serial order and not used')

    def _commit(self, outcome):
        settings = self.settings
        k = self.feasible[self._index(outcome.job.key)]
        result = outcome_result(outcome)
        drop_unneeded_refit(result, settings, self._refit_above())   # the serial bar is higher
        if result.status == TrialStatus.OK and not settings.QUANTIZE_INT8 and result.onnx_bytes != k.predicted_bytes:
            self.log(f"  warning: {k.name}: trained ONNX is {result.onnx_bytes} bytes, predicted "
                     f"{k.predicted_bytes}")
        row = _row(k, settings, self.key, result)
        row['meets_metric'] = self._meets({k2: str(v) for k2, v in row.items()})
        if result.status == TrialStatus.OK:
            _save_candidate(settings, k, result, self._dir(k.name), self.key)   # artifacts first
        self.table.append(row)                                                # the commit point
        recorded = [r for r in self.table.rows()
                    if r['settings_key'] == self.key and r['candidate'] == k.name]
        self.outcomes[k.name] = recorded[-1]
        self.log(f"  {k.name}: {result.status}, {settings.SELECT_ON} {row.get('xx', '')}-{row.get('yy', '')}, "
                 f"{row.get('onnx_kb', '')} KB, {result.wall_s:.1f} s"
                 + (f" ({row['error']})" if result.error else '')
                 + (f" on node {result.node}" if result.node not in ('', 'local') else ''))

    def finish(self):
        """Publish the answer (or the best under the size cap); (folder or None, met, rows)."""
        settings, log = self.settings, self.log
        rows = [r for r in self.table.rows() if r['settings_key'] == self.key]
        decided, winner = self.winner()
        if winner:
            log(f"{winner['candidate']} meets both targets: the smallest such model.")
            return self._publish(winner, True), True, rows
        trained = [r for r in self.outcomes.values() if r['status'] == TrialStatus.OK
                   and _deliverable_fits(r, self.budget, settings)]
        if not trained:
            log("No candidate meets both targets, and none under the size cap trained successfully "
                f"(SIZE_TARGET_KB={settings.SIZE_TARGET_KB}: raise it or lower CHANNEL_SCALES / FC_SCALES).")
            return None, False, rows
        best = max(sorted(trained, key=lambda r: self._index(r['candidate'])), key=best_rank)
        log(f"No candidate meets both targets. Best under the size cap: {best['candidate']} with "
            f"{settings.SELECT_METRIC}={100 * float(best['score']):.1f} "
            f"({100 * float(best['score']) - settings.METRIC_TARGET:+.1f} points from METRIC_TARGET="
            f"{settings.METRIC_TARGET}), {best['onnx_kb']} KB ({float(best['onnx_kb']) - settings.SIZE_TARGET_KB:+.0f} KB "
            f"from SIZE_TARGET_KB={settings.SIZE_TARGET_KB}).")
        return self._publish(best, False), False, rows

    def _publish(self, row, met):
        """Derive <FINAL_RESULT_DIR>/<xx>-<yy>/ from the candidate's folder (atomically); an
        earlier result folder of this same search under another name is stale: removed."""
        settings = self.settings
        name = f"{row['xx']}-{row['yy']}"
        source = self._dir(row['candidate'])
        verdict = (f"Stage two: {'meets' if met else 'does NOT meet'} both targets "
                   f"(METRIC_TARGET={settings.METRIC_TARGET}, SIZE_TARGET_KB={settings.SIZE_TARGET_KB})")

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


def run_stage_two(settings, data, interrupts, log=print, progress=True, trainer=None,
                  executor=None):
    """The stage-two search; returns (result folder or None, met: bool, rows)."""
    os.makedirs(settings.TEMP_DIR, exist_ok=True)
    stage = StageTwo(settings, data, log, progress, trainer)
    with interrupts.critical():
        stage.start()
    dispatch(stage, data, interrupts, executor)
    note = stage.speculative_note()
    if note:
        log(note)
    with interrupts.critical():
        return stage.finish()


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
