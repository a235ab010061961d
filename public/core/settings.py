"""Settings: load params.py, apply command-line overrides, validate everything up front.

    settings = load_settings(argv)          # params.py next to the cwd, or --params PATH

Overrides are `KEY=VALUE` arguments (VALUE a Python literal); only known settings are
accepted and the value's type is checked like any other. Every setting's default, rule
and doc live in one table, `SETTINGS`, which the check, its message, `--help`, the shipped
params.py and docs/settings.md all use. A bad setting raises `SettingsError`
naming the file, the setting, the rule and the value, before any work starts.
"""
import ast
import difflib
import importlib.util
import math
import os
from types import SimpleNamespace
from typing import Callable, NamedTuple


from public.core.errors import SettingsError  # noqa: F401  (re-exported: the settings API)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_str(v):
    return isinstance(v, str)


def _is_seq(v):
    return isinstance(v, (list, tuple))


# AUGMENT's named augmentations, in the order they are applied (and drawn, whatever order the
# tuple names them in), with the level each has unless written 'name=level': scale = amplitude
# x U(1 - level, 1 + level), noise = Gaussian noise of level x the segment's std, wander =
# baseline wander of level x std, shift = circular shift up to +/- level x length, flip =
# polarity inversion (x -1, all leads) with probability level. True = the first four.
AUGMENTATIONS = {'scale': 0.2, 'noise': 0.05, 'wander': 0.1, 'shift': 0.1, 'flip': 0.5}
AUGMENT_TRUE = ('scale', 'noise', 'wander', 'shift')


def augment_levels(value):
    """AUGMENT's value as {name: level or None (the default level)} in application order:
    True -> today's four, False -> {}; None when the value is not valid."""
    if isinstance(value, bool):
        return dict.fromkeys(AUGMENT_TRUE) if value else {}
    if not _is_seq(value) or not value:
        return None
    given = {}
    for item in value:
        if not _is_str(item):
            return None
        name, sep, level = (part.strip() for part in item.partition('='))
        if name not in AUGMENTATIONS or name in given:
            return None
        if sep:
            try:
                level = float(level)
            except ValueError:
                return None
            if not (math.isfinite(level) and 0 < level <= 1):
                return None
        given[name] = level if sep else None
    return {n: given[n] for n in AUGMENTATIONS if n in given}


KEY, KEY2 = 'key', 'key2'     # tags of the rules table (see below)
# SELECT_METRIC's values; the last four need a binary task (they score AF, class 1).
SELECT_METRICS = ('min4', 'f1', 'accuracy', 'auc', 'abs_sum', 'fbeta', 'subj_fbeta', 'gen',
                  'contest')
BINARY_METRICS = ('fbeta', 'subj_fbeta', 'gen', 'contest')
MAX_GRID = 10_000             # learning rates a stage-one grid may hold


class Setting(NamedTuple):
    """One setting: everything ATML knows about it, in one place."""
    name: str
    default: object         # the value params.py ships with
    section: str            # params.py's section
    doc: str                # one line: params.py's comment, --help's line
    rule: str               # what a valid value is, as error messages state it
    check: Callable         # the rule as a predicate
    key: str = ''           # KEY / KEY2: part of the settings key of a results row (below)
    detail: str = ''        # the reference's longer text (docs/settings.md), '' = doc


