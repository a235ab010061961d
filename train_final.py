"""Stage two of ATML: scale the architecture in public/ss_model.py (channel and FC widths)
until a model meets both METRIC_TARGET and SIZE_TARGET_KB of params.py.

    python train_final.py
    python train_final.py METRIC_TARGET=95 SIZE_TARGET_KB=40

Candidates over the size target are known before training (exact ONNX size of the
untrained model) and never trained; the rest are trained smallest first. The result goes
to <xx>-<yy>/; temp/ holds the work in progress. Ctrl+C stops cleanly; rerun to resume.
"""
import sys

import pandas as pd

from public.cli import log, main, threads_note


def run(settings, interrupts):
    from public.scaling import run_stage_two
    from public.trial import prepare_data
    log(f"ATML stage two; {threads_note(settings)}")
    data = prepare_data(settings)
    log(data.summary)
    folder, met, rows = run_stage_two(settings, data, interrupts, log=log)
    columns = ['candidate', 'predicted_bytes', 'status', 'xx', 'yy', 'meets_metric', 'onnx_kb',
               'latency_ms', 'wall_s']
    with pd.option_context('display.width', 200):
        log("\nStage-two candidates:\n" + pd.DataFrame(rows, columns=columns).to_string(index=False))


if __name__ == '__main__':
    sys.exit(main(run, name='train_final.py'))
