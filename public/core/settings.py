"""Settings: load params.py, apply command-line overrides, validate everything up front.

    settings = load_settings(argv)          # params.py next to the cwd, or --params PATH

Overrides are `KEY=VALUE` arguments (VALUE a Python literal); only known settings are
accepted and the value's type is checked like any other. All rules live in one table,
`_RULES`, which both the check and its message use. A bad setting raises `SettingsError`
naming the file, the setting, the rule and the value, before any work starts.
"""
import ast
import difflib
import importlib.util
import math
import os
from types import SimpleNamespace


from public.core.errors import SettingsError  # noqa: F401  (re-exported: the settings API)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v):
    return isinstance(v, str)


def _is_seq(v):
    return isinstance(v, (list, tuple))


KEY, KEY2 = 'key', 'key2'     # tags of the rules table (see below)
MAX_GRID = 10_000             # learning rates a stage-one grid may hold


# name -> (rule as the message states it, predicate[, KEY]). Order is the order of checking.
# KEY marks a setting that changes what a trial computes (its data, training or scoring):
# the settings key of a results row is derived from the KEY settings (trial_settings()),
# so a run with another value of one of them never reuses that row. KEY2 marks settings
# that change only stage two's trials. tests/test_config.py fails for an unmarked setting
# that is not listed there as not changing a trial.
_RULES = {
    'DATA_DIR': ('a non-empty path string', lambda v: _is_str(v) and v != '', KEY),
    'TEST_DIR': ("a path string ('' for no test set)", _is_str, KEY),
    'DATA_FORMAT': ("one of 'auto', 'txt', 'csv', 'numpy'", lambda v: v in ('auto', 'txt', 'csv', 'numpy'), KEY),
    'INPUT_SIZE': ('an int >= 16', lambda v: _is_int(v) and v >= 16, KEY),
    'PAD_TOLERANCE': ('an int >= 0', lambda v: _is_int(v) and v >= 0, KEY),
    'SHORTER': ("one of 'error', 'exclude'", lambda v: v in ('error', 'exclude'), KEY),
    'LONGER': ("one of 'error', 'crop'", lambda v: v in ('error', 'crop'), KEY),
    'POSITIVE_LABELS': ('a non-empty list/tuple of rhythm strings',
                        lambda v: _is_seq(v) and len(v) > 0 and all(_is_str(s) for s in v), KEY),
    'CLASSES': ('a list/tuple of distinct class names (str) or ints: () for binary, else >= 2',
                lambda v: _is_seq(v) and (len(v) == 0 or len(v) >= 2)
                and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in v)
                and len({str(c) for c in v}) == len(v), KEY),
    'LABEL_MODE': ("one of 'multiclass', 'multilabel'",
                   lambda v: v in ('multiclass', 'multilabel'), KEY),
    'LABEL_SEPARATOR': ('a non-empty string (joins the labels of one multi-label segment)',
                        lambda v: _is_str(v) and v != '', KEY),
    'VAL_FRACTION': ('a number in (0, 1)', lambda v: _is_number(v) and 0 < v < 1, KEY),
    'VAL_FOLDS': ('a list/tuple of fold values (str or int); () = split by subject',
                  lambda v: _is_seq(v) and all(isinstance(f, (str, int)) and not isinstance(f, bool)
                                               for f in v), KEY),
    'SKIP_BAD_FILES': ('True or False', lambda v: isinstance(v, bool), KEY),
    'CACHE_DIR': ('a non-empty path string', lambda v: _is_str(v) and v != ''),
    'LR_MIN': ('a number > 0', lambda v: _is_number(v) and v > 0),
    'LR_MAX': ('a number > 0', lambda v: _is_number(v) and v > 0),
    'STEP': ('a number > 0', lambda v: _is_number(v) and v > 0),
    'AVOID_FILE_PATH': ('a non-empty path string', lambda v: _is_str(v) and v != ''),
    'AVOID_PARAM': ('a number in [0, 1]', lambda v: _is_number(v) and 0 <= v <= 1),
    'STAGE1_TARGET': ('an int in [0, 100]', lambda v: _is_int(v) and 0 <= v <= 100),
    'SELECT_ON': ("one of 'val', 'test'", lambda v: v in ('val', 'test'), KEY),
    'SELECT_METRIC': ("one of 'min4', 'f1', 'accuracy', 'auc', 'abs_sum'",
                      lambda v: v in ('min4', 'f1', 'accuracy', 'auc', 'abs_sum'), KEY),
    'MODELS': ('a list/tuple of registered model names (() = all of public/model.py)',
               lambda v: _is_seq(v) and all(_is_str(m) for m in v)),
    'MODEL_SAVE_PATH': ('a non-empty path string', lambda v: _is_str(v) and v != ''),
    'RESUME': ('True or False', lambda v: isinstance(v, bool)),
    'NUM_EPOCHS': ('an int >= 1', lambda v: _is_int(v) and v >= 1, KEY),
    'BATCH_SIZE': ('an int >= 2 (BatchNorm needs 2 samples)', lambda v: _is_int(v) and v >= 2, KEY),
    'PATIENCE': ('an int >= 1', lambda v: _is_int(v) and v >= 1, KEY),
    'OVERFIT_GAP': ('a number >= 0', lambda v: _is_number(v) and v >= 0, KEY),
    'WEIGHT_DECAY': ('a number >= 0', lambda v: _is_number(v) and v >= 0, KEY),
    'AUGMENT': ('True or False', lambda v: isinstance(v, bool), KEY),
    'NORMALIZE': ("one of 'none', 'segment'", lambda v: v in ('none', 'segment'), KEY),
    'CLASS_WEIGHTS': ("one of 'none', 'balanced'", lambda v: v in ('none', 'balanced'), KEY),
    'REFIT': ('True or False', lambda v: isinstance(v, bool), KEY),
    'SEED': ('an int >= 0', lambda v: _is_int(v) and v >= 0, KEY),
    'DEVICE': ("one of 'auto', 'cpu', 'cuda'", lambda v: v in ('auto', 'cpu', 'cuda')),
    'NUM_THREADS': ('an int >= 0', lambda v: _is_int(v) and v >= 0),
    'NUM_WORKERS': ('an int >= 0', lambda v: _is_int(v) and v >= 0),
    'PREFETCH_FACTOR': ('an int >= 1', lambda v: _is_int(v) and v >= 1),
    'ONNX_OPSET': ('an int in [18, 23]', lambda v: _is_int(v) and 18 <= v <= 23, KEY),
    'LATENCY_RUNS': ('an int >= 1', lambda v: _is_int(v) and v >= 1),
    'LEARNING_RATE': ('a number > 0', lambda v: _is_number(v) and v > 0, KEY2),
    'CHANNEL_SCALES': ('a non-empty list/tuple of ints >= 1',
                       lambda v: _is_seq(v) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v)),
    'FC_SCALES': ('a non-empty list/tuple of ints >= 1',
                  lambda v: _is_seq(v) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v)),
    'METRIC_TARGET': ('a number in (0, 100]', lambda v: _is_number(v) and 0 < v <= 100),
    'SIZE_TARGET_KB': ('a number > 0', lambda v: _is_number(v) and v > 0),
    'QUANTIZE_INT8': ('True or False', lambda v: isinstance(v, bool), KEY2),
    'INT8_REDUCE_RANGE': ('True or False', lambda v: isinstance(v, bool), KEY2),
    'QAT_EPOCHS': ('an int >= 0 (0 = no quantization-aware training)',
                   lambda v: _is_int(v) and v >= 0, KEY2),
    'PRUNE_FRACTIONS': ('a list/tuple of numbers in (0, 1), distinct in whole percent '
                        '(() = no pruned candidates)',
                        lambda v: _is_seq(v) and all(_is_number(f) and 0.005 <= f < 0.995 for f in v)
                        and len({round(100 * f) for f in v}) == len(v)),
    'PRUNE_EPOCHS': ('an int >= 0 (fine-tuning epochs after pruning)',
                     lambda v: _is_int(v) and v >= 0, KEY2),
    'TEMP_DIR': ('a non-empty path string', lambda v: _is_str(v) and v != ''),
    'FINAL_RESULT_DIR': ('a non-empty path string', lambda v: _is_str(v) and v != ''),
    'WORKERS': ("'auto' (every CPU core Ray sees) or an int >= 1 (1 = serial, in-process, no Ray)",
                lambda v: v == 'auto' or (_is_int(v) and v >= 1)),
    'RAY_ADDRESS': ("'' (a private local Ray instance), 'auto' or 'host:port' of a running cluster",
                    lambda v: _is_str(v) and (v in ('', 'auto') or (':' in v and ' ' not in v))),
}

# Settings added after results tables existed: at these values they compute exactly what
# ATML computed before they were added, so they stay out of the settings key there and the
# rows of an earlier version remain reusable (public.results.keys.settings_key).
INTRODUCED_AT = {'LABEL_MODE': 'multiclass', 'LABEL_SEPARATOR': '|', 'REFIT': False,
                 'QAT_EPOCHS': 0, 'PRUNE_FRACTIONS': (), 'PRUNE_EPOCHS': 3,
                 'INT8_REDUCE_RANGE': False}

# Settings that change nothing unless another one is on: out of the settings key while that
# one is off (a float-only stage two does not depend on how INT8 weights are quantized).
ONLY_WITH = {'INT8_REDUCE_RANGE': 'QUANTIZE_INT8'}

# The original ATML spelt LEARNING_RATE as LEARING_RATE; old params.py files keep working.
_ALIASES = {'LEARING_RATE': 'LEARNING_RATE'}


def trial_settings(stage=1):
    """The settings that make two trials the same trial (KEY; stage 2 adds KEY2)."""
    tags = (KEY,) if stage == 1 else (KEY, KEY2)
    return tuple(n for n, entry in _RULES.items() if len(entry) > 2 and entry[2] in tags)


def _check_value(name, value, source):
    rule, ok = _RULES[name][:2]
    if not ok(value):
        raise SettingsError(f"{source}: {name} must be {rule}, got {name}={value!r}")


