"""The two report pages, one self-contained HTML file per stage, built only from what a
search left on disk (public/report/reading.py reads it).

    write_stage_one_report(settings)                    # after each trial and at the end
    write_stage_two_report(settings, result_folder)     # result_folder None: into TEMP_DIR

The page embeds its figures as base64 PNG (no network, opens from the file system); the
same figures are also written as PNG files under figures/ next to report.html. Everything
on the page comes from the files (results.csv, summary, result.json of the best folders,
stage2_results.csv), so a page regenerated from disk equals the one written during the
run: it holds no generation time, only the finishing time of the latest trial. What is
not on disk (a per-epoch history, a confusion matrix) is left out with a short note,
never an error. `python -m public.report` (public/report/main.py) rewrites a page.
"""
import ast
import base64
import hashlib
import html
import json
import os
import re
import shlex

import matplotlib
import numpy as np
import pandas as pd

from public.core.atomic import write_atomic
from public.core.settings import SETTINGS, settings_dict
from public.report import plots
from public.report.reading import (METRICS, load_stage_one, load_stage_two, read_json,
                                   read_text)
from public.search.avoid import AvoidList, AvoidFileError, learning_rate_candidates
from public.results.keys import settings_key
from public.train.metrics import selection_score
from public.train.outcome import TrialStatus

REPORT_NAME = 'report.html'
FIGURES_DIR = 'figures'
DATA_SUMMARY = 'data_summary.txt'


# ----------------------------------------------------------------------------- writing

def _write_atomic(path, text):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return write_atomic(path, text, step=False)


def _keep_data_summary(folder, data_summary):
    """Store the run's data summary next to the report (so a regenerated page has it)."""
    path = os.path.join(folder, DATA_SUMMARY)
    if data_summary and read_text(path) != data_summary:
        _write_atomic(path, data_summary)
    return read_text(path)


class Figures:
    """The figures of one page: drawn into figures/, embedded, failures turned into notes.

    A figure whose input data are unchanged since it was last drawn (same digest in
    figures/.digests.json, PNG still there) is not redrawn: after each trial of a long
    search only the figures that trial changes cost time. Rendering is deterministic, so
    the page is the same either way."""

    DIGESTS = '.digests.json'

    def __init__(self, folder):
        self.folder = os.path.join(folder, FIGURES_DIR)
        self.written = []
        self.old = read_json(os.path.join(self.folder, self.DIGESTS))
        self.new = {}

    def draw(self, name, function, *args, **kwargs):
        """(path, None) or (None, note) for one figure file figures/<name>.png."""
        file = f"{_file_name(name)}.png"
        path = os.path.join(self.folder, file)
        digest = _digest(function.__name__, args, kwargs)
        if self.old.get(file) != digest or not os.path.isfile(path):
            try:
                function(*args, path=path, **kwargs)
            except Exception as exc:            # a bad figure must not stop a long search
                return None, f"figure {name} could not be drawn: {type(exc).__name__}: {exc}"
        self.written.append(path)
        self.new[file] = digest
        return path, None

    def tidy(self):
        """Remove PNG files of figures this page no longer has (e.g. a renamed model) and
        record the digests of those it has."""
        if not os.path.isdir(self.folder):
            return
        keep = {os.path.basename(p) for p in self.written}
        for name in os.listdir(self.folder):
            if name.endswith('.png') and name not in keep:
                os.remove(os.path.join(self.folder, name))
        if self.new != self.old:
            _write_atomic(os.path.join(self.folder, self.DIGESTS),
                          json.dumps(self.new, indent=1, sort_keys=True))


def _digest(*parts):
    """A digest of a figure's inputs and of the plotting code that draws them."""
    def plain(value):
        if isinstance(value, pd.DataFrame):
            return value.to_csv()
        return value
    blob = json.dumps([_plots_version(), plain(parts[0]), [plain(a) for a in parts[1]],
                       {k: plain(v) for k, v in sorted(parts[2].items())}],
                      default=repr, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()


_PLOTS_VERSION = []


def _plots_version():
    if not _PLOTS_VERSION:
        with open(plots.__file__, 'rb') as f:
            code = hashlib.sha1(f.read()).hexdigest()
        _PLOTS_VERSION.append(f"{code} matplotlib {matplotlib.__version__}")
    return _PLOTS_VERSION[0]


def _file_name(name):
    return re.sub(r'[^A-Za-z0-9_.-]+', '_', name)


# ----------------------------------------------------------------------------- html pieces

_CSS = """
body{font-family:-apple-system,'Segoe UI',Roboto,'DejaVu Sans',Arial,sans-serif;margin:0;
 color:#222;background:#fafafa;line-height:1.4}
main{max-width:1280px;margin:0 auto;padding:16px 24px 48px}
h1{font-size:1.5em;margin:0.3em 0}
h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:1.8em}
h3{font-size:1.02em;margin:1.2em 0 0.4em}
.lead{font-size:1.02em;margin:0.4em 0 0.8em}
.verdict{padding:8px 12px;border-radius:4px;display:inline-block;font-weight:600}
.ok{background:#e3f4e3;border:1px solid #8bc98b}.bad{background:#fdeaea;border:1px solid #e39b9b}
.note{color:#555;font-size:0.9em;margin:0.3em 0}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:0.82em;background:#fff}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:right;white-space:nowrap}
th{background:#f0f0f0;position:sticky;top:0}
td.text,th.text{text-align:left}
tr.best td{background:#fff8dc;font-weight:600}
figure{margin:12px 0 20px;background:#fff;border:1px solid #e2e2e2;padding:8px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:0.9em;color:#444;margin-top:6px}
pre{background:#fff;border:1px solid #e2e2e2;padding:8px;font-size:0.85em;overflow-x:auto}
.settings{columns:3 300px;font-family:monospace;font-size:0.82em;background:#fff;
 border:1px solid #e2e2e2;padding:8px}
.settings div{break-inside:avoid;overflow-wrap:anywhere}
nav a{margin-right:14px}
.next{background:#eef5fc;border:1px solid #8fb5dc;border-radius:4px;padding:8px 14px;margin:10px 0}
.next.bad{background:#fdeaea;border-color:#e39b9b}
.next h2{border:none;margin:0.2em 0;font-size:1.1em}
.next code{background:#fff;border:1px solid #d5d5d5;padding:1px 5px;font-size:0.92em}
"""


def _esc(value):
    return html.escape(str(value), quote=True)


def _page(title, body):
    return ('<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n'
            f'<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n')


def _figure(path, caption, alt):
    with open(path, 'rb') as f:
        data = base64.b64encode(f.read()).decode('ascii')
    return (f'<figure><img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
            f'<figcaption>{caption}</figcaption></figure>')


def _figure_or_note(drawn, caption, alt):
    path, note = drawn
    return _figure(path, caption, alt) if path else f'<p class="note">{_esc(note)}</p>'


def _note(text):
    return f'<p class="note">{_esc(text)}</p>'


def _table(columns, rows, highlight=()):
    """columns: [(header, key, formatter or None, is_text)]; rows: dicts."""
    head = ''.join(f'<th class="{"text" if t else "num"}">{_esc(h)}</th>' for h, _, _, t in columns)
    body = []
    for n, row in enumerate(rows):
        cells = []
        for _, key, fmt, is_text in columns:
            value = row.get(key, '')
            shown = fmt(value, row) if fmt else _esc(_plain(value))
            cells.append(f'<td class="{"text" if is_text else "num"}">{shown}</td>')
        css = ' class="best"' if n in highlight else ''
        body.append(f'<tr{css}>' + ''.join(cells) + '</tr>')
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>'
            + '\n'.join(body) + '</tbody></table></div>')


