"""Stage two of ATML: scale the architecture in public/ss_model.py (channel and FC widths)
until a model meets both METRIC_TARGET and SIZE_TARGET_KB of params.py.

    python train_final.py
    python train_final.py METRIC_TARGET=95 SIZE_TARGET_KB=40
    python train_final.py --report        # rebuild <xx>-<yy>/report.html from disk only

Candidates over the size target are known before training (exact ONNX size of the
untrained model) and never trained; the rest are trained smallest first. The result goes
to <xx>-<yy>/; temp/ holds the work in progress. Ctrl+C stops cleanly; rerun to resume.
"""
import sys

from public.cli import log, main, write_report

# The folders stage two writes (work in progress, the result, the parse cache).
STAGE_FOLDERS = ('TEMP_DIR', 'FINAL_RESULT_DIR', 'CACHE_DIR')


def run(settings, interrupts):
    import pandas as pd
    from public.models.registry import import_user_module
    # Before the stage code imports it: a public/ss_model.py that does not import is an
    # error naming its file and line (public.search.stage_two then finds it in sys.modules).
    import_user_module('public.ss_model')
    from public.core.settings import source_of
    from public.dataset import with_label_lines
    from public.results.files import worst_subjects_note
    from public.results.store import RunLock, check_writable
    from public.search.dispatch import make_executor, threads_note
    from public.search.stage_two import run_stage_two
    from public.data.prepare import prepare_data
    for name in STAGE_FOLDERS[:2]:
        check_writable(getattr(settings, name), name, source_of(settings, name))
    with RunLock(settings.TEMP_DIR, 'train_final.py'):
        log(f"ATML stage two; {threads_note(settings)}")
        data = prepare_data(settings)
        data.summary = with_label_lines(data.summary, settings)
        log(data.summary)
        with make_executor(settings, data, log) as executor:
            folder, met, rows = run_stage_two(settings, data, interrupts, log=log,
                                              executor=executor)
        page = write_report(settings, data.summary, stage=2, folder=folder)
    columns = ['candidate', 'predicted_bytes', 'status', 'xx', 'yy', 'meets_metric', 'onnx_kb',
               'latency_ms', 'wall_s']
    table = pd.DataFrame(rows, columns=columns)
    table = table.assign(_size=pd.to_numeric(table['predicted_bytes'])).sort_values(
        '_size', kind='stable').drop(columns='_size')          # by size, over-size rows last
    with pd.option_context('display.width', 100):
        log("\nStage-two candidates (smallest first):\n" + table.to_string(index=False))
    if page:
        log(f"\nReport: {page}")
    if folder:
        log('\n'.join(worst_subjects_note([folder])))


if __name__ == '__main__':
    if '--report' in sys.argv[1:]:
        from public.report.main import main as report_main
        sys.exit(report_main(['stage2'] + [a for a in sys.argv[1:] if a != '--report']))
    sys.exit(main(run, name='train_final.py', folders=STAGE_FOLDERS))
