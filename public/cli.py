"""What train_multi.py and train_final.py share: settings, logging, errors, interruption.

It imports only public.core at the top, so `--help` and a bad setting answer at once; the
stages' code (torch, the data, the search) is imported by each script's run().
"""
import os
import sys
import time

from public.core.errors import (ATMLError, DiskFullError, disk_full_cause, disk_full_reason,
                                free_bytes)
from public.core.interrupts import GracefulInterrupts
from public.core.settings import help_text, load_settings

# The folders a stage writes, by setting: a full disk is reported as the one of these it is.
FOLDERS = ('MODEL_SAVE_PATH', 'TEMP_DIR', 'FINAL_RESULT_DIR', 'CACHE_DIR')
_FULL_BELOW = 1 << 20         # bytes free under which a disk counts as the full one


def log(message):
    print(message, flush=True)


def usage(name, argv=()):
    """--help: the command line, examples with shell quoting, then every setting with its
    current value (params.py plus the given overrides, when they load) and its doc line."""
    try:
        settings, note = load_settings(argv), 'current values (params.py + command line)'
    except Exception as exc:       # noqa: BLE001  (help must answer even with a bad params.py)
        settings, note = None, f"defaults (the settings do not load: {exc})"
    other = 'train_final.py' if name == 'train_multi.py' else 'train_multi.py'
    return (f"usage: python {name} [--params PATH] [--report] [KEY=VALUE ...]\n\n"
            f"Settings come from params.py; KEY=VALUE overrides one for this run (a Python\n"
            f"literal; quote it for the shell when it has brackets, commas or spaces).\n"
            f"  --params PATH   another settings file\n"
            f"  --report        rebuild this stage's report.html from the files on disk only\n\n"
            f"examples:\n"
            f"  python {name} NUM_EPOCHS=10 LR_MAX=0.003\n"
            f"  python {name} \"MODELS=('SepNet',)\" WORKERS=1\n"
            f"  python {name} --report\n"
            f"  (the other stage: python {other} --help)\n\n"
            f"settings, {note}:\n{help_text(settings)}")


def main(run, argv=None, name='ATML', folders=FOLDERS):
    """Load and validate settings, then run(settings, interrupts). Exit codes: 0 done,
    2 a problem the user can fix, nothing lost (bad settings or data: the message names the
    file or setting, the value and the rule; a full disk: the message names the folder and
    its setting), 3 stage two finished but no candidate meets both targets (the closest is
    in <xx>-<yy>-MISS/; run()'s own status), 130 interrupted. `folders` are the settings
    naming the folders the stage writes (which one a full disk is)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        log(usage(name, [a for a in argv if a not in ('-h', '--help')]))
        return 0
    start = time.time()
    settings = None
    try:
        settings = load_settings(argv)
        with GracefulInterrupts() as interrupts:
            status = run(settings, interrupts)
    except KeyboardInterrupt as exc:
        log(f"\nInterrupted ({exc.args[0] if exc.args and exc.args[0] else 'SIGINT'}) after {time.time() - start:.0f} s. Finished "
            f"trials are saved; run the same command again to resume.")
        return 130
    except Exception as exc:          # noqa: BLE001  (only the user-fixable ones are caught)
        message = clear_message(exc, settings, folders)
        if message is None:
            raise
        log(f"error: {message}")
        return 2
    log(f"Done in {time.time() - start:.0f} s.")
    return status if isinstance(status, int) and not isinstance(status, bool) else 0


def clear_message(exc, settings=None, folders=FOLDERS):
    """The one-line message of a problem the user can fix, or None (a bug: the traceback
    is shown). A full disk anywhere in exc's chain (an OSError ENOSPC / EDQUOT, torch's
    'PytorchStreamWriter failed ... file write failed', a DiskFullError) names the folder
    and its setting; any other ATMLError is its own message."""
    cause = disk_full_cause(exc)
    if cause is not None:
        return str(disk_full_error(cause, settings, folders))
    if isinstance(exc, ATMLError):
        return str(exc)
    return None


def disk_full_error(cause, settings=None, folders=FOLDERS):
    """A DiskFullError for a disk_full_cause, naming the folder and the setting behind it:
    the folder the error names, the folder of the file an OSError names, else the folder of
    `folders` whose disk is full (least free space)."""
    if isinstance(cause, DiskFullError):
        error = cause
    else:
        filename = getattr(cause, 'filename', None)
        folder = os.path.dirname(os.path.abspath(filename)) if filename else None
        if folder is None and settings is not None:
            folder = _fullest(settings, folders)
        error = DiskFullError(folder or os.getcwd(), disk_full_reason(cause), cleaned=False)
    if settings is not None and not error.setting:
        setting = _setting_of(error.folder, settings, folders)
        if setting:
            error = error.moved(setting=setting, value=getattr(settings, setting))
    return error


def _setting_of(folder, settings, folders):
    """The setting of `folders` whose folder holds folder (the innermost one), or None."""
    path = os.path.abspath(folder)
    best = None
    for name in folders:
        value = getattr(settings, name, None)
        if not value:
            continue
        root = os.path.abspath(value)
        try:
            inside = os.path.commonpath([path, root]) == root
        except ValueError:
            continue
        if inside and (best is None or len(root) > len(best[1])):
            best = (name, root)
    return best[0] if best else None


def _fullest(settings, folders):
    """The folder of `folders` with the least free space (where a write of unknown path
    failed for lack of it), or None."""
    free = [(free_bytes(getattr(settings, n)), getattr(settings, n)) for n in folders
            if getattr(settings, n, None)]
    free = [(b, f) for b, f in free if b is not None]
    return min(free)[1] if free else None


# How a failed trial's error text (its results row) says that a disk is full.
_DISK_FULL_MARKS = ('No space left on device', 'Disk quota exceeded', '[Errno 28]',
                    '[Errno 122]', 'PytorchStreamWriter failed', 'file write failed',
                    'inline_container.cc')


def stop_if_disk_full(trial, error, settings, folders=FOLDERS):
    """Stop a search at the first trial that failed because a disk is full (its row says
    so; the next run retries it), as every trial after it would fail the same way: raise
    the DiskFullError naming the folder of `folders` whose disk is full (else TEMP_DIR,
    where trials write). trial names the trial, error is its row's error text."""
    error = str(error or '')
    if not any(mark in error for mark in _DISK_FULL_MARKS):
        return
    folder = _fullest(settings, folders) or settings.TEMP_DIR
    reason = ('Disk quota exceeded' if 'quota' in error or '[Errno 122]' in error
              else 'No space left on device')
    raise disk_full_error(DiskFullError(folder, f"{reason}; trial {trial} failed with: "
                                                f"{error}"), settings, folders)


def write_report(settings, data_summary, stage=1, folder=None):
    """Write the stage's report.html; a report problem is a warning, never a lost search."""
    try:
        # here: the report draws with matplotlib, an optional heavy dependency; a report
        # that cannot be made is a warning
        from public.report.pages import write_stage_one_report, write_stage_two_report
        if stage == 1:
            return write_stage_one_report(settings, data_summary)
        return write_stage_two_report(settings, folder, data_summary)
    except Exception as exc:          # noqa: BLE001  (the search's results are already safe)
        log(f"warning: the report could not be written: {type(exc).__name__}: {exc}")
        return None