def _plain(value):
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ''
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    if isinstance(value, (np.integer,)):
        return str(int(value))
    return value


def _num(digits):
    def fmt(value, _row):
        value = pd.to_numeric(value, errors='coerce')
        return '' if pd.isna(value) else f"{value:.{digits}f}"
    return fmt


def _percent(value, _row):
    value = pd.to_numeric(value, errors='coerce')
    return '' if pd.isna(value) else f"{100 * value:.1f}"


def _kb(size_bytes, _row):
    size = pd.to_numeric(size_bytes, errors='coerce')
    return '' if pd.isna(size) else f"{size / 1024:.2f}"


def _int(value, _row):
    value = pd.to_numeric(value, errors='coerce')
    return '' if pd.isna(value) else f"{int(value):,}"


def _link(folder_of_report):
    def fmt(value, _row):
        if not value:
            return ''
        href = os.path.relpath(value, folder_of_report).replace(os.sep, '/') + '/'
        return f'<a href="{_esc(href)}">{_esc(value)}</a>'
    return fmt


STAGE_TWO_SECTION = 'stage two'


def _settings_html(settings, stage_two=True):
    """Settings that differ from params.py's defaults or came from the command line first,
    the rest folded away; the stage-one page leaves out the stage-two-only settings."""
    overrides = settings.OVERRIDES
    changed, rest = [], []
    for name, value in settings_dict(settings).items():
        spec = SETTINGS[name]
        if not stage_two and spec.section == STAGE_TWO_SECTION:
            continue
        line = f"{name} = {value!r}"
        if name in overrides:
            changed.append(f"{line}   # command line")
        elif not _same(value, spec.default):
            changed.append(f"{line}   # default {spec.default!r}")
        else:
            rest.append(line)
    lines = ''.join(f'<div>{_esc(t)}</div>' for t in changed)
    head = (f'<div class="settings">{lines}</div>' if changed
            else _note('Every setting has its params.py default.'))
    folded = ''.join(f'<div>{_esc(t)}</div>' for t in rest)
    return (head + f'<details><summary>{len(rest)} setting(s) at their default</summary>'
            f'<div class="settings">{folded}</div></details>')


def _same(value, default):
    if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)):
        return tuple(value) == tuple(default)
    return value == default


def _data_html(summary):
    if not summary.strip():
        return _note('No data summary recorded (it is stored next to the report when a '
                     'stage script writes the page).')
    return f'<pre>{_esc(summary.strip())}</pre>'


def metric_name(settings):
    """What the selection score is, e.g. 'min of F1/acc/prec/rec on val'."""
    metric = settings.SELECT_METRIC
    name = {'min4': 'min of F1/acc/prec/rec', 'abs_sum': '1 - abs_sum/2'}.get(metric, metric)
    return f"{name} on {settings.SELECT_ON}"


def metric_label(settings):
    """The axis label of the selection score, in percent."""
    return f"{metric_name(settings)} (%)"


def class_names(settings):
    classes = tuple(settings.CLASSES)
    if classes:
        return [str(c) for c in classes]
    positive = '/'.join(settings.POSITIVE_LABELS or ('positive',))
    return ['0 other', f"1 {positive}"]


# ----------------------------------------------------------------------------- next step, subjects

PER_SUBJECT_ROWS = 15      # rows of a per-subject table shown before the rest is folded


def _next_box(title, lines, bad=False):
    """The page's "Next step" box: lines are already-escaped HTML."""
    items = ''.join(f'<p>{line}</p>' for line in lines)
    return f'<div class="next{" bad" if bad else ""}" id="next"><h2>{_esc(title)}</h2>{items}</div>'


def _code(text):
    return f'<code>{_esc(text)}</code>'


def _override_args(settings, keep):
    """KEY=VALUE words of the command-line overrides a next stage needs (shell-quoted)."""
    overrides = settings.OVERRIDES
    return [shlex.quote(f"{n}={_literal(overrides[n])}") for n in overrides if keep(n)]


def _literal(value):
    """A value as the command line takes it: a string bare when it reads back as itself."""
    if isinstance(value, str):
        try:
            ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return repr(value)


def stage_one_pick(best):
    """The recommended stage-one trial: the best score over the models' best trials, a tie
    going to the smaller ONNX file; None when no model has a scored trial."""
    if best.empty:
        return None
    ranked = best.assign(_score=plots.numeric_column(best, 'score'),
                         _kb=plots.numeric_column(best, 'onnx_kb').fillna(np.inf))
    ranked = ranked.sort_values(['_score', '_kb'], ascending=[False, True], kind='stable')
    return ranked.iloc[0]


_GENERATE_CONFIG = 'generate_config(channel_scaling_factor, fc_scaling_factor, input_size)'


def _stage_one_next(settings, best):
    pick = stage_one_pick(best)
    if pick is None:
        return _next_box('Next step', [_esc('No model has a finished trial with a score yet: '
                                           'nothing to recommend.')], bad=True)
    lr = float(pick['lr'])
    score = pd.to_numeric(pick.get('score'), errors='coerce')
    kb = pd.to_numeric(pick.get('onnx_kb'), errors='coerce')
    facts = [f"learning rate {lr:g}", f"folder {plots.xx_yy(pick)}" if plots.xx_yy(pick) else '',
             f"score {100 * score:.1f} %" if pd.notna(score) else '',
             f"{kb:.2f} KB" if pd.notna(kb) else '']
    facts = ', '.join(t for t in facts if t)
    carried = _override_args(settings, lambda n: n == 'MODEL_SAVE_PATH' or SETTINGS[n].section
                             not in ('stage one search', STAGE_TWO_SECTION))
    command = ' '.join(['python train_final.py', f"LEARNING_RATE={lr:g}", *carried])
    model = str(pick['model'])
    lines = [f"Recommended: <b>{_esc(model)}</b> ({_esc(facts)}), the best score of "
             f"{best['model'].nunique()} model(s) (a tie goes to the smaller file).",
             f"1. Put the {_esc(model)} architecture into {_code('public/ss_model.py')}: its "
             f"class, and {_code(_GENERATE_CONFIG)} returning its layer widths at the given "
             f"scaling factors (now it scales AFNet).",
             f"2. Run stage two at this learning rate: {_code(command)}"]
    if model == 'AFNet':
        lines[1] = (f"1. {_code('public/ss_model.py')} already scales AFNet: nothing to change.")
    return _next_box('Next step', lines)