def _cross_checks(s, source, overridden=()):
    def where(*names):
        """Where the settings of a rule came from: 'command line', the params file, or
        both ('command line (LR_MAX) and params.py (LR_MIN)')."""
        given = [n for n in names if n in overridden]
        if not given:
            return source
        if len(given) == len(names):
            return 'command line'
        rest = [n for n in names if n not in overridden]
        return f"command line ({', '.join(given)}) and {source} ({', '.join(rest)})"

    if s.LR_MIN > s.LR_MAX:
        raise SettingsError(f"{where('LR_MIN', 'LR_MAX')}: LR_MIN must be <= LR_MAX, got "
                            f"LR_MIN={s.LR_MIN!r} and LR_MAX={s.LR_MAX!r}")
    count = int((s.LR_MAX - s.LR_MIN) / s.STEP + 1e-9) + 1
    if count > MAX_GRID:
        raise SettingsError(f"{where('LR_MIN', 'LR_MAX', 'STEP')}: the learning-rate grid "
                            f"LR_MIN={s.LR_MIN!r} .. LR_MAX={s.LR_MAX!r} step STEP={s.STEP!r} "
                            f"has {count:,} values; at most {MAX_GRID:,} are allowed (raise "
                            f"STEP or narrow the range)")
    if s.TEST_DIR and os.path.abspath(s.TEST_DIR) == os.path.abspath(s.DATA_DIR):
        raise SettingsError(f"{where('TEST_DIR', 'DATA_DIR')}: TEST_DIR must be another folder "
                            f"than DATA_DIR (test metrics on training data mean nothing), got "
                            f"both {s.DATA_DIR!r}")
    if s.SELECT_ON == 'test' and not s.TEST_DIR:
        raise SettingsError(f"{where('SELECT_ON', 'TEST_DIR')}: SELECT_ON='test' needs a test "
                            f"set, got TEST_DIR=''")
    if (s.SELECT_METRIC == 'auc' and s.CLASSES and len(s.CLASSES) > 2
            and s.LABEL_MODE != 'multilabel'):
        raise SettingsError(f"{where('SELECT_METRIC', 'CLASSES')}: SELECT_METRIC='auc' is for "
                            f"binary and multi-label tasks (macro over the labels), got "
                            f"CLASSES={s.CLASSES!r} ({len(s.CLASSES)} classes)")
    if s.LABEL_MODE == 'multilabel' and len(s.CLASSES) < 2:
        raise SettingsError(f"{where('LABEL_MODE', 'CLASSES')}: LABEL_MODE='multilabel' needs "
                            f"CLASSES naming the labels (at least 2, e.g. ('NORM', 'MI', "
                            f"'STTC', 'CD', 'HYP')), got CLASSES={s.CLASSES!r}")
    if s.LABEL_MODE == 'multilabel' and s.SELECT_METRIC == 'abs_sum':
        raise SettingsError(f"{where('SELECT_METRIC', 'LABEL_MODE')}: SELECT_METRIC='abs_sum' is "
                            f"not defined for LABEL_MODE='multilabel'; use 'min4', 'f1', "
                            f"'accuracy' or 'auc' (macro over the labels)")
    if s.QAT_EPOCHS and not s.QUANTIZE_INT8:
        raise SettingsError(f"{where('QAT_EPOCHS', 'QUANTIZE_INT8')}: QAT_EPOCHS="
                            f"{s.QAT_EPOCHS!r} trains the INT8 model, so it needs "
                            f"QUANTIZE_INT8=True, got QUANTIZE_INT8={s.QUANTIZE_INT8!r}")
    if s.PAD_TOLERANCE >= s.INPUT_SIZE:
        raise SettingsError(f"{where('PAD_TOLERANCE', 'INPUT_SIZE')}: PAD_TOLERANCE must be < "
                            f"INPUT_SIZE, got PAD_TOLERANCE={s.PAD_TOLERANCE!r} and "
                            f"INPUT_SIZE={s.INPUT_SIZE!r}")
    if (len(set(s.CHANNEL_SCALES)) != len(s.CHANNEL_SCALES)
            or len(set(s.FC_SCALES)) != len(s.FC_SCALES)):
        raise SettingsError(f"{where('CHANNEL_SCALES', 'FC_SCALES')}: CHANNEL_SCALES and "
                            f"FC_SCALES must not repeat a value, got CHANNEL_SCALES="
                            f"{s.CHANNEL_SCALES!r}, FC_SCALES={s.FC_SCALES!r}")


