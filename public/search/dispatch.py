"""The one dispatch loop both stages share: a stage decides, an executor runs.

    with make_executor(settings, data, log) as executor:
        dispatch(stage, data, interrupts, executor)     # executor=None: a serial one

A stage (stage_one.StageOne, stage_two.StageTwo) is a `Stage`: the loop calls exactly
three of its methods and nothing else:
- `next_job()`: the next candidate to start (a public.search.executor.Job), or None for now;
- `record(outcome)`: what a finished trial means (its row, pruning, stop, winner); called
  inside a critical section, so Ctrl+C never splits its bookkeeping;
- `obsolete(job)`: whether a submitted job is no longer wanted (its model reached the
  target; a smaller stage-two candidate won) and should be cancelled.
The search is over when nothing runs and next_job() has nothing left to start.
The executor (public.search.executor: SerialExecutor in-process, RayExecutor on all cores
or a cluster) knows nothing of stages: it runs jobs and hands back outcomes. With WORKERS=1
the serial executor runs one job at a time, so each result is recorded before the next job
is chosen: exactly the original's sequential search.

Live progress (public/search/progress.py): `make_watch(executor)` gives the stage a Watch
(None when stdout is not a terminal and nobody else listens); its `report_to` goes into each
trial's TrialSpec (the view itself in serial mode, a ray.util.queue.Queue in Ray mode, which
the loop drains every POLL_S seconds while it waits).
"""
import os
import time
from typing import Optional, Protocol

import torch

from public.search.executor import Job, Outcome, RayExecutor, SerialExecutor
from public.search.progress import Progress, ProgressView, TrialEnded, drain
from public.train.outcome import TrialStatus


class Stage(Protocol):
    """What the dispatch loop asks a stage (see the module docstring)."""

    def next_job(self) -> Optional[Job]:
        """The next job to submit now, or None (none left, or none until an outcome)."""

    def record(self, outcome: Outcome) -> None:
        """Apply a finished job's outcome (inside a critical section)."""

    def obsolete(self, job: Job) -> bool:
        """Whether a submitted, unfinished job is no longer wanted (it is cancelled)."""


def run_dispatch(stage: Stage, executor, interrupts, on_record=None, watch=None):
    """Keep the executor full with the stage's next jobs; record outcomes as they arrive.
    `on_record()` runs after each recorded outcome, outside the critical section (the
    report of a running search). With a `watch` (a Watch), the executor is polled every
    POLL_S seconds and the workers' progress events drained and drawn in between."""
    while True:
        while len(executor.pending()) < executor.capacity:
            job = stage.next_job()
            if job is None:
                break
            executor.submit(job)
        if not executor.pending():
            return                   # nothing running and nothing left to start
        outcomes = executor.wait() if watch is None else executor.wait(timeout=POLL_S)
        if watch is not None:
            watch.poll()
        for outcome in outcomes:
            with interrupts.critical():
                stage.record(outcome)
            if watch is not None:
                watch.ended(outcome)
            if on_record:
                on_record()
            for job in list(executor.pending()):
                if stage.obsolete(job):
                    executor.cancel(job)
                    if watch is not None:
                        watch.event(TrialEnded(job.key, 'cancelled'))


def dispatch(stage: Stage, data, interrupts, executor=None, on_record=None, watch=None):
    """run_dispatch on `executor`, or, when it is None, on a SerialExecutor made for this
    call and shut down after it (a given executor is its owner's to shut down)."""
    own = executor is None
    executor = executor or SerialExecutor(data)
    try:
        run_dispatch(stage, executor, interrupts, on_record, watch)
    finally:
        if own:
            executor.shutdown()


POLL_S = 1.0                 # seconds between two looks at the workers' progress


def run_stage(make_stage, data, interrupts, executor=None, on_record=None, on_event=None,
              label='', log=print, progress=True, critical_start=False):
    """What both stages' run functions share: the live view, the stage built by
    make_stage(log, progress), its start (inside a critical section when critical_start),
    the dispatch loop, and the speculative-work line. Returns the stage, whose `log` is
    where the rest of the run's lines go (the view's, while it draws)."""
    watch = make_watch(executor, on_event, label=label)
    if watch is not None and watch.drawing:
        log, progress = watch.write, False   # tqdm bars of training would collide with the view
    try:
        stage = make_stage(log, progress)
        stage.on_cluster = bool(getattr(executor, 'address', ''))
        stage.watch(watch)
        if critical_start:
            with interrupts.critical():
                stage.start()
        else:
            stage.start()
        dispatch(stage, data, interrupts, executor, on_record, watch)
    finally:
        if watch is not None:
            watch.close()
    note = stage.speculative_note()
    if note:
        log(note)
    return stage


