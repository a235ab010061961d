"""Model registry: a model registers itself next to its definition with @register_model.

`model_classes()` lists the registered classes in registration order (the order stage one
trains them). A duplicate name is an error naming both definitions (file and line); an
unknown name is an error that lists the known ones. Every registered class is constructed
as `Model(input_size=..., in_channels=..., num_classes=...)` and takes input of shape
(N, in_channels, input_size, 1), the original ATML layout.

The files users edit (public/model.py, public/ss_model.py) are imported through
`import_user_module`: one that does not import (a syntax error, an exception at import
time) is a ModelFileError naming the file, the line and showing that line, not a traceback.
"""
import importlib
import importlib.util
import inspect
import linecache
import os
import sys
import traceback

from public.core.errors import ATMLError, ModelFileError

_REGISTRY = {}
_ORIGINS = {}        # name -> (file, line) of the class statement that registered it
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def shown_path(path):
    """A file as messages name it: relative to the project folder when inside it."""
    if not path:
        return '?'
    path = os.path.abspath(path)
    try:
        if os.path.commonpath([path, _ROOT]) == _ROOT:
            return os.path.relpath(path, _ROOT)
    except ValueError:
        pass
    return path


def _class_statement(filename, line):
    """The line of the `class` statement a decorator at `line` applies to (the decorator
    line itself when the class line is not found)."""
    for number in range(line, line + 20):
        text = linecache.getline(filename, number).lstrip()
        if text.startswith('class '):
            return number
        if text and not text.startswith(('@', '#')) and number > line:
            break
    return line


def _origin(cls, frame=None):
    """(file, line) of cls's class statement: from the frame that runs the decorator, or
    from inspect (a class registered before its origin was recorded); (file, None) else."""
    if frame is not None:
        code = frame.f_code
        return code.co_filename, _class_statement(code.co_filename, frame.f_lineno)
    try:
        return inspect.getsourcefile(cls), inspect.getsourcelines(cls)[1]
    except (OSError, TypeError):
        return getattr(sys.modules.get(cls.__module__), '__file__', None), None


def _where(origin):
    path, line = origin
    return f"{shown_path(path)}, line {line}" if line else shown_path(path)


def register_model(cls):
    """Class decorator: add `cls` to the registry under its class name."""
    name = cls.__name__
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        old = _REGISTRY[name]
        first = _ORIGINS.get(name) or _origin(old)
        here = _origin(cls, sys._getframe(1))
        raise ModelFileError(f"{_where(here)}: model name {name!r} is already registered (by "
                             f"{_where(first)}, {old.__module__}.{name}); model names must be "
                             f"unique: rename one of the two classes")
    if name not in _REGISTRY:
        _ORIGINS[name] = _origin(cls, sys._getframe(1))
    _REGISTRY[name] = cls
    return cls


def model_classes():
    """Registered model classes, in registration order."""
    return list(_REGISTRY.values())


def get_model_class(name):
    """The registered class called `name`; an unknown name lists the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; registered models: "
                       f"{', '.join(_REGISTRY) or '(none)'}") from None


# ----------------------------------------------------------------------------- user files

def _module_file(name):
    """The file of module `name` ('public.model' -> <project>/public/model.py)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin:
        return spec.origin
    return os.path.join(_ROOT, *name.split('.')) + '.py'


def _excerpt(text, limit=120):
    text = (text or '').strip()
    return text if len(text) <= limit else text[:limit - 3] + '...'


def import_user_module(name):
    """Import module `name` (a file users edit: 'public.model', 'public.ss_model') and
    return it; already imported: the module. A module that does not import raises
    ModelFileError naming the file and line of the cause, with that line as an excerpt:

        public/model.py, line 12: SyntaxError: invalid syntax; the file cannot be imported
            class Net(nn.Module)

    An error raised while it is imported that is already clear (an ATMLError, such as a
    duplicate model name) passes unchanged. The stage code imports the module afterwards
    and finds it in sys.modules."""
    if name in sys.modules:
        return sys.modules[name]
    module_file = _module_file(name)
    shown = shown_path(module_file)
    try:
        return importlib.import_module(name)
    except ATMLError:
        raise
    except SyntaxError as exc:            # IndentationError and TabError included
        where = shown_path(exc.filename or module_file)
        line = f", line {exc.lineno}" if exc.lineno else ''
        via = '' if where == shown else f" (imported by {shown})"
        text = exc.text or (linecache.getline(exc.filename, exc.lineno)
                            if exc.filename and exc.lineno else '')
        message = (f"{where}{line}: {type(exc).__name__}: {exc.msg}; the file cannot be "
                   f"imported{via}")
        raise ModelFileError(message + (f"\n    {_excerpt(text)}" if text.strip() else '')) \
            from None
    except Exception as exc:              # noqa: BLE001  (raised while the file runs)
        if not os.path.isfile(module_file):
            raise ModelFileError(f"{shown}: the file does not exist ({type(exc).__name__}: "
                                 f"{exc}); restore it (it defines the models this stage "
                                 f"trains)") from None
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if _in_project(f.filename)]
        own = [f for f in ours if os.path.abspath(f.filename) == os.path.abspath(module_file)]
        frame = (own or ours or [None])[-1]     # the user's line; else the deepest of ours
        if frame is None:
            raise ModelFileError(f"{shown}: cannot be imported: {type(exc).__name__}: "
                                 f"{exc}") from None
        where = shown_path(frame.filename)
        deepest = ours[-1] if ours else frame
        raised = ('' if deepest is frame else
                  f" (raised in {shown_path(deepest.filename)}, line {deepest.lineno})")
        text = frame.line or linecache.getline(frame.filename, frame.lineno)
        message = (f"{where}, line {frame.lineno}: {type(exc).__name__}: {exc}{raised}; "
                   f"the file cannot be imported")
        raise ModelFileError(message + (f"\n    {_excerpt(text)}" if text.strip() else '')) \
            from None


def _in_project(filename):
    """Whether a traceback frame's file is a project file (not Python's import machinery,
    not an installed package)."""
    if not filename or filename.startswith('<'):
        return False
    path = os.path.abspath(filename)
    try:
        inside = os.path.commonpath([path, _ROOT]) == _ROOT
    except ValueError:
        return False
    return inside and f"{os.sep}site-packages{os.sep}" not in path \
        and os.path.basename(path) != 'registry.py'