def _read_per_subject(folder):
    path = os.path.join(folder, 'per_subject.csv') if folder else ''
    if not path or not os.path.isfile(path):
        return pd.DataFrame()
    try:
        frame = pd.read_csv(path, dtype={'subject': str})
    except (OSError, ValueError):
        return pd.DataFrame()
    for name in ('accuracy', 'f1', 'precision', 'recall', 'segments'):
        if name in frame.columns:
            frame[name] = pd.to_numeric(frame[name], errors='coerce')
    return frame


def _per_subject_html(folders):
    """One table per (label, folder): its per_subject.csv rows of the test split (else
    validation), worst accuracy first; the rows after PER_SUBJECT_ROWS folded away."""
    parts = []
    for label, folder in folders:
        frame = _read_per_subject(folder)
        if frame.empty or 'subject' not in frame.columns:
            continue
        split = next((s for s in ('test', 'val') if 'split' in frame.columns
                      and (frame['split'] == s).any()), None)
        rows = frame[frame['split'] == split] if split else frame
        keys = [k for k in ('accuracy', 'f1') if k in rows.columns]
        rows = rows.sort_values(keys, kind='stable') if keys else rows
        columns = [('subject', 'subject', None, True), ('segments', 'segments', _int, False),
                   ('class mix', 'class_mix', None, True), ('accuracy', 'accuracy', _num(3), False),
                   ('F1', 'f1', _num(3), False), ('precision', 'precision', _num(3), False),
                   ('recall', 'recall', _num(3), False), ('F-beta', 'fbeta', _num(3), False)]
        columns = [c for c in columns if c[1] in rows.columns]
        records = rows.to_dict('records')
        name = {'test': 'test', 'val': 'validation'}.get(split, '')
        parts.append(f'<h3>{_esc(label)}: {len(records)} {name} subject(s), worst first</h3>')
        parts.append(_table(columns, records[:PER_SUBJECT_ROWS]))
        if len(records) > PER_SUBJECT_ROWS:
            parts.append(f'<details><summary>{len(records) - PER_SUBJECT_ROWS} more subject(s)'
                         f'</summary>{_table(columns, records[PER_SUBJECT_ROWS:])}</details>')
    if not parts:
        return [_note('No per_subject.csv in the result folder(s): per-subject metrics not '
                      'available.')]
    return parts + [_note('From per_subject.csv in each folder (accuracy, then F1, lowest first).')]


def skipped_rates(settings, trials):
    """{model: [lr, ...]}: the grid's learning rates (LR_MIN..LR_MAX by STEP) a model has no
    row for and avoid.txt rules out (within 2*STEP of one of its entries)."""
    try:
        grid = learning_rate_candidates(settings.LR_MIN, settings.LR_MAX, settings.STEP)
        avoid = AvoidList(settings.AVOID_FILE_PATH, settings.STEP)
    except (ValueError, OSError, AvoidFileError):
        return {}
    key = settings_key(settings)
    skipped = {}
    for model, group in trials.groupby('model', sort=False):
        tried = plots.numeric_column(group, 'lr').dropna().to_numpy()
        skipped[model] = [lr for lr in grid
                          if not np.isclose(tried, lr, rtol=1e-9, atol=0).any()
                          and avoid.pruned_by(lr, model, key) is not None]
    return skipped


# ----------------------------------------------------------------------------- loss curves

def _curve(label, history, best_epoch, stop_reason):
    """One line of a loss-curve figure."""
    return {'label': label, 'history': history, 'best_epoch': best_epoch,
            'stop_reason': stop_reason}


def _loss_section(figures, name, curves, title, caption, alt, missing='', **options):
    """The loss-curve figure figures/<name>.png of `curves` (_curve), or the note `missing`
    ('' for none) when no curve has a per-epoch history (both pages)."""
    if any(plots.history_frame(c['history']) is not None for c in curves):
        return [_figure_or_note(figures.draw(name, plots.loss_curves_plot, curves, title=title,
                                             **options), caption, alt)]
    return [_note(missing)] if missing else []


# ----------------------------------------------------------------------------- stage one

def _best_folder(root, row):
    """The best folder <root>/<model>/<xx>-<yy> of a best row and its result.json."""
    digits = plots.xx_yy(row)
    folder = os.path.join(root, str(row['model']), digits) if digits else ''
    if folder and os.path.isdir(folder):
        return folder, read_json(os.path.join(folder, 'result.json'))
    return '', {}


def _summary_rows(trials, best, root, skipped=None):
    """One row per model; a halving trial counted once (its last row), its time summed
    over its rungs."""
    rows = []
    for model, group in trials.groupby('model', sort=False):
        ends = plots.trial_ends(group)
        entry = {'model': model, 'trials': len(ends),
                 'pruned': int(ends['pruned'].sum()) if 'pruned' in ends else 0,
                 'skipped': len((skipped or {}).get(model, ())),
                 'failed': int((ends['status'] == TrialStatus.FAILED).sum()),
                 'diverged': int((ends['status'] == TrialStatus.DIVERGED).sum()),
                 'wall_s': group['wall_s'].sum() if 'wall_s' in group else np.nan}
        if plots.halving_rows(group):
            entry['stopped'] = int((ends['status'] == TrialStatus.STOPPED).sum())
            entry['epochs_trained'] = int(plots.numeric_column(ends, 'epochs').fillna(0).sum())
        pick = best[best['model'] == model]
        if len(pick):
            row = pick.iloc[0]
            entry.update({k: row.get(k) for k in row.index if k not in entry})
            entry.update(result=plots.xx_yy(row), folder=_best_folder(root, row)[0])
        rows.append(entry)
    return rows


def _summary_columns(report_dir, halving=False):
    extra = ([('stopped', 'stopped', None, False), ('epochs trained', 'epochs_trained', _int, False)]
             if halving else [])
    return [('model', 'model', None, True), ('trials', 'trials', None, False),
            ('pruned', 'pruned', None, False), ('skipped', 'skipped', None, False),
            ('diverged', 'diverged', None, False),
            ('failed', 'failed', None, False), *extra, ('best lr', 'lr', None, False),
            ('xx-yy', 'result', None, False), ('score %', 'score', _percent, False),
            ('ONNX KB', 'onnx_kb', _num(2), False), ('latency ms', 'latency_ms', _num(3), False),
            ('params', 'params', _int, False), ('time s', 'wall_s', _num(1), False),
            ('best folder', 'folder', _link(report_dir), True)]


def _metric_columns(trials):
    """The best trials' metrics, both splits (only those recorded)."""
    columns = [('model', 'model', None, True)]
    for split in ('val', 'test'):
        for m, short in (('f1', 'F1'), ('accuracy', 'acc'), ('precision', 'prec'),
                         ('recall', 'rec'), ('auc', 'AUC'), ('abs_sum', 'abs-sum')):
            name = f"{split}_{m}"
            if name in trials.columns and trials[name].notna().any():
                columns.append((f"{split} {short}", name, _num(3), False))
    return columns


HALVING_SECTION = 'Successive halving'


def _rung_header(rung, epochs):
    """'rung 2 (9 ep)'; 'rung 4 (8/12 ep)' where models' rung 4 trained to different totals
    (a rung of one goes straight to NUM_EPOCHS)."""
    values = sorted({int(e) for e in epochs if pd.notna(e)})
    return f"rung {rung} ({'/'.join(map(str, values))} ep)" if values else f"rung {rung}"


def _halving_status(end):
    status = str(end.get('status', ''))
    rung = pd.to_numeric(end.get('rung'), errors='coerce')
    at = f" at rung {int(rung)}" if pd.notna(rung) else ''
    if status == TrialStatus.OK:
        return 'pruned' if str(end.get('pruned')) == 'True' else 'ok'
    if status == TrialStatus.STOPPED:
        return f"stopped{at}"
    if status == TrialStatus.PROMOTED:
        return f"promoted{at}, next rung not recorded yet"
    return status


def halving_table(trials, best):
    """(columns, rows, highlight) of the halving table: one row per model and learning rate
    with its score (%) at each rung, its final status and the epochs it trained in all."""
    rung = plots.numeric_column(trials, 'rung')
    mine = trials[rung.notna() & plots.numeric_column(trials, 'lr').notna()]
    rung = rung[mine.index].astype(int)
    rungs = sorted(rung.unique())
    epochs = plots.numeric_column(mine, 'rung_epochs')
    columns = [('model', 'model', None, True), ('lr', 'lr', lambda v, _r: f"{v:g}", False)]
    columns += [(_rung_header(k, epochs[rung == k]), f"rung_{k}", None, False) for k in rungs]
    columns += [('final status', 'final', None, True),
                ('epochs trained', 'epochs_trained', _int, False)]
    order = {m: n for n, m in enumerate(dict.fromkeys(trials['model']))}
    best_keys = {(str(r['model']), float(r['lr'])) for _, r in best.iterrows()}
    rows, highlight = [], []
    groups = mine.groupby([mine['model'].astype(str), mine['lr'].astype(float)], sort=False)
    for (model, lr), group in sorted(groups, key=lambda g: (order.get(g[0][0], 0), g[0][1])):
        entry = {'model': model, 'lr': lr}
        ordered = group.loc[sorted(group.index, key=lambda i: rung[i])]   # stable
        for i, row in ordered.iterrows():
            score = _percent(row.get('score'), row)
            entry[f"rung_{rung[i]}"] = score or (str(row['status']) if row['status'] in (
                TrialStatus.DIVERGED, TrialStatus.FAILED) else '')
        end = ordered.iloc[-1]
        entry['final'] = _halving_status(end)
        entry['epochs_trained'] = plots.numeric_column(group, 'epochs').max()
        if end['status'] == TrialStatus.OK and (model, lr) in best_keys:
            highlight.append(len(rows))
        rows.append(entry)
    return columns, rows, tuple(highlight)


def _halving_html(trials, best, settings):
    columns, rows, highlight = halving_table(trials, best)
    return [f'<h2 id="halving">{HALVING_SECTION}</h2>', _table(columns, rows, highlight),
            _note(f"SCHEDULER='halving': each row is one trial (a model at a learning rate), its "
                  f"score % at the end of each rung it trained (rung k trains on from the "
                  f"previous rung's checkpoint to the epochs in its header). At a rung's end the "
                  f"best 1/HALVING_ETA={settings.HALVING_ETA} of the model's trials go on; the "
                  f"others are stopped (not pruned, not in avoid.txt). Epochs trained: through "
                  f"every rung. Highlighted: each model's best trial.")]


def _trial_label(row):
    lr = row.get('lr')
    parts = [f"lr={lr:g}" if pd.notna(lr) else 'lr=?', plots.xx_yy(row)]
    rung = pd.to_numeric(row.get('rung'), errors='coerce')
    if pd.notna(rung):                       # halving: the rung the row ended
        parts.append(f"rung {int(rung)}")
    if row.get('status') not in (TrialStatus.OK, ''):
        parts.append(str(row.get('status')))
    elif str(row.get('pruned')) == 'True':
        parts.append('pruned')
    return ' '.join(p for p in parts if p)


def _history_of(row, info=None):
    if info and info.get('history'):
        return info['history']
    return row.get('history') if 'history' in row.index else None


def _stage_one_overview(figures, trials, settings, skipped):
    label = metric_label(settings)
    parts = ['<h2 id="overview">Accuracy, size and speed</h2>']
    halving = plots.halving_rows(trials)
    finals = trials
    if halving:     # scores of fewer epochs (stopped, promoted rungs) stay on the lr figure
        finals = trials[~trials['status'].isin([TrialStatus.STOPPED, TrialStatus.PROMOTED])]
        parts.append(_note('Successive halving: the size and latency figures show the trials '
                           'that finished (ok, diverged, failed); the scores of the rungs, and '
                           'of the trials stopped at one, are in the learning-rate figure and '
                           f'the {HALVING_SECTION.lower()} table.'))
    parts.append(_figure_or_note(
        figures.draw('stage1-size', plots.size_score_plot, finals, metric_label=label),
        'Selection score against ONNX file size, one point per finished trial, one colour per '
        'model; hollow points were pruned, the ringed point is each model\'s best (labelled with '
        'its folder), the dashed line the Pareto front: no trial is both smaller and better.',
        'score vs size'))
    parts.append(_figure_or_note(
        figures.draw('stage1-latency', plots.latency_score_plot, finals, metric_label=label),
        'The same trials against onnxruntime latency (median of LATENCY_RUNS single-segment '
        'runs, one thread).', 'score vs latency'))
    parts.append(_figure_or_note(
        figures.draw('stage1-lr', plots.lr_score_plot, trials, metric_label=label,
                     avoid_param=settings.AVOID_PARAM, skipped=skipped),
        'Score per learning rate for every trial of each model: red triangles were pruned '
        '(score below AVOID_PARAM, dotted; hollow at the bottom edge when below the axis), '
        'crosses diverged, diamonds failed (no score), grey crosses at the bottom the grid '
        'rates skipped (avoid.txt: never trained), the ring is the best. The score axis holds '
        'the finished trials that were not pruned.'
        + (' Successive halving: a thin line joins the scores of one trial\'s rungs at its rate '
           '(rung 1 first); small points were promoted (that rung\'s score, the trial went on), '
           'hollow ones stopped at that rung (not among the best 1/HALVING_ETA; not pruned); '
           'the score axis holds these too.' if halving else ''),
        'score per learning rate'))
    return parts


