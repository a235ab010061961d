"""One base class for every error a user can fix: a setting, a data file, avoid.txt, an
export, a busy results folder. `cli.main` catches `ATMLError` once, prints its message
(which names the file or setting, the value and the rule) and exits with status 2.

    raise SettingsError("params.py: NUM_EPOCHS must be an int >= 1, got NUM_EPOCHS=0")
"""


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
