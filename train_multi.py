"""Stage one of ATML: train every model registered in public/model.py over the
learning-rate grid of params.py, prune bad rates through avoid.txt, export each model to
ONNX and record everything in multi-result/.

    python train_multi.py                 # settings from params.py
    python train_multi.py NUM_EPOCHS=5    # override a setting for this run
    python train_multi.py WORKERS=1       # one trial at a time, in-process (no Ray)
    python train_multi.py --report        # rebuild multi-result/report.html from disk only

Ctrl+C (or SIGTERM) stops cleanly; run it again to resume where it stopped.
"""
import os
import sys


from public.cli import log, main, stop_if_disk_full, write_report

# The folders stage one writes (results, scratch, parse cache): a full disk names its setting.
STAGE_FOLDERS = ('MODEL_SAVE_PATH', 'TEMP_DIR', 'CACHE_DIR')


def selected_models(settings):
    """MODELS by name (any registered model, seed models included), or every model that
    public/model.py registers, in definition order (read now: a model appended below the
    file's last line is searched too)."""
    from public.models.registry import get_model_class, import_user_module, model_classes
    # A public/model.py that does not import is an error naming its file and line.
    import_user_module('public.model')              # registers its models
    if not settings.MODELS:
        return [m for m in model_classes() if m.__module__ == 'public.model']
    import_user_module('public.models.seed')        # the seed systems' models
    import_user_module('public.models.small')       # the <= 20 KB architectures
    from public.core.settings import SettingsError, source_of
    try:
        return [get_model_class(name) for name in settings.MODELS]
    except KeyError as exc:
        raise SettingsError(f"{source_of(settings, 'MODELS')}: MODELS={settings.MODELS!r}: "
                            f"{exc.args[0]}") from None


def check_avoid_file(settings, model_names):
    """Read avoid.txt before any data is loaded: a malformed line stops the run now; a line
    naming a model nobody registered is reported (it prunes nothing)."""
    from public.models.registry import model_classes
    from public.search.avoid import AvoidList
    avoid = AvoidList(settings.AVOID_FILE_PATH, settings.STEP)
    known = set(model_names) | {m.__name__ for m in model_classes()}
    for number, name, close in avoid.unknown_models(known):
        log(f"warning: {settings.AVOID_FILE_PATH}: line {number} names model {name!r}, which is "
            f"not registered{f' (did you mean {close}?)' if close else ''}; it prunes nothing")


def run(settings, interrupts):
    import pandas as pd
    from public.core.settings import source_of
    from public.dataset import with_label_lines
    from public.results.files import WORST_BELOW, worst_subjects_note
    from public.results.store import RunLock, check_writable
    from public.results.table import ResultsTable, STAGE1_COLUMNS
    from public.search.dispatch import make_executor, threads_note
    from public.search.stage_one import (RESULTS_CSV, next_step_lines, recommended_pick,
                                         run_stage_one)
    from public.data.prepare import prepare_data
    from public.train.outcome import TrialStatus
    model_classes = selected_models(settings)
    for name in STAGE_FOLDERS[:2]:
        check_writable(getattr(settings, name), name, source_of(settings, name))
    table = ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, RESULTS_CSV), STAGE1_COLUMNS)
    with RunLock(settings.MODEL_SAVE_PATH, 'train_multi.py'):
        check_avoid_file(settings, [m.__name__ for m in model_classes])
        log(f"ATML stage one: {len(model_classes)} model(s): "
            f"{', '.join(m.__name__ for m in model_classes)}; {threads_note(settings)}")
        data = prepare_data(settings)
        data.summary = with_label_lines(data.summary, settings)
        log(data.summary)

        def on_record():
            """After each recorded trial: stop if it failed for a full disk (every later
            trial would too; its row makes the next run retry it); then the report."""
            rows = table.rows()
            if rows and rows[-1]['status'] == TrialStatus.FAILED:
                last = rows[-1]
                stop_if_disk_full(f"{last['model']} lr={last['lr']}", last['error'], settings,
                                  STAGE_FOLDERS)
            write_report(settings, data.summary)
        with make_executor(settings, data, log) as executor:
            summary = run_stage_one(settings, data, model_classes, interrupts, log=log,
                                    executor=executor, on_record=on_record)
        page = write_report(settings, data.summary)
    log("\nSummary (best trial per model; metrics on the "
        f"{settings.SELECT_ON} split decide):\n" + summary_table(summary))
    log(f"\nAll trials: {os.path.join(settings.MODEL_SAVE_PATH, 'results.csv')}; summary with "
        f"every column: {os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv')}"
        + (f"; report: {page}" if page else ''))
    worst = worst_subjects_note(summary['folder'].dropna() if 'folder' in summary else [])
    if worst:
        log(f"Subjects below accuracy {WORST_BELOW:.2f} (worst first; all in per_subject.csv "
            f"of each folder):\n" + '\n'.join(worst))
    log('')
    for line in next_step_lines(recommended_pick(summary.to_dict('records')), settings):
        log(line)


# The terminal summary's columns and their short headers (summary.csv has every column).
SUMMARY_COLUMNS = {'model': 'model', 'trials': 'trials', 'skipped': 'skipped', 'pruned': 'pruned',
                   'failed': 'failed', 'best_lr': 'best_lr', 'result': 'xx-yy', 'score': 'score',
                   'test_f1': 'test_f1', 'onnx_kb': 'KB', 'latency_ms': 'ms', 'wall_s': 'wall_s'}


def summary_table(summary, width=100):
    """The stage-one summary for the terminal: at most `width` columns (trailing columns
    dropped when it would be wider), sizes in KB with two decimals."""
    import pandas as pd
    show = summary[[c for c in SUMMARY_COLUMNS if c in summary.columns]].copy()
    if 'onnx_kb' in show:
        show['onnx_kb'] = show['onnx_kb'].map(lambda v: '' if pd.isna(v) else f"{v:.2f}")
    if 'model' in show:
        show['model'] = show['model'].map(lambda m: m if len(m) <= 24 else m[:23] + '~')
    show = show.rename(columns=SUMMARY_COLUMNS).fillna('')
    text = show.to_string(index=False)
    while show.shape[1] > 2 and max(map(len, text.splitlines())) > width:
        show = show.iloc[:, :-1]
        text = show.to_string(index=False)
    return text


if __name__ == '__main__':
    if '--report' in sys.argv[1:]:
        from public.report.main import main as report_main
        sys.exit(report_main(['stage1'] + [a for a in sys.argv[1:] if a != '--report']))
    sys.exit(main(run, name='train_multi.py', folders=STAGE_FOLDERS))
