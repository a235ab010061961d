"""Crash safety of the results folders: what is authoritative on disk, what is derived,
and what a crash leaves behind.

The rule (README, "Crash safety"):
- A stage's results table (`multi-result/results.csv`, `temp/stage2_results.csv`,
  results.table) is the only authoritative record. A trial is finished when, and only
  when, its row is in the table: each row is one line, flushed and fsynced.
- Before its row is written, a trial's artifacts (state dict, ONNX, result.json) are stored
  under a name derived from the row (`multi-result/.store/<key>/<Model>/<lr>/`, stage two:
  `temp/c<C>-f<F>/`), so every derived file can be rebuilt from the table alone.
- Everything else is derived and rebuilt on every start: the best folders
  (`multi-result/<Model>/<xx>-<yy>/`), `summary.csv`, the scoped lines of avoid.txt, and
  stage two's result folder. A missing, stale or doubled derived file is repaired from
  the table; an artifact without a row (a kill between the two) is deleted.
- Folders are replaced atomically (public.core.atomic.replace_folder); crash recovery
  (`recover_folders`) touches only entries with ATML's prefixes that carry its marker,
  nothing a user made.
- One run per results folder: `RunLock` (an flock, released by the kernel even on kill -9).

    with RunLock('multi-result', 'stage one'):
        recover_folders('multi-result')        # what an interrupted write left
"""
import fcntl
import os
import shutil
import time

from public.core.atomic import (COMPLETE, OLD_PREFIX, TMP_PREFIX, TMP_SUFFIX, atml_made,
                                discard, durable)
from public.core.errors import DISK_FULL_ERRNOS, BusyError, DiskFullError, SettingsError

_LEGACY = ('.tmp-', '.old-')   # an older ATML's names, recovered only when they hold its files


def recover_folders(parent):
    """Undo what a crash left of a replace_folder: ATML's temporary and superseded folders
    are removed (the results table rebuilds whatever they held); returns what it did.
    Only entries with ATML's prefixes *and* its marker are touched."""
    if not os.path.isdir(parent):
        return []
    actions = []
    for entry in sorted(os.listdir(parent)):
        path = os.path.join(parent, entry)
        ours = entry.startswith((TMP_PREFIX, OLD_PREFIX)) and os.path.isdir(path) and (
            atml_made(path) or os.path.exists(os.path.join(path, COMPLETE)))
        legacy = entry.startswith(_LEGACY) and os.path.isdir(path) and (
            os.path.exists(os.path.join(path, COMPLETE))
            or os.path.exists(os.path.join(path, 'result.json')))
        if ours or legacy:
            shutil.rmtree(path)
            durable("removed interrupted folder")
            actions.append(f"removed {entry} (left by an interrupted write)")
        elif entry.endswith(TMP_SUFFIX) and os.path.isfile(path):
            os.remove(path)
            actions.append(f"removed {entry} (left by an interrupted write)")
    for entry in sorted(os.listdir(parent)):     # a kill between rename and unmark
        path = os.path.join(parent, entry)
        if os.path.isdir(path) and atml_made(path) and os.path.exists(os.path.join(path, COMPLETE)):
            os.remove(os.path.join(path, COMPLETE))
    return actions


def clean_scratch(temp_dir):
    """Remove the scratch folders (`.atml-scratch-<pid>-*`) of ATML processes that are gone."""
    if not os.path.isdir(temp_dir):
        return []
    removed = []
    for entry in os.listdir(temp_dir):
        if not entry.startswith('.atml-scratch-'):
            continue
        try:
            pid = int(entry.split('-')[2])
        except (IndexError, ValueError):
            continue
        if not _alive(pid):
            shutil.rmtree(os.path.join(temp_dir, entry), ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid):
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ----------------------------------------------------------------------------- the lock

class RunLock:
    """One ATML run per folder: an exclusive flock on `<folder>/.atml.lock`, released by the
    kernel when the process ends, even by kill -9.

        with RunLock('multi-result', 'stage one'):
            ...
    """

    def __init__(self, folder, what):
        self.folder, self.what = folder, what
        self.path = os.path.join(folder, '.atml.lock')
        self._file = None

    def __enter__(self):
        os.makedirs(self.folder, exist_ok=True)
        self._file = open(self.path, 'a+')
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            holder = self._file.read().strip() or 'another process'
            self._file.close()
            raise BusyError(f"{self.folder}: another ATML run ({holder}) is using this folder; "
                            f"wait for it to finish or stop it, then run again") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{self.what}, pid {os.getpid()}, started "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        self._file.flush()
        return self

    def __exit__(self, *exc):
        if self._file:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
        return False


def check_writable(folder, setting, source=None):
    """Fail before any training when a results folder cannot be written (DiskFullError when
    its disk is full). source ('params.py', 'command line') is where the setting came from."""
    where = f"{source}: " if source else ''
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise SettingsError(f"{where}{setting}={folder!r} names a file; it must be a folder")
    probe = os.path.join(folder, f".atml-write-test-{os.getpid()}")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, 'w') as f:
            f.write('x')
        os.remove(probe)
    except OSError as exc:
        if exc.errno in DISK_FULL_ERRNOS:
            discard(probe)
            raise DiskFullError(folder, exc.strerror, setting=setting, value=folder) from None
        raise SettingsError(f"{where}{setting}={folder!r} is not writable ({exc.strerror}); "
                            f"results could not be saved") from None
