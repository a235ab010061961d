"""Search: the two stages, the loop that dispatches their trials, and where trials run.

    executor.py   SerialExecutor (in-process) and RayExecutor (all cores or a cluster)
    dispatch.py   run_dispatch / dispatch: the loop both stages share; the Stage protocol
    avoid.py      avoid.txt (AvoidList) and the learning-rate grid
    trial.py      one trial (run_trial) and the job a worker runs (run_trial_job)
    stage_one.py  every registered model over the learning-rate grid (run_stage_one)
    stage_two.py  the chosen architecture scaled to the targets (run_stage_two)
"""