# THE settings table. Validation, `--help`, the shipped params.py and docs/settings.md all
# come from it (tools/write_settings_docs.py writes the two files; tests/test_settings_table.py
# fails when they are out of date). Order: params.py's, which is also the order of checking.
# KEY marks a setting that changes what a trial computes (its data, training or scoring):
# the settings key of a results row is derived from the KEY settings (trial_settings()),
# so a run with another value of one of them never reuses that row. KEY2 marks settings
# that change only stage two's trials. tests/test_bookkeeping.py fails for an unmarked
# setting that is not listed there as not changing a trial.
SETTINGS = {s.name: s for s in (
    Setting('DATA_DIR', 'ttdata/train', 'data',
            'training folder (.txt files S<subject>-<RHYTHM>-<index>.txt); 20 % of its subjects validate',
            'a non-empty path string', lambda v: _is_str(v) and v != '', KEY,
            detail='training folder; `VAL_FRACTION` of its subjects validate'),
    Setting('TEST_DIR', 'ttdata/test', 'data',
            "test folder, other subjects; '' = no test set (only validation metrics)",
            "a path string ('' for no test set)", _is_str, KEY,
            detail="test folder (other subjects); `''` = none"),
    Setting('DATA_FORMAT', 'auto', 'data',
            "'auto' (folder -> 'txt', .csv -> 'csv', .npy/.npz -> 'numpy'), 'txt', 'csv', 'numpy'",
            "one of 'auto', 'txt', 'csv', 'numpy'", lambda v: v in ('auto', 'txt', 'csv', 'numpy'), KEY,
            detail="`'auto'` (folder → txt, `.csv` → csv, `.npy`/`.npz` → numpy), `'txt'`, `'csv'`, `'numpy'`"),
    Setting('INPUT_SIZE', 1250, 'data',
            'samples per segment (5 s at 250 Hz)',
            'an int >= 16', lambda v: _is_int(v) and v >= 16, KEY,
            detail='samples per segment'),
    Setting('PAD_TOLERANCE', 0, 'data',
            'segments shorter by at most this many samples are zero-padded (seed 002: 50)',
            'an int >= 0', lambda v: _is_int(v) and v >= 0, KEY,
            detail='segments shorter by at most this many samples are zero-padded at the end (seed 002: 50)'),
    Setting('SHORTER', 'error', 'data',
            "segments shorter beyond PAD_TOLERANCE: 'error' or 'exclude' (skipped and counted)",
            "one of 'error', 'exclude'", lambda v: v in ('error', 'exclude'), KEY,
            detail="shorter beyond the tolerance: `'error'`, or `'exclude'` (skipped, counted in a warning)"),
    Setting('LONGER', 'error', 'data',
            "segments longer than INPUT_SIZE: 'error' or 'crop' (first INPUT_SIZE samples)",
            "one of 'error', 'crop'", lambda v: v in ('error', 'crop'), KEY,
            detail="longer than `INPUT_SIZE`: `'error'`, or `'crop'` (first `INPUT_SIZE` samples)"),
    Setting('POSITIVE_LABELS', ('AFIB',), 'data',
            'binary task: rhythms labelled 1 (AF); every other rhythm, empty included, is 0',
            'a non-empty list/tuple of rhythm strings', lambda v: _is_seq(v) and len(v) > 0 and all(_is_str(s) for s in v), KEY,
            detail='binary task: rhythms labelled 1'),
    Setting('CLASSES', (), 'data',
            'multi-class task: class names/integers in label order, e.g. (0, 1, 2, 3); () = binary',
            'a list/tuple of distinct class names (str) or ints: () for binary, else >= 2', lambda v: _is_seq(v) and (len(v) == 0 or len(v) >= 2)
                and all(isinstance(c, (str, int)) and not isinstance(c, bool) for c in v)
                and len({str(c) for c in v}) == len(v), KEY,
            detail='multi-class task: class names or integers in label order, e.g. `(0, 1, 2, 3)`; models get `len(CLASSES)` outputs'),
    Setting('LABEL_MODE', 'multiclass', 'data',
            "'multiclass': one label per segment (binary, or CLASSES); 'multilabel': a set of CLASSES per segment (seed 004, sigmoid outputs)",
            "one of 'multiclass', 'multilabel'", lambda v: v in ('multiclass', 'multilabel'), KEY,
            detail="`'multiclass'`: one label per segment (binary via `POSITIVE_LABELS`, or one of `CLASSES`); `'multilabel'`: a set of `CLASSES` per segment (seed 004), sigmoid outputs, BCE loss, macro metrics. Needs `CLASSES`"),
    Setting('LABEL_SEPARATOR', '|', 'data',
            "multilabel: joins a segment's labels in a CSV label column, e.g. 'NORM|MI'",
            'a non-empty string (joins the labels of one multi-label segment)', lambda v: _is_str(v) and v != '', KEY,
            detail="multi-label: joins a segment's labels in a CSV label column (`NORM\\|MI`)"),
    Setting('VAL_FRACTION', 0.2, 'data',
            'fraction of training subjects held out for validation, in (0, 1)',
            'a number in (0, 1)', lambda v: _is_number(v) and 0 < v < 1, KEY,
            detail='fraction of training subjects held out, in (0, 1)'),
    Setting('VAL_FOLDS', (), 'data',
            "predefined folds instead: validate on these values of the data's 'fold' column/array (PTB-XL: (9,)); () = by subject",
            'a list/tuple of fold values (str or int); () = split by subject', lambda v: _is_seq(v) and all(isinstance(f, (str, int)) and not isinstance(f, bool)
                                               for f in v), KEY,
            detail="validate on these values of the data's `fold` column/array instead (PTB-XL's `strat_fold`: `(9,)` or `(9, 10)`); `()` = split by subject"),
    Setting('SKIP_BAD_FILES', False, 'data',
            'False: a bad data file stops the run; True: it is skipped and counted',
            'True or False', lambda v: isinstance(v, bool), KEY,
            detail='skip and count bad files instead of stopping'),
    Setting('CACHE_DIR', '.atml-cache', 'data',
            'parsed data folders are cached here (invalidated when a folder changes)',
            'a non-empty path string', lambda v: _is_str(v) and v != '',
            detail='parsed-folder cache'),
    Setting('LR_MIN', 0.0015, 'stage one search',
            'first learning rate of the grid',
            'a number > 0', lambda v: _is_number(v) and v > 0,
            detail='learning-rate grid, inclusive, exact decimal steps'),
    Setting('LR_MAX', 0.0050, 'stage one search',
            'last learning rate of the grid (inclusive)',
            'a number > 0', lambda v: _is_number(v) and v > 0),
    Setting('STEP', 0.0005, 'stage one search',
            'grid step; > 0',
            'a number > 0', lambda v: _is_number(v) and v > 0),
    Setting('AVOID_FILE_PATH', 'avoid.txt', 'stage one search',
            'pruned learning rates; candidates within 2*STEP of an entry are skipped',
            'a non-empty path string', lambda v: _is_str(v) and v != '',
            detail='pruned learning rates'),
    Setting('AVOID_PARAM', 0.80, 'stage one search',
            'a trial whose worst metric (min of F1/acc/precision/recall) is below this prunes its rate',
            'a number in [0, 1]', lambda v: _is_number(v) and 0 <= v <= 1,
            detail='a trial whose worst metric is below this prunes its rate (and neighbours within 2·STEP)'),
    Setting('STAGE1_TARGET', 97, 'stage one search',
            "a model's search ends once yy (int(100*min metric)) reaches this, 0..100",
            'an int in [0, 100]', lambda v: _is_int(v) and 0 <= v <= 100,
            detail="a model's search ends once yy reaches this"),
    Setting('SELECT_ON', 'val', 'stage one search',
            "split that drives pruning, best model and stop: 'val' or 'test' (the original)",
            "one of 'val', 'test'", lambda v: v in ('val', 'test'), KEY,
            detail="split that drives pruning, best model, stop and targets: `'val'` or `'test'` (the original)"),
    Setting('SELECT_METRIC', 'min4', 'stage one search',
            "score that drives them: 'min4' (min of F1/acc/precision/recall, the original), 'f1', 'accuracy', 'auc' (binary), 'abs_sum' (as 1 - abs_sum/2); binary tasks also 'fbeta', 'subj_fbeta', 'gen', 'contest' (docs/contest-scoring.md)",
            "one of " + ', '.join(repr(m) for m in SELECT_METRICS), lambda v: v in SELECT_METRICS, KEY,
            detail="score that drives them: `'min4'` (min of F1/accuracy/precision/recall, the original), `'f1'`, `'accuracy'`, `'auc'` (binary), `'abs_sum'` (seed 003, as 1 − abs_sum/2); binary tasks also `'fbeta'` (pooled F-beta), `'subj_fbeta'` (mean over subjects of their F-beta), `'gen'` (share of subjects with F-beta > `GEN_THRESHOLD`), `'contest'` (normalised `CONTEST` score, latency and size included; see [contest scoring](contest-scoring.md)); compared with `AVOID_PARAM` (0..1), `STAGE1_TARGET` and `METRIC_TARGET` (percent)"),
    Setting('FBETA_BETA', 2.0, 'stage one search',
            'beta of the F-beta metrics (fbeta, subj_fbeta, gen, contest); 2 = recall weighs 4x precision, as both contests',
            'a number > 0', lambda v: _is_number(v) and v > 0, KEY,
            detail='beta of the F-beta metrics (binary tasks); 2 = the contests\' (recall weighs four times precision)'),
    Setting('NO_AF_SUBJECT', 'contest', 'stage one search',
            "F-beta of a subject without AF (0/0): 'contest' (1.0, the contests' scoring code), 'accuracy' (its share of segments predicted non-AF), 'skip' (left out)",
            "one of 'contest', 'accuracy', 'skip'", lambda v: v in ('contest', 'accuracy', 'skip'), KEY,
            detail="per-subject F-beta/F1 of a subject with no AF segment, where the formula is 0/0: `'contest'` = 1.0 whatever was predicted (the contests' evaluation helpers), `'accuracy'` = its accuracy (false alarms cost in proportion), `'skip'` = left out of the averages and of G. See [contest scoring](contest-scoring.md)"),
    Setting('GEN_THRESHOLD', 0.9, 'stage one search',
            "gen = share of subjects whose F-beta is > this (IESD-2024's G: 0.9)",
            'a number in [0, 1)', lambda v: _is_number(v) and 0 <= v < 1, KEY,
            detail="the generalisation score `gen` is the share of subjects whose F-beta is strictly above this (IESD-2024's G uses 0.9)"),
    Setting('CONTEST', 'iesd2024', 'stage one search',
            "contest whose score is the 'contest' metric: 'iesd2024' (25 Fb + 15 G + 35 L + 5 M) or 'tdc2022' (100 Fb + 20 L + 20 M)",
            "one of 'iesd2024', 'tdc2022'", lambda v: v in ('iesd2024', 'tdc2022'), KEY,
            detail="the contest whose score (divided by its maximum, so in [0, 1]) is the `contest` metric: `'iesd2024'` = 25·Fβn + 15·Gn + 35·Ln + 5·Mn (subject-averaged F-beta), `'tdc2022'` = 100·Fβ + 20·Ln + 20·Mn (pooled); L = the latency of `CONTEST_LATENCY` (MACs / `MACS_PER_MS` by default), M = the ONNX file in KiB (the INT8 file's with `QUANTIZE_INT8`). See [contest scoring](contest-scoring.md)"),
    Setting('LATENCY_SCALE', 1.0, 'stage one search',
            "CONTEST_LATENCY='measured': the measured onnxruntime latency times this is the contest's latency (this machine -> the target board)",
            'a number > 0', lambda v: _is_number(v) and v > 0, KEY,
            detail="with `CONTEST_LATENCY='measured'`: the contest score's latency term uses the measured onnxruntime latency (this machine, 1 thread) times this: the ratio of the target board's latency to this machine's"),
    Setting('CONTEST_LATENCY', 'macs', 'stage one search',
            "the contest score's latency: 'macs' (the graph's MACs / MACS_PER_MS: the same on every run, so the answer does not depend on timing) or 'measured' (onnxruntime on this machine x LATENCY_SCALE: varies with the machine's load)",
            "one of 'macs', 'measured'", lambda v: v in ('macs', 'measured'), KEY,
            detail="the latency L of the `contest` score: `'macs'` = the exported graph's multiply-accumulates per segment divided by `MACS_PER_MS` (a deterministic model of the board: two runs, serial or parallel, score a trial the same); `'measured'` = the onnxruntime latency on this machine (batch 1, one thread) × `LATENCY_SCALE`, which moves with the machine's load, so a search selecting on `'contest'` may then pick differently from run to run. See [contest scoring](contest-scoring.md)"),
    Setting('MACS_PER_MS', 100000, 'stage one search',
            "CONTEST_LATENCY='macs': the target board's multiply-accumulates per millisecond (latency = MACs / this)",
            'a number > 0', lambda v: _is_number(v) and v > 0, KEY,
            detail="with `CONTEST_LATENCY='macs'`: the target board's throughput in multiply-accumulates per millisecond, latency = MACs / this. The default (10⁵, i.e. 100 MMAC/s) is an assumption of the order of a few-hundred-MHz embedded core running plain C; calibrate it once: a model's `macs` (results row) / its latency on the board in ms"),
    Setting('SCHEDULER', 'grid', 'stage one search',
            "'grid' (the original: every candidate to its early stop) or 'halving' (successive halving over each model's rates, docs/schedulers.md)",
            "one of 'grid', 'halving'", lambda v: v in ('grid', 'halving'), KEY,
            detail="`'grid'` = the original search: every candidate trains to its early stop or `NUM_EPOCHS`. `'halving'` = successive halving over each model's learning rates (and stage two's feasible candidates): all train `HALVING_MIN_EPOCHS` epochs, the best 1/`HALVING_ETA` by the selection score continue from their checkpoints to ×`HALVING_ETA` the epochs, and so on up to `NUM_EPOCHS`; the others are recorded `stopped`. Promotion is decided on complete rungs, so the answer does not depend on timing. See [schedulers](schedulers.md)"),
    Setting('HALVING_MIN_EPOCHS', 3, 'stage one search',
            "SCHEDULER='halving': epochs of the first rung (r); rungs are r, r*eta, r*eta^2, ... up to NUM_EPOCHS",
            'an int >= 1', lambda v: _is_int(v) and v >= 1, KEY,
            detail="with `SCHEDULER='halving'`: the epochs every candidate trains in the first rung (r); rung k trains to r·η^k epochs in all, the last rung to `NUM_EPOCHS`"),
    Setting('HALVING_ETA', 3, 'stage one search',
            "SCHEDULER='halving': the reduction factor (eta): the best 1/eta of a rung go on, with eta times the epochs",
            'an int >= 2', lambda v: _is_int(v) and v >= 2, KEY,
            detail="with `SCHEDULER='halving'`: the reduction factor η: the best ⌈n/η⌉ of a rung's n candidates that can go on are promoted, with η times the epochs"),
    Setting('MODELS', (), 'stage one search',
            'model names to search, in order; () = every model of public/model.py',
            'a list/tuple of registered model names (() = all of public/model.py)', lambda v: _is_seq(v) and all(_is_str(m) for m in v),
            detail='model names to search, in order; `()` = every model of `public/model.py` (the seed models `SEResNet1d`, `HeartbeatCNN` are chosen by name)'),
    Setting('MODEL_SAVE_PATH', 'multi-result', 'stage one search',
            'stage-one results: results.csv, summary.csv and one folder per model',
            'a non-empty path string', lambda v: _is_str(v) and v != '',
            detail='stage-one results'),
    Setting('RESUME', True, 'stage one search',
            'True: a rerun continues the previous search; False: start fresh (old results archived)',
            'True or False', lambda v: isinstance(v, bool),
            detail="`False` starts fresh: earlier results are moved to `multi-result-archive-<time>/`, the search's avoid.txt lines (those tagged `# atml:`) dropped, yours kept"),
    Setting('NUM_EPOCHS', 30, 'training (both stages)',
            'maximum epochs per trial',
            'an int >= 1', lambda v: _is_int(v) and v >= 1, KEY,
            detail='maximum epochs per trial'),
    Setting('BATCH_SIZE', 32, 'training (both stages)',
            'training batch size',
            'an int >= 2 (BatchNorm needs 2 samples)', lambda v: _is_int(v) and v >= 2, KEY,
            detail='training batch'),
    Setting('PATIENCE', 5, 'training (both stages)',
            'epochs without validation-loss improvement before early stopping may fire',
            'an int >= 1', lambda v: _is_int(v) and v >= 1, KEY,
            detail='epochs without val-loss improvement before early stopping may fire'),
    Setting('OVERFIT_GAP', 0.01, 'training (both stages)',
            "... and only if train loss < val loss - OVERFIT_GAP (the original's rule)",
            'a number >= 0', lambda v: _is_number(v) and v >= 0, KEY,
            detail='... and only if train loss < val loss − gap'),
    Setting('WEIGHT_DECAY', 1e-3, 'training (both stages)',
            'AdamW weight decay',
            'a number >= 0', lambda v: _is_number(v) and v >= 0, KEY,
            detail='AdamW weight decay'),
    Setting('SEED', 42, 'training (both stages)',
            'seed of every trial (initialisation, shuffling, split, augmentation)',
            'an int >= 0', lambda v: _is_int(v) and v >= 0, KEY,
            detail='seed of initialisation, shuffling, the split and augmentation'),
    Setting('AUGMENT', True, 'training (both stages)',
            "True (measured default, docs/recipe.md): label-preserving augmentations per batch (amplitude, noise, baseline wander, time shift); or a tuple of names from 'scale', 'noise', 'wander', 'shift', 'flip', each optionally 'name=level', e.g. ('scale', 'noise=0.15', 'wander', 'shift', 'flip')",
            "True, False, or a non-empty list/tuple of distinct names from 'scale', 'noise', 'wander', 'shift', 'flip', each optionally written 'name=level' with a level in (0, 1] (e.g. 'noise=0.15')",
            lambda v: augment_levels(v) is not None, KEY,
            detail="label-preserving augmentations drawn per batch on the device, seeded: amplitude ×U(0.8, 1.2), noise (5 % of the segment's std), baseline wander (0.05–0.5 Hz, 10 % of std), circular time shift up to ±10 % (per lead for multi-lead data; the shift keeps leads aligned). `False` = the original recipe. A tuple chooses them by name, with an optional level: `'scale'` (×U(1 − level, 1 + level), 0.2), `'noise'` (level × std, 0.05; the TDC-2022/IESD winners' stronger noise is `'noise=0.15'`), `'wander'` (level × std, 0.1), `'shift'` (up to ± level × length, 0.1), `'flip'` (polarity inversion: each segment, all leads together, × −1 with probability level, 0.5). They are applied in that order whatever the tuple's order, so `('scale', 'noise', 'wander', 'shift')` draws exactly what `True` draws. See [recipe](recipe.md)"),
    Setting('CALIBRATE_THRESHOLD', False, 'training (both stages)',
            "True (binary tasks): the decision threshold that maximises SELECT_METRIC on validation is chosen after training and folded into the last layer's bias (the ONNX argmax is the calibrated decision)",
            'True or False', lambda v: isinstance(v, bool), KEY,
            detail="`True` (binary tasks only; refused for `CLASSES` of more than 2 and for `LABEL_MODE='multilabel'`): after training (and pruning), the threshold t on P(AF) that maximises `SELECT_METRIC` on the validation split is chosen (candidates: midpoints between validation probabilities at up to 200 quantiles, and 0.5; ties go to the one nearest 0.5; `'auc'` and `'abs_sum'`, which a threshold does not decide, choose it by `'min4'`) and folded into the bias of the model's last `nn.Linear`: class 1's bias − log(t / (1 − t)), so argmax of the logits, of saved.onnx and of predict.py is the decision P(AF) > t, with no post-processing. Every metric, INT8 and QAT start from the calibrated model; REFIT's retrained model is not calibrated (it has no validation split). The threshold is recorded in result.json (`decision_threshold`) and evaluation_metrics.txt. See [recipe](recipe.md)"),
    Setting('NORMALIZE', 'none', 'training (both stages)',
            "'segment': each segment and lead standardised by the model itself (inside the exported ONNX)",
            "one of 'none', 'segment'", lambda v: v in ('none', 'segment'), KEY,
            detail="`'segment'`: the model standardises each segment and lead itself (a forward pre-hook, so it is inside the exported ONNX, which takes the raw signal; the state dict is unchanged)"),
    Setting('CLASS_WEIGHTS', 'none', 'training (both stages)',
            "'balanced': loss weights inversely proportional to the training class counts",
            "one of 'none', 'balanced'", lambda v: v in ('none', 'balanced'), KEY,
            detail="`'balanced'`: cross-entropy weights n / (classes × count) from the training labels (multi-label: per-label positive weights, negatives / positives)"),
    Setting('REFIT', False, 'training (both stages)',
            'True: the chosen model is retrained on all training subjects (train + validation) for the epochs validation chose, and delivered',
            'True or False', lambda v: isinstance(v, bool), KEY,
            detail="`True`: after a trial has trained and been scored, a fresh model of the same architecture and seed is trained on **all** training subjects (train + validation) for the epochs validation chose (`best_epoch`), at the learning rates the validated run used in those epochs, and is what `saved.onnx` delivers (both stages). Every decision (pruning, best, targets) still uses the validation-chosen model, kept as `saved.val.onnx`; the refit model's test metrics are recorded beside (`refit` column, `evaluation_metrics.txt`). Only a trial that can be delivered is refit: one whose score reaches the best recorded for its model when it was dispatched (stage two: that, or `METRIC_TARGET`), so a serial search refits only its improvements; the refit is part of the trial (same row, same crash safety). See [recipe](recipe.md)"),
    Setting('LR_SCHEDULE', 'plateau', 'training (both stages)',
            "'plateau': ReduceLROnPlateau on val loss (patience 3, x0.5); 'cosine': cosine annealing over NUM_EPOCHS, per epoch",
            "one of 'plateau', 'cosine'", lambda v: v in ('plateau', 'cosine'), KEY,
            detail="`'plateau'` (the original): ReduceLROnPlateau on the validation loss (patience 3, factor 0.5). `'cosine'`: epoch e (1-based) trains at lr·(1 + cos(π·(e − 1)/`NUM_EPOCHS`))/2, whatever the halving budget (a trial continued from a rung equals an uninterrupted one). See [recipe](recipe.md)"),
    Setting('WEIGHT_AVERAGING', 'none', 'training (both stages)',
            "'ema': exponential moving average of the weights (decay 0.999, per batch); 'swa': equal average of the epochs after NUM_EPOCHS/2, BatchNorm recomputed; the average is validated, kept and exported",
            "one of 'none', 'ema', 'swa'", lambda v: v in ('none', 'ema', 'swa'), KEY,
            detail="`'ema'`: an exponential moving average of every weight and BatchNorm statistic, updated after each batch (decay min(0.999, (1 + t)/(10 + t)) after t updates); `'swa'`: stochastic weight averaging, the equal average of the weights at the end of each epoch after ⌊`NUM_EPOCHS`/2⌋, BatchNorm statistics recomputed on the training data. The averaged model is what each epoch validates (early stopping, ReduceLROnPlateau), keeps as the best weights, exports and scores (same state-dict keys: ONNX, INT8, pruning unchanged); with `'swa'` the plain model is validated until the averaging starts, and a trial that stops earlier keeps its plain weights. See [recipe](recipe.md)"),
    Setting('DISTILL_FROM', '', 'training (both stages)',
            "knowledge distillation from a teacher: '' = none; a stage-one result folder (multi-result/<Model>/<xx>-<yy>/, its saved.onnx); 'auto' = the best of MODEL_SAVE_PATH/summary.csv",
            "'' (no distillation), 'auto' or a path string of a result folder holding saved.onnx", _is_str, KEY,
            detail="knowledge distillation: `''` = none; a result folder holding `saved.onnx` (e.g. `multi-result/AFNet/97-95`); `'auto'` = the folder of stage one's recommended pick in `MODEL_SAVE_PATH`/summary.csv (best score, ties to the smaller ONNX). The teacher's logits on the training segments are computed once with onnxruntime and cached in `CACHE_DIR`/teacher/ (keyed by the ONNX file's and the data's hashes); the loss is (1 − w)·task + w·T²·KL(teacher/T ‖ student/T). One label per segment only (not `LABEL_MODE='multilabel'`), not with `REFIT`. See [recipe](recipe.md)"),
    Setting('DISTILL_TEMPERATURE', 4.0, 'training (both stages)',
            'with DISTILL_FROM: the softmax temperature T of the distillation term',
            'a number > 0', lambda v: _is_number(v) and v > 0, KEY,
            detail='with `DISTILL_FROM`: the temperature T of both softmaxes of the distillation term (scaled by T²)'),
    Setting('DISTILL_WEIGHT', 0.5, 'training (both stages)',
            'with DISTILL_FROM: the weight w of the distillation term, (1 - w) the task loss\'s; 0..1',
            'a number in [0, 1]', lambda v: _is_number(v) and 0 <= v <= 1, KEY,
            detail="with `DISTILL_FROM`: the weight w of the distillation term; the task loss weighs 1 − w (0 = plain training)"),
    Setting('DEVICE', 'auto', 'training (both stages)',
            "'auto' (cuda if available), 'cpu' or 'cuda'",
            "one of 'auto', 'cpu', 'cuda'", lambda v: v in ('auto', 'cpu', 'cuda'),
            detail="`'auto'`, `'cpu'` or `'cuda'`"),
    Setting('NUM_THREADS', 1, 'training (both stages)',
            "torch CPU threads; 0 = torch's default (all cores). 1 is fastest for these tiny nets on a shared machine (bench/README.md)",
            'an int >= 0', lambda v: _is_int(v) and v >= 0,
            detail='torch CPU threads (0 = torch default); see Speed'),
    Setting('NUM_WORKERS', 0, 'training (both stages)',
            'kept for compatibility with the original; data is served from memory, so unused',
            'an int >= 0', lambda v: _is_int(v) and v >= 0,
            detail='accepted for compatibility with the original; unused (data is served from memory)'),
    Setting('PREFETCH_FACTOR', 2, 'training (both stages)',
            'kept for compatibility with the original; unused (see NUM_WORKERS)',
            'an int >= 1', lambda v: _is_int(v) and v >= 1),
    Setting('ONNX_OPSET', 18, 'export',
            'ONNX opset of exported models, 18..23',
            'an int in [18, 23]', lambda v: _is_int(v) and 18 <= v <= 23, KEY,
            detail='ONNX opset, 18..23'),
    Setting('LATENCY_RUNS', 200, 'export',
            'onnxruntime single-segment runs timed for the latency figure (median)',
            'an int >= 1', lambda v: _is_int(v) and v >= 1,
            detail='onnxruntime runs timed for the latency (median, batch 1, 1 thread)'),
    Setting('LEARNING_RATE', 0.003, 'stage two',
            "fixed stage-two learning rate (the original's LEARING_RATE is accepted too)",
            'a number > 0', lambda v: _is_number(v) and v > 0, KEY2,
            detail="stage-two learning rate (the original's `LEARING_RATE` is accepted)"),
    Setting('CHANNEL_SCALES', (1, 2, 3, 4, 5), 'stage two',
            'conv channel scaling factors tried',
            'a non-empty list/tuple of ints >= 1', lambda v: _is_seq(v) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v),
            detail='stage-two scaling factors'),
    Setting('FC_SCALES', (1, 2, 3, 4, 5), 'stage two',
            'hidden FC width scaling factors tried',
            'a non-empty list/tuple of ints >= 1', lambda v: _is_seq(v) and len(v) > 0 and all(_is_int(s) and s >= 1 for s in v)),
    Setting('METRIC_TARGET', 90, 'stage two',
            'percent; the minimum of F1/accuracy/precision/recall must reach it',
            'a number in (0, 100]', lambda v: _is_number(v) and 0 < v <= 100,
            detail='percent; the minimum of F1/accuracy/precision/recall must reach it'),
    Setting('SIZE_TARGET_KB', 60, 'stage two',
            'ONNX file size cap in KB (1 KB = 1024 bytes)',
            'a number > 0', lambda v: _is_number(v) and v > 0,
            detail='ONNX size cap, KB = 1024 bytes'),
    Setting('LATENCY_TARGET_MS', 0, 'stage two',
            'onnxruntime latency cap in ms (batch 1, one thread), measured on the untrained candidate before training; 0 = none',
            'a number >= 0 (0 = no latency target)', lambda v: _is_number(v) and v >= 0,
            detail="latency cap (ms; onnxruntime, batch 1, one thread, median of `LATENCY_RUNS`), measured on each candidate's untrained probe before training (the INT8 probe with `QUANTIZE_INT8`): candidates over it are recorded `over-latency` and never trained; 0 = none. See [stage two](stage-two.md)"),
    Setting('RAM_TARGET_KB', 0, 'stage two',
            'peak activation memory cap in KB from the exported graph (INT8 figure with QUANTIZE_INT8), checked before training; 0 = none',
            'a number >= 0 (0 = no memory target)', lambda v: _is_number(v) and v >= 0,
            detail="peak activation memory cap (KB = 1024 bytes; the largest total size of tensors alive at once, `public/compress/graph_stats.py`; the INT8 figure with `QUANTIZE_INT8`), checked on each candidate's probe before training: candidates over it are recorded `over-ram` and never trained; 0 = none"),
    Setting('CANDIDATE_ORDER', 'smallest', 'stage two',
            "order candidates are trained in: 'smallest' (ONNX size) or 'fastest' (probe latency) first",
            "one of 'smallest', 'fastest'", lambda v: v in ('smallest', 'fastest'),
            detail="order in which feasible candidates are trained: `'smallest'` (predicted ONNX size, the original) or `'fastest'` (probe latency) first"),
    Setting('QUANTIZE_INT8', False, 'stage two',
            'True: also build an INT8 ONNX (onnxruntime static quantization); its size and metrics decide',
            'True or False', lambda v: isinstance(v, bool), KEY2,
            detail="also quantize each trained candidate to INT8 (onnxruntime static quantization, QDQ, per-channel int8 weights, calibrated on 256 training segments); the INT8 file's size and measured metrics then decide"),
    Setting('INT8_REDUCE_RANGE', True, 'stage two',
            'True: INT8 weights in 7 bits, so the file computes the same on every CPU (x86 without VNNI saturates 8-bit weights); False: full 8-bit weights',
            'True or False', lambda v: isinstance(v, bool), KEY2,
            detail='with `QUANTIZE_INT8`: INT8 weights in 7 bits (onnxruntime\'s `reduce_range`), so the file computes the same on every CPU; `False` = full 8-bit weights, which onnxruntime\'s kernels on x86 CPUs without VNNI compute with saturated sums (see "INT8 on CPUs without VNNI")'),
    Setting('QAT_EPOCHS', 0, 'stage two',
            '> 0 (needs QUANTIZE_INT8): the INT8 model is fine-tuned this many epochs with fake quantization (quantization-aware training)',
            'an int >= 0 (0 = no quantization-aware training)', lambda v: _is_int(v) and v >= 0, KEY2,
            detail='> 0 (needs `QUANTIZE_INT8`): after float training, each candidate is fine-tuned this many epochs with fake quantization (quantization-aware training) and ITS INT8 file is the deliverable; the post-training INT8 figures are kept beside. See [stage two, QAT](stage-two.md)'),
    Setting('PRUNE_FRACTIONS', (), 'stage two',
            'e.g. (0.25, 0.5): pruned variants of each width are also candidates (whole channels removed by L1 norm)',
            'a list/tuple of numbers in (0, 1), distinct in whole percent '
                        '(() = no pruned candidates)', lambda v: _is_seq(v) and all(_is_number(f) and 0.005 <= f < 0.995 for f in v)
                        and len({round(100 * f) for f in v}) == len(v),
            detail='e.g. `(0.25, 0.5)`: pruned variants `c<C>-f<F>-p25`, `-p50` of every width pair are also stage-two candidates (whole channels / hidden units removed by L1 norm, physically smaller); values in (0, 1), distinct in whole percent. See [stage two](stage-two.md)'),
    Setting('PRUNE_EPOCHS', 3, 'stage two',
            'fine-tuning epochs after pruning',
            'an int >= 0 (fine-tuning epochs after pruning)', lambda v: _is_int(v) and v >= 0, KEY2,
            detail='fine-tuning epochs of a pruned candidate (0 = none)'),
    Setting('TEMP_DIR', 'temp', 'stage two',
            'stage-two work in progress',
            'a non-empty path string', lambda v: _is_str(v) and v != '',
            detail='work in progress'),
    Setting('FINAL_RESULT_DIR', '.', 'stage two',
            'the stage-two result folder <xx>-<yy>/ is written here (project root, as the original)',
            'a non-empty path string', lambda v: _is_str(v) and v != '',
            detail='where stage two writes `<xx>-<yy>/`'),
    Setting('WORKERS', 'auto', 'parallel search (Ray)',
            "concurrent trials: 'auto' = every CPU core Ray sees; 1 = serial, in-process, no Ray",
            "'auto' (every CPU core Ray sees) or an int >= 1 (1 = serial, in-process, no Ray)", lambda v: v == 'auto' or (_is_int(v) and v >= 1),
            detail="concurrent trials: `'auto'` = every CPU Ray sees (this machine's cores, or the cluster's); an int = that many; `1` = today's serial search, in-process, Ray never started. Each trial uses `NUM_THREADS` torch threads"),
    Setting('RAY_ADDRESS', '', 'parallel search (Ray)',
            "'' = a private local Ray instance; 'auto' or 'host:port' = a running cluster (env RAY_ADDRESS works too)",
            "'' (a private local Ray instance), 'auto' or 'host:port' of a running cluster", lambda v: _is_str(v) and (v in ('', 'auto') or (':' in v and ' ' not in v)),
            detail="`''` = a private local Ray instance (no dashboard, files under `temp/ray`, shut down at the end), or the cluster named by the environment variable `RAY_ADDRESS` when it is set; `'auto'` or `'host:port'` = attach to a running cluster"),
)}
# Settings added after results tables existed: at these values they compute exactly what
# ATML computed before they were added, so they stay out of the settings key there and the
# rows of an earlier version remain reusable (public.results.keys.settings_key).
INTRODUCED_AT = {'LABEL_MODE': 'multiclass', 'LABEL_SEPARATOR': '|', 'REFIT': False,
                 'QAT_EPOCHS': 0, 'PRUNE_FRACTIONS': (), 'PRUNE_EPOCHS': 3,
                 'INT8_REDUCE_RANGE': False, 'FBETA_BETA': 2.0, 'NO_AF_SUBJECT': 'contest',
                 'GEN_THRESHOLD': 0.9, 'CONTEST': 'iesd2024', 'LATENCY_SCALE': 1.0,
                 'SCHEDULER': 'grid', 'HALVING_MIN_EPOCHS': 3, 'HALVING_ETA': 3,
                 'CALIBRATE_THRESHOLD': False}
# The recipe levers of issue 20 (public/train/loop.py, public/train/distill.py), off here.
INTRODUCED_AT.update({'LR_SCHEDULE': 'plateau', 'WEIGHT_AVERAGING': 'none', 'DISTILL_FROM': '',
                      'DISTILL_TEMPERATURE': 4.0, 'DISTILL_WEIGHT': 0.5})
# Before CONTEST_LATENCY the contest score used the measured latency.
INTRODUCED_AT.update({'CONTEST_LATENCY': 'measured', 'MACS_PER_MS': 100000})

# Settings that change nothing unless another one is on: out of the settings key while that
# one is off (a float-only stage two does not depend on how INT8 weights are quantized).
# {setting: (the setting it depends on, the value that makes it count)}
ONLY_WITH = {'INT8_REDUCE_RANGE': ('QUANTIZE_INT8', True),
             'HALVING_MIN_EPOCHS': ('SCHEDULER', 'halving'),
             'HALVING_ETA': ('SCHEDULER', 'halving'),
             # The contest column only picks the answer when it is the selection metric;
             # elsewhere it is a figure beside the others, and rows of earlier versions
             # (scored on the measured latency) stay reusable.
             'CONTEST_LATENCY': ('SELECT_METRIC', 'contest'),
             'MACS_PER_MS': ('SELECT_METRIC', 'contest')}