def _stage_one_models(figures, trials, best, settings, report_dir):
    root = settings.MODEL_SAVE_PATH
    parts, best_curves = [], []
    sections = []
    for model, group in trials.groupby('model', sort=False):
        pick = best[best['model'] == model]
        row = pick.iloc[0] if len(pick) else None
        folder, info = _best_folder(root, row) if row is not None else ('', {})
        sections.append(_model_section(figures, model, group, row, folder, info, settings,
                                       report_dir))
        if row is not None:
            best_curves.append(_curve(f"{model} {_trial_label(row)}", _history_of(row, info),
                                      info.get('best_epoch', row.get('best_epoch')),
                                      info.get('stop_reason', row.get('stop_reason'))))
    parts.append('<h2 id="loss">Loss curves of each model\'s best trial</h2>')
    parts += _loss_section(
        figures, 'stage1-best-loss', best_curves, "Best trial of each model: loss per epoch",
        'Train and validation loss per epoch; the dashed line is the epoch whose weights '
        'were kept, a red square the early stop (the overfitting-aware rule).',
        'loss curves of the best trials',
        missing='No per-epoch history is recorded for these trials (results.csv has no '
                'history column and the best folders no history): loss curves are not '
                'available.')
    return parts + ['<h2 id="models">Per model</h2>'] + sections


def _model_section(figures, model, group, row, folder, info, settings, report_dir):
    parts = [f'<h3 id="model-{_esc(_file_name(str(model)))}">{_esc(model)}</h3>']
    if row is None:
        parts.append(_note(f"{len(group)} trial(s), none finished with a score."))
    elif folder:
        href = os.path.relpath(folder, report_dir).replace(os.sep, '/') + '/'
        parts.append(f'<p>Best folder: <a href="{_esc(href)}">{_esc(folder)}</a> '
                     f'(lr {row["lr"]:g}, {_esc(row.get("stop_reason", ""))} after '
                     f'{_plain(row.get("epochs", ""))} epoch(s)).</p>')
    confusion = info.get('confusion') if isinstance(info.get('confusion'), dict) else None
    if confusion:
        parts.append(_figure_or_note(
            figures.draw(f"{model}-confusion", plots.confusion_plot, confusion,
                         title=f"{model} best trial: confusion matrices",
                         class_names=class_names(settings)),
            'Counts of the best trial on the validation and test splits, coloured by the share '
            'of each true class (the diagonal is the recall per class).', f"{model} confusion"))
    elif row is not None:
        parts.append(_note('No confusion matrix recorded in the best folder\'s result.json.'))
    ends = plots.trial_ends(group)          # halving: a trial's last rung holds its history
    curves = [_curve(_trial_label(r), _history_of(r), r.get('best_epoch'), r.get('stop_reason'))
              for _, r in ends.sort_values('lr', kind='stable').iterrows()]
    if len(curves) > 1:
        parts += _loss_section(figures, f"{model}-trials-loss", curves,
                               f"{model}: every trial's loss per epoch",
                               'Every trial of the model, by learning rate (same loss axis).',
                               f"{model} loss curves of all trials", sharey=True)
    return ''.join(parts)


def _stage_one_lead(trials, skipped=None):
    if trials.empty:
        return _note('No trial of the current search is recorded yet.')
    ends = plots.trial_ends(trials)        # halving: a trial once, by its last rung's row
    counts = ends['status'].value_counts()
    pruned = int(ends['pruned'].sum()) if 'pruned' in ends else 0
    skips = sum(len(v) for v in (skipped or {}).values())
    latest = trials['finished_at'].dropna().astype(str).max() if 'finished_at' in trials else ''
    stopped, going = (int(counts.get(s, 0)) for s in (TrialStatus.STOPPED, TrialStatus.PROMOTED))
    halving = (f"; {stopped} stopped at a rung (successive halving: not among the best of "
               f"their rung, not pruned)" if plots.halving_rows(trials) else '')
    halving += f"; {going} promoted, their next rung not recorded yet" if going else ''
    text = (f"{len(ends)} trial(s) of {trials['model'].nunique()} model(s): "
            f"{int(counts.get(TrialStatus.OK, 0))} finished "
            f"({pruned} pruned: score below AVOID_PARAM), "
            f"{int(counts.get(TrialStatus.DIVERGED, 0))} diverged, "
            f"{int(counts.get(TrialStatus.FAILED, 0))} failed" + halving
            + (f"; {skips} rate(s) skipped (avoid.txt), never trained" if skips else '')
            + (f"; latest finished at {latest}" if latest else '') + '.')
    return f'<p class="lead">{_esc(text)}</p>'


def _others_note(others, what):
    if not others:
        return ''
    return _note(f"{others} {what} recorded with other settings are not shown; to see them, "
                 f"regenerate with the KEY=VALUE overrides of that run.")


def stage_one_html(settings, figures, data_summary=''):
    """The stage-one page as text (figures drawn through `figures`)."""
    root = settings.MODEL_SAVE_PATH
    trials, others = load_stage_one(settings)
    best = plots.best_rows(trials)
    skipped = skipped_rates(settings, trials)
    halving = plots.halving_rows(trials)
    body = [f'<h1>ATML stage one: {_esc(root)}</h1>', _stage_one_lead(trials, skipped),
            _others_note(others, 'row(s) of results.csv'),
            '<nav><a href="#next">next step</a><a href="#summary">summary</a>'
            + ('<a href="#halving">halving</a>' if halving else '') +
            '<a href="#subjects">subjects</a><a href="#overview">figures</a>'
            '<a href="#loss">loss curves</a><a href="#models">per model</a>'
            '<a href="#data">data</a><a href="#settings">settings</a></nav>',
            _stage_one_next(settings, best),
            '<h2 id="summary">Best trial per model</h2>']
    if trials.empty:
        body.append(_note('Nothing to summarise yet.'))
    else:
        summary = _summary_rows(trials, best, root, skipped)
        body.append(_table(_summary_columns(root, halving), summary))
        body.append(_note("pruned: trained, scored below AVOID_PARAM; skipped: a grid rate "
                          "avoid.txt ruled out, never trained."
                          + (" stopped: trained to a rung, not among the best of it (halving)."
                             if halving else '')))
        body.append(_note(f"Scores: {metric_label(settings)}; the best trial of a model has the "
                          f"highest score, then yy, then xx, then the smaller learning rate. All trials: "
                          f"{os.path.join(root, 'results.csv')}."))
        body.append('<h3>Metrics of the best trials</h3>')
        body.append(_table(_metric_columns(trials), [r for r in summary if 'result' in r]))
        if halving:
            body += _halving_html(trials, best, settings)
        body.append('<h2 id="subjects">Per subject: the best folders, worst first</h2>')
        body += _per_subject_html([(f"{r['model']} {plots.xx_yy(r)}", _best_folder(root, r)[0])
                                   for _, r in best.iterrows()])
    body += _stage_one_overview(figures, trials, settings, skipped)
    body += _stage_one_models(figures, trials, best, settings, root)
    body += ['<h2 id="data">Data</h2>', _data_html(data_summary),
             '<h2 id="settings">Settings</h2>', _settings_html(settings, stage_two=False)]
    return _page(f"ATML stage one: {root}", '\n'.join(b for b in body if b))


def write_stage_one_report(settings, data_summary=None):
    """Write <MODEL_SAVE_PATH>/report.html (and figures/*.png) from the files; its path.

    data_summary (the run's data description, optional) is stored as data_summary.txt
    next to the report, so that a page regenerated later shows it too."""
    root = settings.MODEL_SAVE_PATH
    os.makedirs(root, exist_ok=True)
    summary = _keep_data_summary(root, data_summary)
    figures = Figures(root)
    page = stage_one_html(settings, figures, summary)
    figures.tidy()
    return _write_atomic(os.path.join(root, REPORT_NAME), page)


# ----------------------------------------------------------------------------- stage two

def planned_cells(rows, settings, met=False):
    """rows plus one row (status 'not needed' when a smaller candidate met the targets, else
    '' = untrained) for every CHANNEL_SCALES x FC_SCALES pair that has no row: the grid and
    the counts show every candidate."""
    have = set(zip(plots.numeric_column(rows, 'channel_scale'),
                   plots.numeric_column(rows, 'fc_scale')))
    extra = [{'candidate': f"c{c:g}-f{f:g}", 'channel_scale': c, 'fc_scale': f,
              'status': plots.NOT_NEEDED if met else ''}
             for c in settings.CHANNEL_SCALES for f in settings.FC_SCALES
             if (float(c), float(f)) not in have]
    if not extra:
        return rows
    return pd.concat([rows, pd.DataFrame(extra)], ignore_index=True)


def grid_cells(rows, settings):
    """The stage-two table with the columns the grid draws: score (%) and kb of the float
    model, and int8_score / int8_kb when quantization was on."""
    cells = rows.copy()
    if 'status' not in cells.columns:
        cells['status'] = ''
    predicted_kb = plots.numeric_column(cells, 'predicted_bytes') / 1024
    float_kb = plots.numeric_column(cells, 'onnx_bytes') / 1024
    int8 = 'int8_bytes' in cells.columns and cells['int8_bytes'].notna().any()
    int8 = int8 or settings.QUANTIZE_INT8
    if not int8:
        cells['kb'] = float_kb.where(float_kb.notna(), predicted_kb)
        cells['score_pct'] = 100 * plots.numeric_column(cells, 'score')
        return cells, (('ONNX (float)', 'score_pct', 'kb'),)
    cells['int8_kb'] = (plots.numeric_column(cells, 'int8_bytes') / 1024).where(
        cells['status'] != TrialStatus.OVER_SIZE, predicted_kb)
    cells['int8_score'] = 100 * plots.numeric_column(cells, 'score')
    cells['kb'] = float_kb
    cells['score_pct'] = [_float_score(r, settings) for _, r in cells.iterrows()]
    return cells, (('float ONNX (before quantization)', 'score_pct', 'kb'),
                   ('INT8 ONNX (the deliverable; targets apply)', 'int8_score', 'int8_kb'))


def _float_score(row, settings):
    try:
        split = settings.SELECT_ON
        metrics = {m: float(row[f"{split}_{m}"]) for m in METRICS if f"{split}_{m}" in row}
        return 100 * selection_score(metrics, settings.SELECT_METRIC)
    except Exception:
        return np.nan


def _stage_two_columns(rows):
    int8 = 'int8_bytes' in rows.columns and rows['int8_bytes'].notna().any()
    # halving: the rung each candidate's last row ended (after the five the folded table shows)
    rung = [('rung', 'rung', _int, False)] if plots.halving_rows(rows) else []
    columns = [('candidate', 'candidate', None, True), ('channel', 'channel_scale', _int, False),
               ('FC', 'fc_scale', _int, False), ('planned KB', 'predicted_bytes', _kb, False),
               ('status', 'status', None, True), *rung, ('xx-yy', 'result', None, False),
               ('INT8 score %' if int8 else 'score %', 'score', _percent, False),
               ('meets metric target', 'meets_metric', None, False),
               ('ONNX KB', 'onnx_kb', _num(2), False)]
    if int8:
        columns.append(('INT8 KB', 'int8_bytes', _kb, False))
    columns += [('latency ms', 'latency_ms', _num(3), False),
                ('params', 'params', _int, False), ('time s', 'wall_s', _num(1), False)]
    return columns


def _stage_two_rows(rows, settings):
    out = []
    for _, row in rows.iterrows():
        entry = row.to_dict()
        if pd.notna(entry.get('xx')) and pd.notna(entry.get('yy')):
            entry['result'] = f"{int(entry['xx'])}-{int(entry['yy'])}"
        ok = entry.get('status') == TrialStatus.OK
        score = pd.to_numeric(entry.get('score'), errors='coerce')
        meets = pd.notna(score) and 100 * score >= settings.METRIC_TARGET - 1e-9
        entry['meets_metric'] = ('yes' if meets else 'no') if ok else ''
        rung = pd.to_numeric(entry.get('rung'), errors='coerce')
        if entry.get('status') in (TrialStatus.STOPPED, TrialStatus.PROMOTED) and pd.notna(rung):
            entry['status'] = f"{entry['status']} (rung {int(rung)})"
        out.append(entry)
    return out


