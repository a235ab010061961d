"""One base class for every error a user can fix: a setting, a data file, avoid.txt, an
export, a busy results folder. `cli.main` catches `ATMLError` once, prints its message
(which names the file or setting, the value and the rule) and exits with status 2.

    raise SettingsError("params.py: NUM_EPOCHS must be an int >= 1, got NUM_EPOCHS=0")

A full disk is a DiskFullError (disk_full_cause finds one in any exception's chain), so a
run that fills MODEL_SAVE_PATH or TEMP_DIR ends with the same one clear line and status 2.
"""
import errno as _errno
import os as _os


class ATMLError(Exception):
    """A problem the user can fix; the message says where, what and the rule."""


class SettingsError(ATMLError, ValueError):
    """A setting breaks its rule. The message names the setting, the rule and the value."""


class DataError(ATMLError, ValueError):
    """A data file or folder breaks a rule; the message names it, what is wrong and the rule."""


class AvoidFileError(ATMLError, ValueError):
    """A malformed avoid.txt line; the message names the file, line, text and rule."""


class ExportError(ATMLError, RuntimeError):
    """Export produced no usable self-contained ONNX file, or its outputs differ from PyTorch."""


class BusyError(ATMLError):
    """Another ATML run holds the lock of a results folder."""


class ModelFileError(ATMLError, ValueError):
    """public/model.py or public/ss_model.py cannot be imported, or registers a model name
    twice; the message names the file and line (and shows the offending source line)."""


# ----------------------------------------------------------------------------- full disks

DISK_FULL_ERRNOS = frozenset(e for e in (getattr(_errno, 'ENOSPC', None),
                                         getattr(_errno, 'EDQUOT', None)) if e is not None)
# What torch's zip writer (caffe2/serialize/inline_container.cc) says when a write of
# torch.save comes up short: it reports no errno, only these words.
_WRITE_FAILED = ('file write failed', 'PytorchStreamWriter failed', 'unexpected pos')


class DiskFullError(ATMLError):
    """A results / temporary / cache folder's disk is full (or its quota used up). The
    message names the folder (and the setting when known), the free bytes, the bytes needed
    when known, and says that the half-written files were removed."""

    def __init__(self, folder, reason='No space left on device', needed=None, setting=None,
                 value=None, cleaned=True):
        super().__init__(folder, reason, needed, setting, value, cleaned)
        self.folder, self.reason, self.needed = folder, reason, needed
        self.setting, self.value = setting, value      # the setting naming the folder (or
                                                       # one above it) and its value
        self.cleaned = cleaned      # False: raised outside ATML's writers (nothing removed)

    def moved(self, folder=None, setting=None, value=None):
        """The same error about another folder (the final name of a temporary one) or with
        the setting whose folder holds it."""
        return DiskFullError(folder or self.folder, self.reason, self.needed,
                             setting or self.setting, value or self.value, self.cleaned)

    def __str__(self):
        free = free_bytes(self.folder)
        value = self.folder if self.value is None else self.value
        where = self.folder
        if self.setting:
            same = _os.path.abspath(value) == _os.path.abspath(self.folder)
            where = (f"{self.setting}={value!r}" if same else
                     f"{self.folder} (in {self.setting}={value!r})")
        numbers = [f"{free:,} bytes free there" if free is not None else '']
        if self.needed:
            numbers.append(f"about {self.needed:,} bytes needed for this write")
        numbers = '; '.join(n for n in numbers if n)
        kept = ('The half-written files were removed and finished work is kept' if self.cleaned
                else 'Finished work is kept')
        return (f"{where}: the disk is full ({self.reason})" + (f"; {numbers}" if numbers else '')
                + f". {kept}: free some space (or point {self.setting or 'the setting'} at a "
                  f"folder on another disk) and run the same command again")


def disk_full_cause(exc):
    """The exception in exc's chain (exc, its __cause__ / unsuppressed __context__, ...,
    as a traceback would show them) that says a disk is full: a DiskFullError, an OSError
    ENOSPC / EDQUOT, or torch's RuntimeError of a short write ('PytorchStreamWriter failed
    ... file write failed', 'unexpected pos'); None when none does."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, DiskFullError):
            return exc
        if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
            return exc
        if isinstance(exc, RuntimeError) and any(s in str(exc) for s in _WRITE_FAILED):
            return exc
        exc = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    return None


def disk_full_reason(exc):
    """A short reason for a disk_full_cause: the OS's words, or torch's short-write note."""
    if isinstance(exc, DiskFullError):
        return exc.reason
    if isinstance(exc, OSError):
        return exc.strerror or _os.strerror(exc.errno)
    return 'a write came up short: torch could not write the whole file'


def free_bytes(path):
    """Bytes free to this user on the disk of path (its nearest existing folder), or None."""
    path = _os.path.abspath(path)
    while path and not _os.path.exists(path):
        parent = _os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    try:
        st = _os.statvfs(path)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize
