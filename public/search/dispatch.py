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
"""
import os
import time
from typing import Optional, Protocol

import torch

from public.search.executor import Job, Outcome, RayExecutor, SerialExecutor
from public.train.outcome import TrialStatus


class Stage(Protocol):
    """What the dispatch loop asks a stage (see the module docstring)."""

    def next_job(self) -> Optional[Job]:
        """The next job to submit now, or None (none left, or none until an outcome)."""

    def record(self, outcome: Outcome) -> None:
        """Apply a finished job's outcome (inside a critical section)."""

    def obsolete(self, job: Job) -> bool:
        """Whether a submitted, unfinished job is no longer wanted (it is cancelled)."""


def run_dispatch(stage: Stage, executor, interrupts, on_record=None):
    """Keep the executor full with the stage's next jobs; record outcomes as they arrive.
    `on_record()` runs after each recorded outcome, outside the critical section (the
    report of a running search)."""
    while True:
        while len(executor.pending()) < executor.capacity:
            job = stage.next_job()
            if job is None:
                break
            executor.submit(job)
        if not executor.pending():
            return                   # nothing running and nothing left to start
        for outcome in executor.wait():
            with interrupts.critical():
                stage.record(outcome)
            if on_record:
                on_record()
            for job in list(executor.pending()):
                if stage.obsolete(job):
                    executor.cancel(job)


def dispatch(stage: Stage, data, interrupts, executor=None, on_record=None):
    """run_dispatch on `executor`, or, when it is None, on a SerialExecutor made for this
    call and shut down after it (a given executor is its owner's to shut down)."""
    own = executor is None
    executor = executor or SerialExecutor(data)
    try:
        run_dispatch(stage, executor, interrupts, on_record)
    finally:
        if own:
            executor.shutdown()


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