def _verdict(result_folder, info, settings, rows):
    if not result_folder:
        return ('bad', 'No result folder: no candidate under the size target trained '
                       'successfully (yet).')
    text = info.get('verdict') or read_text(os.path.join(result_folder, 'evaluation_metrics.txt'))
    met = 'does NOT meet' not in str(text)
    name = f"c{info.get('channel_scale', '?')}-f{info.get('fc_scale', '?')}"
    words = 'meets both targets' if met else 'does NOT meet both targets (best under the size cap)'
    row = rows[rows['candidate'] == name].tail(1)
    row = row.iloc[0] if len(row) else pd.Series(dtype=object)
    score, kb = pd.to_numeric(row.get('score'), errors='coerce'), _deliverable_kb(row)
    metric = f"METRIC_TARGET {settings.METRIC_TARGET}"
    size = f"SIZE_TARGET_KB {settings.SIZE_TARGET_KB}"
    if pd.notna(score):
        metric = f"{metric_name(settings)} {100 * score:.1f} % ({metric})"
    if pd.notna(kb):
        size = f"{kb:.2f} KB ({size})"
    facts = f"{metric}, {size}"
    return ('ok' if met else 'bad', f"{_display(result_folder)}: {name} {words}: {facts}.")


def deliverable_file(result_folder, settings):
    """The file stage two delivers: saved.int8.onnx with QUANTIZE_INT8 (when written),
    else saved.onnx."""
    int8 = os.path.join(result_folder, 'saved.int8.onnx')
    if settings.QUANTIZE_INT8 and os.path.isfile(int8):
        return int8
    return os.path.join(result_folder, 'saved.onnx')


def _stage_two_next(settings, result_folder, info, rows):
    """What to do with the result: the deliverable and its predict.py command, or for a
    miss what missed and what to change."""
    if not result_folder:
        return _next_box('Next step: nothing to deliver', [_esc(
            'No candidate under SIZE_TARGET_KB trained successfully. Raise SIZE_TARGET_KB or '
            'lower CHANNEL_SCALES / FC_SCALES; for failed or diverged candidates, read the error '
            'in stage2_results.csv (a lower LEARNING_RATE helps against divergence).')], bad=True)
    path = deliverable_file(result_folder, settings)
    test = settings.TEST_DIR or '<test folder>'
    command = f"python predict.py {shlex.quote(os.path.normpath(path))} {shlex.quote(test)}"
    if _met(info, result_folder):
        kb = os.path.getsize(path) / 1024 if os.path.isfile(path) else np.nan
        size = f" ({kb:.2f} KB)" if pd.notna(kb) else ''
        return _next_box('Next step: the deliverable', [
            f"Deliverable: {_code(os.path.normpath(path))}{_esc(size)}, meeting both targets.",
            f"Predict with it: {_code(command)} (writes predictions.csv: the probabilities and "
            f"the predicted label; with labelled data it prints the metrics)."])
    name = f"c{info.get('channel_scale', '?')}-f{info.get('fc_scale', '?')}"
    row = rows[rows['candidate'] == name].tail(1) if 'candidate' in rows else rows.iloc[0:0]
    row = row.iloc[0] if len(row) else pd.Series(dtype=object)
    score, kb = pd.to_numeric(row.get('score'), errors='coerce'), _deliverable_kb(row)
    short = (f"{100 * score:.1f} % against METRIC_TARGET {settings.METRIC_TARGET:g} "
             f"({settings.METRIC_TARGET - 100 * score:.1f} points short)" if pd.notna(score) else
             f"no score against METRIC_TARGET {settings.METRIC_TARGET:g}")
    size = f" at {kb:.2f} KB (SIZE_TARGET_KB {settings.SIZE_TARGET_KB:g})" if pd.notna(kb) else ''
    return _next_box('Next step: the targets are missed', [
        _esc(f"This result misses: its best candidate under the size cap, {name}, scores "
             f"{short}{size}. It is not a deliverable that meets the targets."),
        _esc("To change: train longer (NUM_EPOCHS) or at another LEARNING_RATE (stage one's "
             "pick), allow larger candidates (higher CHANNEL_SCALES / FC_SCALES with a higher "
             "SIZE_TARGET_KB), or lower METRIC_TARGET."),
        f"To try it anyway: {_code(command)}"], bad=True)


def _deliverable_kb(row):
    """KB of the file stage two delivers: the INT8 one when it was quantized."""
    int8 = pd.to_numeric(row.get('int8_bytes'), errors='coerce')
    return int8 / 1024 if pd.notna(int8) else pd.to_numeric(row.get('onnx_kb'), errors='coerce')


def _display(path):
    return os.path.normpath(path) if path else path


def _winner(info):
    """(channel_scale, fc_scale) of the result folder's result.json, or None."""
    try:
        return int(info['channel_scale']), int(info['fc_scale'])
    except (KeyError, TypeError, ValueError):
        return None


def _met(info, result_folder):
    """Whether the result folder's model meets both targets (its verdict says so)."""
    if not result_folder:
        return False
    text = info.get('verdict') or read_text(os.path.join(result_folder, 'evaluation_metrics.txt'))
    return 'does NOT meet' not in str(text)


def _stage_two_figures(figures, rows, settings, info, result_folder):
    parts = ['<h2 id="grid">Channel x FC grid</h2>']
    winner = _winner(info)
    cells, views = grid_cells(planned_cells(rows, settings, _met(info, result_folder)), settings)
    parts.append(_figure_or_note(
        figures.draw('stage2-grid', plots.stage_two_grid_plot, cells,
                     metric_target=settings.METRIC_TARGET, size_target_kb=settings.SIZE_TARGET_KB,
                     winner=winner, metric_label=metric_label(settings), views=views),
        'Every channel x FC scaling pair of CHANNEL_SCALES x FC_SCALES: colour = score (green at '
        'or above METRIC_TARGET, red below), the text its ONNX size (planned size where it was '
        'never trained); grey with diagonal lines: over SIZE_TARGET_KB (never trained); pink '
        'cross-hatched: diverged or failed; white: not needed (a smaller candidate met both '
        'targets first); light grey: untrained; the outlined cell is the result.'
        + (' Pale blue, dotted: stopped at a rung of successive halving (its score, of that '
           'rung\'s epochs, in the text; not coloured).'
           if (rows['status'] == TrialStatus.STOPPED).any() else '')
        + (' Float beside INT8: with QUANTIZE_INT8 the INT8 file decides.'
           if len(views) > 1 else ''),
        'stage two grid'))
    return parts


