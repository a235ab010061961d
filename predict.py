"""Predict with an exported ATML model: class probabilities for every segment of a data set.

    python predict.py multi-result/AFNet/97-95/saved.onnx ttdata/test
    python predict.py saved.onnx testA.csv --out submission.csv --snap
    python predict.py saved.onnx ecg.npz --batch 256

MODEL is an ONNX file with input [N, C, L, 1] and logits [N, K] (what ATML exports). DATA
is a folder of .txt segments, a .csv (id, heartbeat_signals[, label]) or a .npy/.npz file
(see public/data/loading.py); the segment length defaults to the model's
input length L, and a segment of another length is an error unless --pad-tolerance lets
a slightly short one be zero-padded. Labels in DATA, if any, are ignored.

The length policy the model was trained with (INPUT_SIZE, PAD_TOLERANCE, SHORTER, LONGER)
is read from params_used.py next to MODEL when it is there (every ATML result folder has
one), so a model trained with PAD_TOLERANCE=50 accepts 4,950-sample segments without
flags; --input-size, --pad-tolerance, --shorter and --longer still override it.

The output CSV has one row per segment, `id,label_0,...,label_{K-1},label`: the softmax
of the logits (4 decimals) and the predicted class (the argmax: its CLASSES name when
params_used.py names the classes, else its index). A multi-label model
(LABEL_MODE='multilabel' in params_used.py beside it, or --multilabel) gets one
independent sigmoid probability per label instead, in columns named by its CLASSES
(`id,NORM,MI,STTC,CD,HYP,label`); a label is present where p >= 0.5, and `label` joins the
present ones with LABEL_SEPARATOR ('NORM|MI'; '' for none). id = the file name for a
folder, the id column of a CSV, the id array or the row index of a .npy/.npz. --snap
rounds confident probabilities as seed 003 did for the abs-sum metric: p < 0.1 -> 0,
p > 0.9 -> 1 (rows then no longer sum to exactly 1).

When DATA is labelled (the rhythm in the file names, a CSV label column), the metrics
(F1, accuracy, precision, recall, the confusion counts) and the per-subject table (worst
first, at most 15 lines) are printed after the CSV is written. The label text becomes a
class as in training: one of CLASSES, else 1 for POSITIVE_LABELS (read from
params_used.py beside the model) and 0 for the rest.
Errors (a missing model, data that does not fit it) print `error: ...` and exit with 2.
"""
import argparse
import ast
import os
import sys

import numpy as np
import pandas as pd

from public.core.settings import SETTINGS
from public.train.metrics import classification_metrics, per_subject

FORMATS = ('auto', 'txt', 'csv', 'numpy')
SNAP_LOW, SNAP_HIGH = 0.1, 0.9
DIGITS = 4                 # decimals of the probabilities in the CSV
SUBJECT_LINES = 15         # per-subject lines printed for labelled data


class PredictError(Exception):
    """A problem with the command line, the model or the data: printed, exit status 2."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog='predict.py', description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('model', help='ONNX model file (input [N, C, L, 1], output logits)')
    parser.add_argument('data', help='data folder of .txt segments, a .csv, or a .npy/.npz')
    parser.add_argument('--out', default='predictions.csv',
                        help='output CSV (default: %(default)s)')
    parser.add_argument('--snap', action='store_true',
                        help=f'set p < {SNAP_LOW} to 0 and p > {SNAP_HIGH} to 1 (seed 003)')
    parser.add_argument('--input-size', type=int, default=None,
                        help="segment length; default: the model's input length")
    parser.add_argument('--pad-tolerance', type=int, default=None,
                        help='segments shorter by at most this many samples are zero-padded '
                             "(default: the model folder's params_used.py, else 0)")
    parser.add_argument('--shorter', choices=('error', 'exclude'), default=None,
                        help="segments shorter beyond the tolerance: 'error' or 'exclude' "
                             "(default: params_used.py, else 'error')")
    parser.add_argument('--longer', choices=('error', 'crop'), default=None,
                        help="segments longer than the input: 'error' or 'crop' "
                             "(default: params_used.py, else 'error')")
    parser.add_argument('--format', choices=FORMATS, default='auto',
                        help='data format (default: %(default)s: from the path)')
    parser.add_argument('--multilabel', action='store_true',
                        help="per-label sigmoid probabilities (default: LABEL_MODE of the "
                             "model folder's params_used.py)")
    parser.add_argument('--batch', type=int, default=1024,
                        help='segments per onnxruntime call (default: %(default)s)')
    args = parser.parse_args(argv)
    for name in ('input_size', 'batch'):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.pad_tolerance is not None and args.pad_tolerance < 0:
        parser.error(f"--pad-tolerance must be >= 0, got {args.pad_tolerance}")
    return args


POLICY_SETTINGS = {'INPUT_SIZE': 'input_size', 'PAD_TOLERANCE': 'pad_tolerance',
                   'SHORTER': 'shorter', 'LONGER': 'longer'}
POLICY_DEFAULTS = {'pad_tolerance': 0, 'shorter': 'error', 'longer': 'error'}
_SETTING_OF = {flag: setting for setting, flag in POLICY_SETTINGS.items()}
_POLICY_RULES = {'input_size': ('an int >= 1', lambda v: isinstance(v, int) and v >= 1),
                 'pad_tolerance': ('an int >= 0', lambda v: isinstance(v, int) and v >= 0),
                 'shorter': ("'error' or 'exclude'", lambda v: v in ('error', 'exclude')),
                 'longer': ("'error' or 'crop'", lambda v: v in ('error', 'crop'))}


def _params_used(model_path):
    """(path, parsed module) of params_used.py beside the model; (None, None) if absent."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), 'params_used.py')
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            return path, ast.parse(f.read(), filename=path)
    except (OSError, SyntaxError, ValueError) as exc:
        raise PredictError(f"{path}: cannot be read: {exc}") from None


