"""Writes that happen whole or not at all: the one mechanism every ATML writer uses.

    write_atomic('multi-result/summary.csv', text)         # text or bytes; returns the path
    with replacing('saved.onnx') as tmp:                     # for writers that want a path
        torch.onnx.export(model, args, tmp)
    replace_folder(parent, '95-91', build)                   # build(tmp_dir) fills it

A file is written under a temporary name next to it (`<path>.<pid>-<hex>.atml-tmp`, the one
naming scheme: results.store.recover_folders removes such leftovers), fsynced and renamed
over `path` with os.replace. A folder is built under `.atml-tmp-<tag>/`, marked, renamed
into place; what it replaces goes to `.atml-old-<tag>-<n>/` and is deleted last. On any
error the temporary file or folder is removed, and a full disk becomes a DiskFullError
naming the folder (README, "Crash safety").

`durable(what)` marks each durable step (a row, a rename, a removal) for the kill-at-every-
step test (tests/test_crash.py): ATML_STEP_LOG=path appends each step's name there,
ATML_KILL_AT_STEP=N kills the process with SIGKILL right after the N-th step.
"""
import contextlib
import os
import shutil
import signal
import uuid

from public.core.errors import BusyError, DiskFullError, disk_full_cause, disk_full_reason

TMP_SUFFIX = '.atml-tmp'      # a temporary file: <path>.<pid>-<hex>.atml-tmp
TMP_PREFIX = '.atml-tmp-'     # a folder being built
OLD_PREFIX = '.atml-old-'     # a folder superseded, deleted last
OWNED = '.atml-owned'         # marker file in every folder ATML builds (tmp and result folders)
COMPLETE = '.complete'        # marker of a built folder not yet renamed into place and unmarked


# ----------------------------------------------------------------------------- write steps

_steps = {'count': 0}


def durable(what):
    """Mark one durable write step (a row, a rename, a removal). For the kill-at-every-step
    test: ATML_STEP_LOG=path appends each step's name there; ATML_KILL_AT_STEP=N kills the
    process with SIGKILL right after the N-th step."""
    _steps['count'] += 1
    log = os.environ.get('ATML_STEP_LOG')
    if log:
        with open(log, 'a') as f:
            f.write(f"{_steps['count']} {what}\n")
    if os.environ.get('ATML_KILL_AT_STEP') == str(_steps['count']):
        os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------- files

def temporary_name(path):
    """The temporary name a file is written under before it replaces `path`."""
    return f"{path}.{os.getpid()}-{uuid.uuid4().hex[:6]}{TMP_SUFFIX}"


@contextlib.contextmanager
def replacing(path, needed=None, name_full_disk=True):
    """Yield a temporary path next to `path`; when the block ends without an error, the
    file written there is fsynced and renamed to `path`. On an error it is removed, and a
    full disk is raised as a DiskFullError naming the folder (with `needed` bytes, when
    known); name_full_disk=False re-raises the original error (a writer that turns a full
    disk into a warning, e.g. the parse cache)."""
    tmp = temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        discard(tmp)
        if name_full_disk:
            raise_disk_full(exc, os.path.dirname(os.path.abspath(path)), needed)
        raise


def write_atomic(path, data, step=True):
    """Write text (UTF-8) or bytes to `path` whole or not at all; returns path. step=False
    for derived files outside the crash tests' step list (the report)."""
    binary = isinstance(data, (bytes, bytearray))
    needed = len(data) if binary else len(data.encode('utf-8'))
    with replacing(path, needed=needed) as tmp:
        with (open(tmp, 'wb') if binary else open(tmp, 'w', newline='', encoding='utf-8')) as f:
            f.write(data)
    if step:
        durable(f"write {os.path.basename(path)}")
    return path


def discard(path):
    """Remove a temporary file of a write that failed (quietly: it may never have been made)."""
    try:
        os.remove(path)
    except OSError:
        pass


def raise_disk_full(exc, folder, needed=None):
    """After a failed write into folder (its temporary files already removed): raise a
    DiskFullError naming folder when exc says the disk is full; else return (the caller
    re-raises exc)."""
    cause = disk_full_cause(exc)
    if cause is None:
        return
    if isinstance(cause, DiskFullError):
        raise cause.moved(folder) from None
    raise DiskFullError(folder, disk_full_reason(cause), needed) from None


# ----------------------------------------------------------------------------- folders

def atml_made(path):
    """Whether `path` is a folder ATML built (its marker file, or an older ATML's result.json)."""
    return os.path.isdir(path) and (os.path.exists(os.path.join(path, OWNED))
                                    or os.path.exists(os.path.join(path, 'result.json')))


def _fsync_tree(path):
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())


def replace_folder(parent, name, build, replaces=()):
    """Create parent/name atomically from build(tmp_dir), replacing it and `replaces`.

    `replaces` are other folder names in parent that the new folder supersedes (a model's
    previous best, which has another xx-yy name). A folder in the way that ATML did not
    make is never removed: that is an error naming it."""
    os.makedirs(parent, exist_ok=True)
    final = os.path.join(parent, name)
    if os.path.exists(final) and not atml_made(final):
        raise BusyError(f"{final}: a folder ATML did not make (no {OWNED} or result.json) is "
                        f"in the way of a result folder; move or rename it")
    tag = uuid.uuid4().hex[:8]
    tmp = os.path.join(parent, f"{TMP_PREFIX}{tag}")
    try:
        os.makedirs(tmp)
        open(os.path.join(tmp, OWNED), 'w').close()
        build(tmp)
        with open(os.path.join(tmp, COMPLETE), 'w') as f:
            f.write(name)
        _fsync_tree(tmp)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise_disk_full(exc, final)
        raise
    durable(f"built {name}")
    aside = []
    for old in dict.fromkeys([name, *replaces]):
        path = os.path.join(parent, old)
        if old and os.path.isdir(path) and atml_made(path):
            moved = os.path.join(parent, f"{OLD_PREFIX}{tag}-{len(aside)}")
            open(os.path.join(path, OWNED), 'a').close()
            os.rename(path, moved)
            durable(f"set aside {old}")
            aside.append(moved)
    os.rename(tmp, final)
    durable(f"renamed into place {name}")
    os.remove(os.path.join(final, COMPLETE))
    durable(f"unmarked {name}")
    for path in aside:
        shutil.rmtree(path, ignore_errors=True)
        durable("removed superseded folder")
    return final
