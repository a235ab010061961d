"""What train_multi.py and train_final.py share: settings, logging, errors, interruption."""
import os
import sys
import time

import torch

from public.config import load_settings
from public.errors import ATMLError
from public.interrupts import GracefulInterrupts


def log(message):
    print(message, flush=True)


def main(run, argv=None, name='ATML'):
    """Load and validate settings, then run(settings, interrupts). Exit codes: 0 done,
    2 bad settings/data (nothing lost: message names the file or setting), 130 interrupted."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        log(f"usage: python {name} [--params PATH] [KEY=VALUE ...]\n"
            f"Settings come from params.py; KEY=VALUE overrides one (a Python literal).")
        return 0
    start = time.time()
    try:
        settings = load_settings(argv)
        with GracefulInterrupts() as interrupts:
            run(settings, interrupts)
    except ATMLError as exc:
        log(f"error: {exc}")
        return 2
    except KeyboardInterrupt as exc:
        log(f"\nInterrupted ({exc or 'SIGINT'}) after {time.time() - start:.0f} s. Finished "
            f"trials are saved; run the same command again to resume.")
        return 130
    log(f"Done in {time.time() - start:.0f} s.")
    return 0


def threads_note(settings):
    """Describe the CPU budget (prepare_data applies NUM_THREADS; each worker does too)."""
    threads = settings.NUM_THREADS or torch.get_num_threads()
    workers = ('serial (WORKERS=1)' if settings.WORKERS == 1 else
               f"WORKERS={settings.WORKERS!r} concurrent trials")
    return f"{os.cpu_count()} CPU core(s), {workers}, {threads} torch thread(s) per trial"


def write_report(settings, data_summary, stage=1, folder=None):
    """Write the stage's report.html; a report problem is a warning, never a lost search."""
    try:
        from public.report import write_stage_one_report, write_stage_two_report
        if stage == 1:
            return write_stage_one_report(settings, data_summary)
        return write_stage_two_report(settings, folder, data_summary)
    except Exception as exc:          # noqa: BLE001  (the search's results are already safe)
        log(f"warning: the report could not be written: {type(exc).__name__}: {exc}")
        return None


def worst_subjects_note(folders):
    """Lines naming each result folder's worst subjects (lowest accuracy; per_subject.csv)."""
    import pandas as pd
    from public.trial import worst_subjects
    lines = []
    for folder in folders:
        path = os.path.join(str(folder), 'per_subject.csv')
        if not os.path.exists(path):
            continue
        rows = pd.read_csv(path, dtype={'subject': str}).to_dict('records')
        for split in ('test', 'val'):
            worst = worst_subjects(rows, split)
            if worst:
                lines.append(f"  {folder}: worst {split} subjects: {'; '.join(worst)}")
                break
    return lines