def _assignments(tree):
    for node in tree.body:
        single = isinstance(node, ast.Assign) and len(node.targets) == 1
        target = node.targets[0] if single else None
        if isinstance(target, ast.Name):
            yield target.id, node


def trained_policy(model_path):
    """(path, {input_size, pad_tolerance, shorter, longer}) from params_used.py beside the
    model (read as literals, never executed); (None, {}) when there is none."""
    path, tree = _params_used(model_path)
    if tree is None:
        return None, {}
    return path, {POLICY_SETTINGS[name]: _policy_value(path, node, name)
                  for name, node in _assignments(tree) if name in POLICY_SETTINGS}


def trained_task(model_path):
    """(multilabel, class names) of the model from params_used.py beside it; (False, ())
    when there is none or it cannot be read as literals."""
    values = trained_labels(model_path)
    return (values.get('LABEL_MODE') == 'multilabel',
            tuple(str(c) for c in values.get('CLASSES', ())))


def trained_labels(model_path):
    """{LABEL_MODE, CLASSES, POSITIVE_LABELS, LABEL_SEPARATOR} as written in params_used.py
    beside the model (only those present; {} without the file)."""
    path, tree = _params_used(model_path)
    values = {}
    for name, node in _assignments(tree) if tree is not None else ():
        if name in ('LABEL_MODE', 'CLASSES', 'POSITIVE_LABELS', 'LABEL_SEPARATOR'):
            try:
                values[name] = ast.literal_eval(node.value)
            except ValueError:
                raise PredictError(f"{path}: line {node.lineno}: {name} must be a literal "
                                   f"value") from None
    return values


def _policy_value(path, node, setting):
    rule, ok = _POLICY_RULES[POLICY_SETTINGS[setting]]
    try:
        value = ast.literal_eval(node.value)
    except ValueError:
        value = ok = None
    if ok is None or isinstance(value, bool) or not ok(value):
        raise PredictError(f"{path}: line {node.lineno}: {setting} must be {rule}"
                           + (f", got {setting}={value!r}" if ok else ' (a literal value)')
                           + '; fix the file or give the flag')
    return value


def length_policy(args, model_path):
    """The length policy: the flags, else params_used.py beside the model, else defaults;
    with a note saying what came from params_used.py (None when nothing did)."""
    path, trained = trained_policy(model_path)
    chosen, used = {}, []
    for name, default in POLICY_DEFAULTS.items():
        flag = getattr(args, name)
        if flag is not None:
            chosen[name] = flag
        elif name in trained:
            chosen[name] = trained[name]
            used.append(f"{_SETTING_OF[name]}={trained[name]!r}")
        else:
            chosen[name] = default
    note = f"length policy from {path}: {', '.join(used)}" if used else None
    return chosen, trained.get('input_size'), note


def load_session(path):
    """(onnxruntime session, input name, in_channels, input length or None if dynamic)."""
    import onnxruntime as ort
    if not os.path.isfile(path):
        raise PredictError(f"{path}: model file does not exist")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
    except Exception as exc:   # onnxruntime raises its own exception types for bad files
        raise PredictError(f"{path}: cannot be loaded by onnxruntime: {exc}") from None
    model_input = session.get_inputs()[0]
    shape = model_input.shape
    if len(shape) != 4 or (isinstance(shape[3], int) and shape[3] != 1):
        raise PredictError(f"{path}: model input {model_input.name!r} has shape {shape}; "
                           f"ATML models take [N, C, L, 1]")
    channels = shape[1] if isinstance(shape[1], int) else None
    length = shape[2] if isinstance(shape[2], int) else None
    return session, model_input.name, channels, length