def _stage_two_training(figures, rows, settings, info):
    winner = _winner(info)
    history = info.get('history')
    parts = ['<h2 id="training">Training</h2>']
    parts += _loss_section(
        figures, 'stage2-result-loss',
        [_curve(f"c{winner[0]}-f{winner[1]}" if winner else 'result', history,
                info.get('best_epoch'), info.get('stop_reason'))],
        'Result: loss per epoch',
        'Train and validation loss of the result; the dashed line marks the kept epoch.',
        'result loss curve',
        missing='No per-epoch history in the result folder\'s result.json: loss curve not '
                'available.')
    if isinstance(info.get('confusion'), dict):
        parts.append(_figure_or_note(
            figures.draw('stage2-result-confusion', plots.confusion_plot, info['confusion'],
                         title='Result: confusion matrices', class_names=class_names(settings)),
            'Counts on the validation and test splits, coloured by the share of each true class.',
            'result confusion'))
    else:
        parts.append(_note('No confusion matrix in the result folder\'s result.json.'))
    curves = []
    trained = [TrialStatus.OK, TrialStatus.DIVERGED, TrialStatus.STOPPED]   # stopped: halving
    for i, row in rows[rows['status'].isin(trained)].iterrows():
        candidate = read_json(os.path.join(settings.TEMP_DIR, str(row['candidate']), 'result.json'))
        label = str(row['candidate']) + (f" {_stage_two_rows(rows.loc[[i]], settings)[0]['status']}"
                                         if row['status'] == TrialStatus.STOPPED else '')
        curves.append(_curve(label, candidate.get('history', row.get('history')),
                             candidate.get('best_epoch', row.get('best_epoch')),
                             row.get('stop_reason')))
    parts += _loss_section(figures, 'stage2-candidates-loss', curves,
                           'Every trained candidate: loss per epoch (smallest first)',
                           'Each trained candidate, in training order (smallest first).',
                           'candidates loss')
    return parts


def stage_two_html(settings, result_folder, figures, data_summary=''):
    """The stage-two page as text (figures drawn through `figures`)."""
    report_dir = result_folder or settings.TEMP_DIR
    rows, others = load_stage_two(settings, result_folder)
    info = read_json(os.path.join(result_folder, 'result.json')) if result_folder else {}
    css, verdict = _verdict(result_folder, info, settings, rows)
    body = [f'<h1>ATML stage two: {_esc(_display(report_dir))}</h1>',
            f'<p class="verdict {css}">{_esc(verdict)}</p>',
            _others_note(others, 'row(s) of stage2_results.csv'),
            '<nav><a href="#next">next step</a><a href="#grid">grid</a>'
            '<a href="#table">candidates</a><a href="#subjects">subjects</a>'
            '<a href="#training">training</a><a href="#data">data</a>'
            '<a href="#settings">settings</a></nav>',
            _stage_two_next(settings, result_folder, info, rows)]
    if rows.empty:
        body.append(_note('No stage-two candidate of the current settings is recorded.'))
    else:
        lead = _stage_two_lead(rows, settings, _met(info, result_folder))
        body.append(f'<p class="lead">{_esc(lead)}</p>')
        body += _stage_two_figures(figures, rows, settings, info, result_folder)
        body += _stage_two_tables(rows, settings, info, report_dir)
        if result_folder:
            body.append('<h2 id="subjects">Per subject: the result, worst first</h2>')
            body += _per_subject_html([(_display(result_folder), result_folder)])
        body += _stage_two_training(figures, rows, settings, info)
    body += ['<h2 id="data">Data</h2>', _data_html(data_summary),
             '<h2 id="settings">Settings</h2>', _settings_html(settings)]
    return _page(f"ATML stage two: {_display(report_dir)}", '\n'.join(b for b in body if b))


def _stage_two_tables(rows, settings, info, report_dir):
    """Trained (and failed) candidates in a table; the over-size ones folded away."""
    over = rows['status'] == TrialStatus.OVER_SIZE
    columns = _stage_two_columns(rows)
    parts = ['<h2 id="table">Candidates, smallest first</h2>']
    tried = rows[~over].reset_index(drop=True)
    if len(tried):
        parts.append(_table(columns, _stage_two_rows(tried, settings),
                            highlight=_winner_index(tried, info)))
    else:
        parts.append(_note('No candidate under the size target has been trained.'))
    if over.any():
        oversize = rows[over].reset_index(drop=True)
        names = ', '.join(oversize['candidate'].astype(str))
        parts.append(f'<details><summary>{int(over.sum())} candidate(s) over SIZE_TARGET_KB='
                     f'{_esc(settings.SIZE_TARGET_KB)} (never trained): {_esc(names)}</summary>'
                     + _table(columns[:5], _stage_two_rows(oversize, settings)) + '</details>')
    return parts


def _stage_two_lead(rows, settings, met=False):
    status = planned_cells(rows, settings, met)['status'].fillna('').astype(str)
    needless = int((status.str.replace('-', ' ') == plots.NOT_NEEDED).sum())
    untrained = int((status == '').sum())
    over = int(status.isin([TrialStatus.OVER_LATENCY, TrialStatus.OVER_RAM]).sum())
    stopped = int((status == TrialStatus.STOPPED).sum())
    going = int((status == TrialStatus.PROMOTED).sum())
    text = (f"{len(status)} candidate(s): {int((status == TrialStatus.OK).sum())} trained, "
            f"{int(status.isin([TrialStatus.DIVERGED, TrialStatus.FAILED]).sum())} diverged or "
            f"failed, {int((status == TrialStatus.OVER_SIZE).sum())} over the size target"
            + (f", {stopped} stopped at a rung (successive halving)" if stopped else '')
            + (f", {going} promoted, their next rung not recorded yet" if going else '')
            + (f", {over} over the latency or memory target" if over else '')
            + (f", {needless} not needed (a smaller one met)" if needless else '')
            + (f", {untrained} not trained yet" if untrained else ''))
    stamps = rows.get('finished_at', pd.Series([], dtype=str)).dropna().astype(str)
    stamps = stamps[stamps != '']
    return text + (f"; latest recorded at {stamps.max()}" if len(stamps) else '') + '.'


def _winner_index(rows, info):
    winner = _winner(info)
    if winner is None:
        return ()
    return tuple(int(i) for i in rows.index[rows['candidate'] == f"c{winner[0]}-f{winner[1]}"])


def write_stage_two_report(settings, result_folder, data_summary=None):
    """Write <result_folder>/report.html (and figures/*.png) from the files; its path.
    Without a result folder (nothing trained under the size cap) the page goes to TEMP_DIR."""
    folder = result_folder or settings.TEMP_DIR
    os.makedirs(folder, exist_ok=True)
    summary = _keep_data_summary(folder, data_summary)
    figures = Figures(folder)
    page = stage_two_html(settings, result_folder, figures, summary)
    figures.tidy()
    return _write_atomic(os.path.join(folder, REPORT_NAME), page)