def _unknown(name, source):
    close = difflib.get_close_matches(name, list(_RULES) + list(_ALIASES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return SettingsError(f"{source}: unknown setting {name}{hint}; known settings: "
                         f"{', '.join(_RULES)}")


def _module_settings(path):
    spec = importlib.util.spec_from_file_location('_atml_params', path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise SettingsError(f"{path}: cannot be executed: {type(exc).__name__}: {exc}") from exc
    return {k: v for k, v in vars(module).items() if k.isupper() and not k.startswith('_')}


def validate(values, source='params.py', overridden=()):
    """Check a {NAME: value} dict against the rules; return it as a namespace. A bad value
    of a setting in `overridden` is reported as coming from the command line."""
    values = dict(values)
    for alias, name in _ALIASES.items():
        if alias in values:
            if name in values and values[name] != values[alias]:
                raise SettingsError(f"{source}: both {name}={values[name]!r} and "
                                    f"{alias}={values[alias]!r} are set; keep one")
            values[name] = values.pop(alias)
    for name in values:
        if name not in _RULES:
            raise _unknown(name, source)
    missing = [n for n in _RULES if n not in values]
    if missing:
        raise SettingsError(f"{source}: missing setting(s) {', '.join(missing)}")
    for name in _RULES:
        _check_value(name, values[name], 'command line' if name in overridden else source)
    settings = SimpleNamespace(**{n: values[n] for n in _RULES})
    _cross_checks(settings, source, overridden)
    settings.POSITIVE_LABELS = tuple(settings.POSITIVE_LABELS)
    settings.CLASSES = tuple(settings.CLASSES)
    settings.MODELS = tuple(settings.MODELS)
    settings.VAL_FOLDS = tuple(settings.VAL_FOLDS)
    settings.CHANNEL_SCALES = tuple(settings.CHANNEL_SCALES)
    settings.FC_SCALES = tuple(settings.FC_SCALES)
    settings.PRUNE_FRACTIONS = tuple(sorted(settings.PRUNE_FRACTIONS))
    settings.PARAMS_PATH = None        # where they came from: set by load_settings
    settings.OVERRIDES = {}
    return settings


def parse_overrides(args):
    """['KEY=VALUE', ...] -> {KEY: literal}. VALUE is a Python literal, or a bare string."""
    overrides = {}
    for arg in args:
        key, sep, raw = arg.partition('=')
        key = key.lstrip('-')
        if not sep or not key:
            raise SettingsError(f"command line: expected KEY=VALUE, got {arg!r}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        overrides[_ALIASES.get(key, key)] = value
    return overrides


def load_settings(argv=(), params_path=None):
    """Settings from params.py (or --params PATH) plus KEY=VALUE overrides, validated."""
    argv = list(argv)
    if '--params' in argv:
        i = argv.index('--params')
        if i + 1 >= len(argv):
            raise SettingsError("command line: --params needs a path")
        params_path = argv[i + 1]
        del argv[i:i + 2]
    params_path = params_path or os.path.join(os.getcwd(), 'params.py')
    if not os.path.isfile(params_path):
        raise SettingsError(f"{params_path}: settings file not found (run from the project "
                            f"folder, or pass --params PATH)")
    values = _module_settings(params_path)
    source = os.path.basename(params_path)
    overrides = parse_overrides(argv)
    for name in overrides:
        if name not in _RULES:
            raise _unknown(name, 'command line')
        for alias, canonical in _ALIASES.items():
            if canonical == name:          # an override replaces the file's misspelt alias too
                values.pop(alias, None)
    values.update(overrides)
    settings = validate(values, source, overridden=set(overrides))
    settings.PARAMS_PATH = os.path.abspath(params_path)
    settings.OVERRIDES = overrides
    return settings


def source_of(settings, name):
    """Where setting `name` of loaded settings came from, as messages name it: 'command
    line' for a KEY=VALUE override, else the settings file's name ('params.py')."""
    if name in settings.OVERRIDES:
        return 'command line'
    path = settings.PARAMS_PATH
    return os.path.basename(path) if path else 'params.py'


def settings_dict(settings):
    """The validated settings as a plain {NAME: value} dict (for result folders)."""
    return {n: getattr(settings, n) for n in _RULES}


def write_settings(settings, path):
    """Write the resolved settings as a params.py-style file (reproducible result folders)."""
    with open(path, 'w') as f:
        f.write('# Settings this result was produced with (resolved params.py + overrides)\n')
        for name, value in settings_dict(settings).items():
            f.write(f"{name} = {value!r}\n")
