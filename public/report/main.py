"""The report's command line: rewrite a stage's report.html from the files on disk.

    python -m public.report stage1 [KEY=VALUE ...]              # <MODEL_SAVE_PATH>/report.html
    python -m public.report stage2 [--folder DIR] [KEY=VALUE ...]   # <xx>-<yy>/report.html
    python train_multi.py --report / python train_final.py --report   (the same, per stage)

Give the same KEY=VALUE overrides as the run: only the trials recorded with the current
settings (their settings key) belong to the search shown.
"""
import os
import sys

from public.core.settings import SettingsError, load_settings
from public.report.pages import write_stage_one_report, write_stage_two_report
from public.report.reading import find_result_folder


USAGE = ("usage: python -m public.report stage1|stage2 [--folder DIR] [--params PATH] "
         "[KEY=VALUE ...]\n  Rewrites report.html from the files on disk (no training). Give "
         "the run's KEY=VALUE overrides.")


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in ('stage1', 'stage2'):
        print(USAGE)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    stage, rest = argv[0], argv[1:]
    folder = None
    if '--folder' in rest:
        i = rest.index('--folder')
        if i + 1 >= len(rest):
            print('error: --folder needs a path', file=sys.stderr)
            return 2
        folder = rest[i + 1]
        del rest[i:i + 2]
    try:
        settings = load_settings(rest)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if stage == 'stage1':
        path = write_stage_one_report(settings)
    else:
        folder = folder or find_result_folder(settings)
        if folder and not os.path.isdir(folder):
            print(f"error: {folder}: no such folder", file=sys.stderr)
            return 2
        path = write_stage_two_report(settings, folder)
    print(f"wrote {path}")
    return 0