# The original ATML spelt LEARNING_RATE as LEARING_RATE; old params.py files keep working.
_ALIASES = {'LEARING_RATE': 'LEARNING_RATE'}


def trial_settings(stage=1):
    """The settings that make two trials the same trial (KEY; stage 2 adds KEY2)."""
    tags = (KEY,) if stage == 1 else (KEY, KEY2)
    return tuple(n for n, entry in SETTINGS.items() if entry.key in tags)


def _check_value(name, value, source):
    rule, ok = SETTINGS[name].rule, SETTINGS[name].check
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
    if s.SELECT_METRIC in BINARY_METRICS and (s.CLASSES or s.LABEL_MODE == 'multilabel'):
        raise SettingsError(f"{where('SELECT_METRIC', 'CLASSES')}: SELECT_METRIC="
                            f"{s.SELECT_METRIC!r} scores AF detection, so it needs a binary task "
                            f"(CLASSES=() and LABEL_MODE='multiclass'), got CLASSES={s.CLASSES!r}, "
                            f"LABEL_MODE={s.LABEL_MODE!r}")
    if s.DISTILL_FROM and s.LABEL_MODE == 'multilabel':
        raise SettingsError(f"{where('DISTILL_FROM', 'LABEL_MODE')}: DISTILL_FROM="
                            f"{s.DISTILL_FROM!r} distils one label per segment (softmax KL), "
                            f"so it needs LABEL_MODE='multiclass', got LABEL_MODE="
                            f"{s.LABEL_MODE!r}; set DISTILL_FROM=''")
    if s.DISTILL_FROM and s.REFIT:
        raise SettingsError(f"{where('DISTILL_FROM', 'REFIT')}: DISTILL_FROM="
                            f"{s.DISTILL_FROM!r} and REFIT=True cannot be combined (the refit "
                            f"trains on the validation subjects too, which have no teacher "
                            f"logits); set REFIT=False or DISTILL_FROM=''")
    if s.QAT_EPOCHS and not s.QUANTIZE_INT8:
        raise SettingsError(f"{where('QAT_EPOCHS', 'QUANTIZE_INT8')}: QAT_EPOCHS="
                            f"{s.QAT_EPOCHS!r} trains the INT8 model, so it needs "
                            f"QUANTIZE_INT8=True, got QUANTIZE_INT8={s.QUANTIZE_INT8!r}")
    if s.PAD_TOLERANCE >= s.INPUT_SIZE:
        raise SettingsError(f"{where('PAD_TOLERANCE', 'INPUT_SIZE')}: PAD_TOLERANCE must be < "
                            f"INPUT_SIZE, got PAD_TOLERANCE={s.PAD_TOLERANCE!r} and "
                            f"INPUT_SIZE={s.INPUT_SIZE!r}")
    if s.CALIBRATE_THRESHOLD and (len(s.CLASSES) > 2 or s.LABEL_MODE == 'multilabel'):
        raise SettingsError(f"{where('CALIBRATE_THRESHOLD', 'CLASSES', 'LABEL_MODE')}: "
                            f"CALIBRATE_THRESHOLD=True chooses the threshold on P(class 1), so "
                            f"it needs a binary task (CLASSES=() or two classes, and "
                            f"LABEL_MODE='multiclass'), got CLASSES={s.CLASSES!r}, "
                            f"LABEL_MODE={s.LABEL_MODE!r}")
    if (len(set(s.CHANNEL_SCALES)) != len(s.CHANNEL_SCALES)
            or len(set(s.FC_SCALES)) != len(s.FC_SCALES)):
        raise SettingsError(f"{where('CHANNEL_SCALES', 'FC_SCALES')}: CHANNEL_SCALES and "
                            f"FC_SCALES must not repeat a value, got CHANNEL_SCALES="
                            f"{s.CHANNEL_SCALES!r}, FC_SCALES={s.FC_SCALES!r}")


def _unknown(name, source):
    close = difflib.get_close_matches(name, list(SETTINGS) + list(_ALIASES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return SettingsError(f"{source}: unknown setting {name}{hint}; known settings: "
                         f"{', '.join(SETTINGS)}")


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
        if name not in SETTINGS:
            raise _unknown(name, source)
    missing = [n for n in SETTINGS if n not in values]
    if missing:
        raise SettingsError(f"{source}: missing setting(s) {', '.join(missing)}")
    for name in SETTINGS:
        _check_value(name, values[name], 'command line' if name in overridden else source)
    settings = SimpleNamespace(**{n: values[n] for n in SETTINGS})
    _cross_checks(settings, source, overridden)
    settings.POSITIVE_LABELS = tuple(settings.POSITIVE_LABELS)
    settings.CLASSES = tuple(settings.CLASSES)
    settings.MODELS = tuple(settings.MODELS)
    settings.VAL_FOLDS = tuple(settings.VAL_FOLDS)
    settings.CHANNEL_SCALES = tuple(settings.CHANNEL_SCALES)
    settings.FC_SCALES = tuple(settings.FC_SCALES)
    if _is_seq(settings.AUGMENT):
        settings.AUGMENT = tuple(settings.AUGMENT)
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
            wanted = key.upper().replace('-', '_')
            close = (sorted((n for n in SETTINGS if n.endswith(wanted) or n.startswith(wanted)),
                            key=len)            # the plainest: EPOCHS -> NUM_EPOCHS
                     or difflib.get_close_matches(wanted, list(SETTINGS), n=1, cutoff=0.5))
            hint = (f", e.g. {close[0]}={SETTINGS[close[0]].default!r}" if close
                    else ", e.g. NUM_EPOCHS=3")
            raise SettingsError(f"command line: expected KEY=VALUE (a setting of params.py{hint}),"
                                f" got {arg!r}; `--help` lists the settings")
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
        if name not in SETTINGS:
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
    return {n: getattr(settings, n) for n in SETTINGS}


def write_settings(settings, path):
    """Write the resolved settings as a params.py-style file (reproducible result folders)."""
    with open(path, 'w') as f:
        f.write('# Settings this result was produced with (resolved params.py + overrides)\n')
        for name, value in settings_dict(settings).items():
            f.write(f"{name} = {value!r}\n")


# ----------------------------------------------------------------------------- generated files

_SECTION_RULE = 77          # width of params.py's section lines


def params_text():
    """The shipped params.py, written from the table (tools/write_settings_docs.py)."""
    head = ('"""ATML settings: one constant per line, a comment with the unit or the allowed values.\n\n'
            'Edit this file, then run `python train_multi.py` (stage one) or `python train_final.py`\n'
            '(stage two). Every setting is checked before any work starts (the table of\n'
            'public/core/settings.py holds the defaults, rules and docs; docs/settings.md is the\n'
            'reference); a bad one stops the run with a message naming it, its value and the rule.\n'
            'The defaults run the demo on the synthetic data in ttdata/.\n"""\n')
    lines, section = [head], None
    for s in SETTINGS.values():
        if s.section != section:
            section = s.section
            lines.append(f"\n# {'-' * _SECTION_RULE} {section}")
        assignment = f"{s.name} = {_literal(s.default)}"
        lines.append(f"{assignment:<32} # {s.doc}")
    return '\n'.join(lines) + '\n'


def _literal(value):
    """A default as params.py writes it (numbers as their shortest exact repr)."""
    return repr(value)


def settings_markdown():
    """docs/settings.md, written from the table (tools/write_settings_docs.py)."""
    out = ['# Settings (`params.py`)', '',
           'Generated from the table in `public/core/settings.py` by '
           '`python tools/write_settings_docs.py`; do not edit by hand. Every setting can be '
           'overridden for one run: `python train_multi.py KEY=VALUE` (a Python literal). '
           '"key" marks settings that are part of a results row\'s settings key: a run with '
           'another value never reuses that row (stage two: "key (stage two)").', '']
    section = None
    for s in SETTINGS.values():
        if s.section != section:
            section = s.section
            out += ['', f"## {section[:1].upper()}{section[1:]}", '',
                    '| setting | default | rule | meaning | key |', '|---|---|---|---|---|']
        key = {KEY: 'key', KEY2: 'key (stage two)'}.get(s.key, '')
        text = (s.detail or s.doc).replace('|', '\\|').replace('\\\\|', '\\|')
        out.append(f"| `{s.name}` | `{_literal(s.default)}` | {s.rule.replace('|', '/')} | "
                   f"{text} | {key} |")
    return '\n'.join(out) + '\n'


def help_text(settings=None, width=100):
    """Every setting with its current value (or default) and its doc line, by section."""
    lines, section = [], None
    for s in SETTINGS.values():
        if s.section != section:
            section = s.section
            lines.append(f"\n{section}:")
        value = getattr(settings, s.name) if settings is not None else s.default
        mark = '' if value == s.default else '  (changed; default ' + _literal(s.default) + ')'
        lines.append(f"  {s.name} = {_literal(value)}{mark}")
        doc = s.doc
        while doc:
            cut = doc if len(doc) <= width - 6 else doc[:doc.rfind(' ', 0, width - 6)]
            lines.append(f"      {cut}")
            doc = doc[len(cut):].strip()
    return '\n'.join(lines).lstrip('\n')
