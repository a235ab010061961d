"""The one dispatch loop both stages share: a stage decides, an executor runs.

    with make_executor(settings, data, log) as executor:
        run_dispatch(stage, executor, interrupts)

A stage (search.StageOne, scaling.StageTwo) answers three questions and nothing else:
- `next_job()`: the next candidate to start (a public.executor.Job), or None for now;
- `record(outcome)`: what a finished trial means (its row, pruning, stop, winner); called
  inside a critical section, so Ctrl+C never splits its bookkeeping;
- `obsolete(job)`: whether a submitted job is no longer wanted (its model reached the
  target; a smaller stage-two candidate won) and should be cancelled;
- `finished()`: whether the search is over (no job left to start or wait for).
The executor (public.executor: SerialExecutor in-process, RayExecutor on all cores or a
cluster) knows nothing of stages: it runs jobs and hands back outcomes. With WORKERS=1 the
serial executor runs one job at a time, so each result is recorded before the next job is
chosen: exactly the original's sequential search.
"""
import os


def run_dispatch(stage, executor, interrupts, on_record=None):
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


def make_executor(settings, data, log=print):
    """SerialExecutor for WORKERS=1 (no Ray imported), else a RayExecutor: a private local
    instance, or the cluster of RAY_ADDRESS (setting or environment variable)."""
    from public.executor import SerialExecutor
    if settings.WORKERS == 1:
        return SerialExecutor(data)
    from public.executor import RayExecutor
    return RayExecutor(data, workers=settings.WORKERS, address=settings.RAY_ADDRESS,
                       temp_dir=os.path.abspath(settings.TEMP_DIR),
                       num_threads=settings.NUM_THREADS or 1,
                       working_dir=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       log=log)