def load_segments(path, fmt, input_size, pad_tolerance, shorter='error', longer='error',
                  classes=(), multilabel=False):
    """Segments of the data path (any ATML format, through public.dataset's LOADERS), every
    one fitted to input_size. A multi-label model reads multi-label sources (labels are
    read, then ignored)."""
    from public.dataset import LOADERS, LengthPolicy, detect_format
    from public.data.segments import LabelSpec, LoadOptions
    policy = LengthPolicy(input_size, pad_tolerance, shorter, longer)
    fmt = detect_format(path) if fmt == 'auto' else fmt
    labels = LabelSpec('multilabel', classes=tuple(classes)) if multilabel and classes else LabelSpec()
    return LOADERS[fmt].load(path, LoadOptions(policy, progress=False, labels=labels))


def softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=1, keepdims=True)


def snap(probabilities):
    """Seed 003's post-processing: p < 0.1 -> 0, p > 0.9 -> 1, the rest unchanged."""
    snapped = probabilities.copy()
    snapped[snapped < SNAP_LOW] = 0.0
    snapped[snapped > SNAP_HIGH] = 1.0
    return snapped


def sigmoid(logits):
    return 1.0 / (1.0 + np.exp(-logits))


def predict(session, input_name, x, batch, multilabel=False):
    """Probabilities (N, K) of segments x (N, C, L), batch by batch: a softmax over the
    classes, or one sigmoid per label for a multi-label model."""
    x = np.asarray(x, dtype=np.float32)
    logits = [session.run(None, {input_name: x[i:i + batch, :, :, None]})[0]
              for i in range(0, len(x), batch)]
    logits = np.concatenate(logits).astype(np.float64)
    return sigmoid(logits) if multilabel else softmax(logits)


def predicted_labels(probabilities, names=None, multilabel=False, separator='|'):
    """The `label` column: the argmax class (its name when names has one per class, else
    its index), or for a multi-label model the names with p >= 0.5 joined by separator."""
    k = probabilities.shape[1]
    names = list(names) if names and len(names) == k else None
    if multilabel:
        names = names or [f"label_{j}" for j in range(k)]
        return [separator.join(n for n, p in zip(names, row) if p >= 0.5)
                for row in probabilities]
    best = probabilities.argmax(axis=1)
    return [names[i] for i in best] if names else best.tolist()


def write_csv(path, ids, probabilities, names=None, labels=None):
    columns = (list(names) if names and len(names) == probabilities.shape[1]
               else [f"label_{k}" for k in range(probabilities.shape[1])])
    table = pd.DataFrame(np.round(probabilities, DIGITS), columns=columns)
    table.insert(0, 'id', ids)
    if labels is not None:
        table['label'] = labels
    from public.core.atomic import write_atomic
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    write_atomic(path, table.to_csv(index=False), step=False)   # never a half-written file


# ----------------------------------------------------------------------------- labelled data

def true_labels(segments, k, task, multilabel):
    """Targets of labelled segments, as training makes them: a multi-hot (N, K) array for a
    multi-label model, else class indices (CLASSES, else 1 for POSITIVE_LABELS); with the
    number of segments whose label is not a class. None when the data has no labels."""
    rhythms = np.asarray(segments.rhythms, dtype=str)
    if not getattr(segments, 'has_labels', True) or not len(rhythms) or not (rhythms != '').any():
        return None, 0
    classes = [str(c) for c in task.get('CLASSES', ())]
    if multilabel:
        separator = task.get('LABEL_SEPARATOR', SETTINGS['LABEL_SEPARATOR'].default)
        names = classes if len(classes) == k else [f"label_{j}" for j in range(k)]
        y = np.array([[n in [p.strip() for p in r.split(separator)] for n in names]
                      for r in rhythms], dtype=np.int64)
        return y, 0
    if classes:
        index = {c: i for i, c in enumerate(classes)}
        y = np.array([index.get(r, -1) for r in rhythms])
    elif k > 2 and all(r.isdigit() for r in rhythms):     # e.g. Tianchi's label column 0..3
        y = rhythms.astype(np.int64)
        y[y >= k] = -1
    else:
        positive = task.get('POSITIVE_LABELS', SETTINGS['POSITIVE_LABELS'].default)
        y = np.isin(rhythms, [str(p) for p in positive]).astype(np.int64)
    return y, int((y < 0).sum())


def confusion_counts(y, probabilities, multilabel):
    """Rows: true class, columns: predicted class; multi-label: [TN, FP, FN, TP] per label."""
    k = probabilities.shape[1]
    if multilabel:
        pred = probabilities >= 0.5
        truth = np.asarray(y) > 0
        return [[int((~t & ~p).sum()), int((~t & p).sum()), int((t & ~p).sum()), int((t & p).sum())]
                for t, p in zip(truth.T, pred.T)]
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y), probabilities.argmax(axis=1)), 1)
    return matrix.tolist()


