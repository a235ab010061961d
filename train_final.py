"""Stage two of ATML: scale the architecture in public/ss_model.py (channel and FC widths)
until a model meets both METRIC_TARGET and SIZE_TARGET_KB of params.py.

    python train_final.py
    python train_final.py METRIC_TARGET=95 SIZE_TARGET_KB=40
    python train_final.py --report        # rebuild <xx>-<yy>/report.html from disk only

Candidates over the size target are known before training (exact ONNX size of the
untrained model) and never trained; the rest are trained smallest first. The result goes
to <xx>-<yy>/; temp/ holds the work in progress. Ctrl+C stops cleanly; rerun to resume.
When no candidate meets both targets, the closest one goes to <xx>-<yy>-MISS/ and the exit
status is 3.
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
    from public.results.files import WORST_BELOW, worst_subjects_note
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
    log("\nStage-two candidates (smallest first):\n" + candidates_table(rows, settings))
    if page:
        log(f"\nReport: {page}")
    worst = worst_subjects_note([folder]) if folder else []
    if worst:
        log(f"Subjects below accuracy {WORST_BELOW:.2f} (worst first; all in per_subject.csv):\n"
            + '\n'.join(worst))
    if not met:
        log(f"Exit status {MISSED}: no model meets both targets"
            + (f" ({folder}/ is the closest, marked -MISS)." if folder else "."))
        return MISSED
    return 0


MISSED = 3          # the exit status of a stage two that meets no target (cli.main)


def _sig3(value):
    """A latency rounded to 3 significant digits ('' when unknown)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return ''
    return '' if value != value else f"{value:.3g}"


def _tenth(value):
    try:
        return f"{float(value):.1f}"
    except (TypeError, ValueError):
        return ''


def candidates_table(rows, settings, width=100):
    """Stage two's candidates for the terminal, smallest first: the trained ones (and
    failed, speculative) one line each, the over-size ones summarised in one line; sizes in
    KB with two decimals, latencies to 3 significant digits, times to 0.1 s."""
    import pandas as pd
    from public.results.files import kb2
    latest = {}
    for r in rows:                          # each candidate once: its latest row
        latest[r['candidate']] = r
    over = [r for r in latest.values() if r['status'] == 'over-size']
    shown = sorted((r for r in latest.values() if r['status'] != 'over-size'),
                   key=lambda r: int(r['predicted_bytes'] or 0))
    size = 'int8_bytes' if settings.QUANTIZE_INT8 else 'onnx_bytes'
    table = pd.DataFrame([{
        'candidate': r['candidate'], 'predicted_KB': kb2(int(r['predicted_bytes'])),
        'status': r['status'], 'xx-yy': f"{r['xx']}-{r['yy']}" if r.get('xx') not in (None, '') else '',
        'meets': ({'True': 'yes', 'False': 'no'}.get(str(r.get('meets_metric')), '')
                  if r['status'] in ('ok', 'diverged', 'failed') else ''),
        'KB': kb2(int(r[size])) if r.get(size) not in (None, '') else '',
        'latency_ms': _sig3(r.get('latency_ms')), 'wall_s': _tenth(r.get('wall_s'))}
        for r in shown])
    text = table.to_string(index=False) if len(table) else '  (no candidate trained)'
    if over:
        sizes = sorted(int(r['predicted_bytes']) for r in over)
        line = (f"{len(over)} over-size candidate(s), never trained (ONNX {kb2(sizes[0])} to "
                f"{kb2(sizes[-1])} KB > SIZE_TARGET_KB={settings.SIZE_TARGET_KB})")
        names = ', '.join(r['candidate'] for r in sorted(over, key=lambda r: int(r['predicted_bytes'])))
        text += '\n' + (f"{line}: {names}" if len(line) + len(names) + 2 <= width else line)
    return '\n'.join(line if len(line) <= width else line[:width - 1] + '~'
                     for line in text.splitlines())


if __name__ == '__main__':
    if '--report' in sys.argv[1:]:
        from public.report.main import main as report_main
        sys.exit(report_main(['stage2'] + [a for a in sys.argv[1:] if a != '--report']))
    sys.exit(main(run, name='train_final.py', folders=STAGE_FOLDERS))
