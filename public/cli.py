"""What train_multi.py and train_final.py share: settings, logging, errors, interruption."""
import os
import sys
import time

import torch

from public.config import SettingsError, load_settings
from public.dataset import DataError
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
        from public.search import AvoidFileError      # imported late: keeps --help fast
        with GracefulInterrupts() as interrupts:
            run(settings, interrupts)
    except (SettingsError, DataError) as exc:
        log(f"error: {exc}")
        return 2
    except Exception as exc:
        from public.search import AvoidFileError
        if isinstance(exc, AvoidFileError):
            log(f"error: {exc}")
            return 2
        raise
    except KeyboardInterrupt as exc:
        log(f"\nInterrupted ({exc or 'SIGINT'}) after {time.time() - start:.0f} s. Finished "
            f"trials are saved; run the same command again to resume.")
        return 130
    log(f"Done in {time.time() - start:.0f} s.")
    return 0


def threads_note(settings):
    """Apply NUM_THREADS (0 keeps torch's default) and describe the CPU budget."""
    if settings.NUM_THREADS:
        torch.set_num_threads(settings.NUM_THREADS)
    return f"{os.cpu_count()} CPU core(s), torch threads {torch.get_num_threads()}"