def metrics_report(y, probabilities, subjects, names, multilabel):
    """Lines: the metrics, the confusion counts and the worst subjects of labelled data."""
    k = probabilities.shape[1]
    names = list(names) if names and len(names) == k else [str(j) for j in range(k)]
    m = classification_metrics(y, probabilities, k, names if multilabel else None)
    lines = [f"metrics on {len(y)} labelled segment(s): F1 {m['f1']:.4f}, accuracy "
             f"{m['accuracy']:.4f}, precision {m['precision']:.4f}, recall {m['recall']:.4f}"
             + (' (macro over the classes)' if k > 2 or multilabel else ' (class 1)')]
    counts = confusion_counts(y, probabilities, multilabel)
    width = max(len(n) for n in names)
    if multilabel:
        lines.append('confusion counts per label (TN FP FN TP at p >= 0.5):')
        lines += [f"  {n:<{width}}  " + ' '.join(f"{c:>5}" for c in row)
                  for n, row in zip(names, counts)]
    else:
        lines.append('confusion counts (rows: true class, columns: predicted class):')
        lines.append(f"  {'':<{width}}  " + ' '.join(f"{n:>6}" for n in names))
        lines += [f"  {n:<{width}}  " + ' '.join(f"{c:>6}" for c in row)
                  for n, row in zip(names, counts)]
    rows = per_subject('data', np.asarray(subjects, dtype=str), y, probabilities, k)
    if rows and len(rows) < len(y):          # one segment a subject (a CSV's ids): no table
        rows.sort(key=lambda r: (r['accuracy'], r['f1'], r['subject']))
        shown = rows[:SUBJECT_LINES]
        sw = max(7, max(len(r['subject']) for r in shown))
        lines.append(f"per subject, worst first ({len(shown)} of {len(rows)}):")
        lines.append(f"  {'subject':<{sw}} {'n':>5} {'accuracy':>8} {'F1':>6}")
        lines += [f"  {r['subject']:<{sw}} {r['segments']:>5} {r['accuracy']:>8.3f} "
                  f"{r['f1']:>6.3f}" for r in shown]
    return lines


def run(args):
    from public.dataset import DataError
    session, input_name, channels, length = load_session(args.model)
    if args.input_size and length and args.input_size != length:
        raise PredictError(f"{args.model}: the model takes segments of {length} samples, but "
                           f"--input-size is {args.input_size}")
    policy, trained_size, note = length_policy(args, args.model)
    input_size = args.input_size or length or trained_size
    if input_size is None:
        raise PredictError(f"{args.model}: the model's input length is dynamic; give "
                           f"--input-size")
    task = trained_labels(args.model)
    multilabel, classes = trained_task(args.model)
    multilabel = multilabel or args.multilabel
    try:
        segments = load_segments(args.data, args.format, input_size, policy['pad_tolerance'],
                                 policy['shorter'], policy['longer'], classes, multilabel)
    except DataError as exc:
        raise PredictError(str(exc)) from None
    if note:
        print(note)
    if segments.excluded:
        print(f"{len(segments.excluded)} segment(s) shorter than INPUT_SIZE - PAD_TOLERANCE "
              f"excluded (SHORTER='exclude'), e.g. {segments.excluded[0][0]}")
    leads = segments.x.shape[1]
    if channels is not None and leads != channels:
        raise PredictError(f"{args.model}: the model takes {channels} lead(s) (input "
                           f"[N, {channels}, {input_size}, 1]), but {args.data} has {leads}")
    probabilities = predict(session, input_name, segments.x, args.batch, multilabel)
    if args.snap:
        probabilities = snap(probabilities)
    separator = task.get('LABEL_SEPARATOR', SETTINGS['LABEL_SEPARATOR'].default)
    labels = predicted_labels(probabilities, classes, multilabel, separator)
    write_csv(args.out, segments.names, probabilities, classes if multilabel else None, labels)
    print(f"wrote {len(probabilities)} rows ({probabilities.shape[1]} "
          f"{'labels, sigmoid' if multilabel else 'classes'}"
          f"{', snapped' if args.snap else ''}) to {args.out}")
    y, unknown = true_labels(segments, probabilities.shape[1], task, multilabel)
    if y is None:
        return
    if unknown:
        print(f"{unknown} segment(s) with a label that is not a class of the model: left out "
              f"of the metrics")
    known = y >= 0 if y.ndim == 1 else np.ones(len(y), dtype=bool)
    names = classes
    if not classes and probabilities.shape[1] == 2 and not multilabel:
        positive = task.get('POSITIVE_LABELS', SETTINGS['POSITIVE_LABELS'].default)
        names = ('0 other', f"1 {'/'.join(str(p) for p in positive)}")
    if known.any():
        for line in metrics_report(y[known], probabilities[known], segments.subjects[known],
                                   names, multilabel):
            print(line)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except PredictError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