class Watch:
    """The live progress of one stage (public/search/progress.py), as the dispatch loop and
    the stage see it. `send(event)` takes every event on the driver (the view's handle, a
    test's recorder, or both); `report_to` is what a trial's job reports to (TrialSpec
    .report_to): `send` itself in serial mode, a ray.util.queue.Queue that `poll()` drains
    in Ray mode. `view`: the ProgressView drawn on a terminal (None or disabled: quiet)."""

    def __init__(self, send, view=None, source=None):
        self.send, self.view, self.source = send, view, source
        self.report_to = source if source is not None else send

    @property
    def drawing(self):
        """Whether bars are drawn: log lines must then go through `write`."""
        return self.view is not None and self.view.enabled and not self.view.closed

    def event(self, event):
        self.send(event)

    def poll(self):
        """Hand the workers' waiting events to `send` and redraw (ETAs count down)."""
        if self.source is not None:
            try:
                drain(self.source, self.send)
            except Exception:            # progress is a nicety: a broken queue stops it only
                self.source = None
        if self.view is not None:
            self.view.refresh(force=False)

    def ended(self, outcome):
        """A trial's outcome reached the driver: its end (a worker that died sent none)."""
        result = outcome.result
        status = getattr(result, 'status', None) if outcome.ok else TrialStatus.FAILED
        self.send(TrialEnded(outcome.job.key, str(status or TrialStatus.FAILED)))

    def write(self, line):
        self.view.write(line)

    def close(self):
        if self.view is not None:
            self.view.close()


def make_watch(executor, send=None, label='', stream=None, enabled=None):
    """The Watch of a stage run on `executor`: a ProgressView (drawn only on a terminal,
    unless `enabled` says otherwise) fed with every event, plus `send` (a recorder) when
    given. None when nothing would look at the events (no terminal, no `send`): the trials
    then report nothing and the log lines stay as they are."""
    serial = isinstance(executor, SerialExecutor) or executor is None
    capacity = getattr(executor, 'capacity', 1) or 1
    view = ProgressView(Progress(workers=capacity, label=label), stream=stream,
                        enabled=enabled, tick=1.0 if serial else None)
    if not view.enabled:
        view.close()
        if send is None:
            return None
        view = None
    sinks = [s for s in (view.handle if view is not None else None, send) if s is not None]

    def fan_out(event):
        for sink in sinks:
            sink(event)

    source = None if serial else executor.progress_queue()
    return Watch(fan_out if len(sinks) > 1 else sinks[0], view, source)


class SpeculativeWork:
    """What a parallel search did ahead of the serial order and threw away (both stages):
    trials that finished but decide nothing (their rows are marked speculative) and running
    ones cancelled, with the worker time they took."""

    def __init__(self):
        self.trials, self.seconds, self.cancelled = 0, 0.0, 0

    def discarded(self, result):
        """A finished trial the serial search never reaches."""
        self.trials += 1
        self.seconds += float(result.wall_s or 0.0)

    def cancel(self, dispatched_at):
        """A running job cancelled; it was handed out at time.time() `dispatched_at`."""
        self.cancelled += 1
        self.seconds += time.time() - dispatched_at

    def note(self, what, done):
        """One line for the log ('' when there was none): `what` names a job ('trial'),
        `done` what became of the discarded ones."""
        if not (self.trials or self.cancelled):
            return ''
        return (f"Speculative work: {self.trials} {what}(s) {done} ({self.seconds:.0f} s of "
                f"worker time; rows marked '{TrialStatus.SPECULATIVE}'), {self.cancelled} "
                f"running {what}(s) cancelled")


def make_executor(settings, data, log=print):
    """SerialExecutor for WORKERS=1 (no Ray imported), else a RayExecutor: a private local
    instance, or the cluster of RAY_ADDRESS (setting or environment variable)."""
    if settings.WORKERS == 1:
        return SerialExecutor(data)
    project = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return RayExecutor(data, workers=settings.WORKERS, address=settings.RAY_ADDRESS,
                       temp_dir=os.path.abspath(settings.TEMP_DIR),
                       num_threads=settings.NUM_THREADS or 1, working_dir=project, log=log)


def threads_note(settings):
    """Describe the CPU budget of a search (prepare_data applies NUM_THREADS; each worker
    does too)."""
    threads = settings.NUM_THREADS or torch.get_num_threads()
    workers = ('serial (WORKERS=1)' if settings.WORKERS == 1 else
               f"WORKERS={settings.WORKERS!r} concurrent trials")
    return f"{os.cpu_count()} CPU core(s), {workers}, {threads} torch thread(s) per trial"
