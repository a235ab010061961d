"""Figures of an ATML search: matplotlib (Agg backend), plain data in, one PNG file out.

    from public.report import plots
    plots.size_score_plot(trials, 'figures/stage1-size.png', metric_label='min4 on val (%)')
    plots.latency_score_plot(trials, 'figures/stage1-latency.png')
    plots.lr_score_plot(trials, 'figures/stage1-lr.png', avoid_param=0.8)
    plots.loss_curves_plot([{'label': 'AFNet lr=0.003', 'history': [[1, .6, .5, .003], ...],
                             'best_epoch': 1, 'stop_reason': 'early-stop'}], 'figures/loss.png')
    plots.confusion_plot({'val': [[40, 2], [3, 35]], 'test': ...}, 'figures/cm.png')
    plots.stage_two_grid_plot(cells, 'figures/stage2-grid.png', metric_target=90,
                              size_target_kb=60, winner=(2, 1))

`trials` is a DataFrame with one row per trial and the columns of results.csv already made
numeric: model, lr, status ('ok', 'diverged', 'failed'; with SCHEDULER='halving' also
'stopped' and 'promoted'), pruned (bool), score (0..1), xx, yy, onnx_kb, latency_ms, and
rung (1, 2, ...; NaN in a grid search: a halving trial has one row per rung it trained). A missing column or value (NaN) means "not available": the
point is left out (and counted in the title), never an error. Every function writes its
PNG atomically (temporary file, then os.replace) and returns the path. Nothing here reads
results from the disk; public/report/pages.py does that.
"""
import json
import math
import os

import matplotlib

matplotlib.use('Agg')
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from public.train.outcome import TrialStatus  # noqa: E402

DPI = 100
PRUNED_COLOR = '#d62728'
NO_SCORE_COLOR = '#555555'
SKIPPED_COLOR = '#9e9e9e'
BROKEN_EDGE = '#b22222'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

plt.rcParams.update({'font.size': 9, 'axes.titlesize': 10, 'axes.labelsize': 9,
                     'legend.fontsize': 8, 'figure.titlesize': 11})


# ----------------------------------------------------------------------------- data helpers

def model_colors(models):
    """{model: colour}, the same colour for a model in every figure of a report."""
    palette = plt.get_cmap('tab10').colors + plt.get_cmap('Dark2').colors
    return {m: palette[i % len(palette)] for i, m in enumerate(dict.fromkeys(models))}


def numeric_column(frame, name, default=np.nan):
    """frame[name] as numbers (blank or text -> NaN); all NaN when the column is missing."""
    if name in frame.columns:
        return pd.to_numeric(frame[name], errors='coerce')
    return pd.Series(default, index=frame.index, dtype=float)


def _flags(frame, name):
    if name not in frame.columns:
        return pd.Series(False, index=frame.index)
    return frame[name].map(lambda v: v is True or str(v).strip().lower() == 'true')


def _status(frame):
    if 'status' not in frame.columns:
        return pd.Series(TrialStatus.OK.value, index=frame.index)
    return frame['status'].fillna('').astype(str).replace('', TrialStatus.OK.value)


def halving_rows(frame):
    """Whether a results table has rows of a successive-halving search (a rung recorded)."""
    return bool(numeric_column(frame, 'rung').notna().any())


def trial_ends(trials):
    """One row per trial: a halving trial's last row (its latest rung: a 'promoted' row whose
    next rung's row follows is left out); rows without a rung (a grid search) as they are."""
    rung = numeric_column(trials, 'rung')
    if not rung.notna().any():
        return trials
    lr = numeric_column(trials, 'lr')
    models = trials['model'] if 'model' in trials.columns else pd.Series('', index=trials.index)
    keep, last = pd.Series(True, index=trials.index), {}
    for i in trials.index[rung.notna()]:
        key = (str(models[i]), round(float(lr[i]), 12) if pd.notna(lr[i]) else i)
        if key in last and rung[last[key]] > rung[i]:
            keep[i] = False
            continue
        if key in last:
            keep[last[key]] = False
        last[key] = i
    return trials[keep]


def best_rows(trials):
    """Each model's best finished trial (max score, then yy, then xx, then the smaller
    learning rate: results.best_rank's order)."""
    if trials.empty or 'model' not in trials.columns:
        return trials.iloc[0:0]
    ok = trials[(_status(trials) == TrialStatus.OK) & numeric_column(trials, 'score').notna()]
    keys = pd.DataFrame({'score': numeric_column(ok, 'score'),
                         'yy': numeric_column(ok, 'yy').fillna(-1),
                         'xx': numeric_column(ok, 'xx').fillna(-1),
                         'neg_lr': -numeric_column(ok, 'lr').fillna(0)})
    picks = []
    for _, group in keys.groupby(ok['model'], sort=False):
        ranked = group.sort_values(['score', 'yy', 'xx', 'neg_lr'], ascending=False,
                                   kind='stable')
        picks.append(ranked.index[0])
    return trials.loc[picks]


def score_band(score, finished, pruned):
    """(low, high) y limits (percent) holding the finished trials that were not pruned (all
    finished ones when every one was pruned); None when nothing has a score. A pruned trial
    scoring far below would squash the band: it is drawn clipped to the bottom edge."""
    kept = score[finished & ~pruned].dropna()
    kept = kept if len(kept) else score[finished].dropna()
    if not len(kept):
        return None
    low, high = float(kept.min()), float(kept.max())
    pad = max(2.0, 0.1 * (high - low))
    return low - pad, min(100 + pad, high + pad)


def pareto_front(x, y):
    """Indices of the points no other point beats (x no larger and y no smaller), by x."""
    points = sorted((xi, -yi, i) for i, (xi, yi) in enumerate(zip(x, y))
                    if np.isfinite(xi) and np.isfinite(yi))
    front, best = [], -math.inf
    for xi, neg_y, i in points:
        if -neg_y > best:
            front.append(i)
            best = -neg_y
    return front


def history_frame(history):
    """A trial's history (list of [epoch, train_loss, val_loss, lr], list of dicts, or
    their JSON text) as a DataFrame with those four columns; None when not available."""
    if history is None or (isinstance(history, float) and math.isnan(history)):
        return None
    if isinstance(history, str):
        if not history.strip():
            return None
        try:
            history = json.loads(history)
        except ValueError:
            return None
    names = ['epoch', 'train_loss', 'val_loss', 'lr']
    try:
        if history and isinstance(history[0], dict):
            frame = pd.DataFrame(history).reindex(columns=names)
        else:
            frame = pd.DataFrame([list(r)[:4] + [np.nan] * (4 - len(r)) for r in history],
                                 columns=names)
    except (TypeError, ValueError, KeyError):
        return None
    frame = frame.apply(pd.to_numeric, errors='coerce').replace([np.inf, -np.inf], np.nan)
    return frame if len(frame) and frame['epoch'].notna().any() else None


# ----------------------------------------------------------------------------- saving

def _save(fig, path):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fig.savefig(tmp, format='png', dpi=DPI, metadata={'Software': None})
    finally:
        plt.close(fig)
    os.replace(tmp, path)
    return path


def is_png(path):
    """Whether path is a non-empty PNG file (checks the 8-byte signature)."""
    with open(path, 'rb') as f:
        return f.read(8) == _PNG_MAGIC


def _empty(ax, message):
    ax.text(0.5, 0.5, message, ha='center', va='center', transform=ax.transAxes,
            color=NO_SCORE_COLOR, fontsize=10, wrap=True)
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------- stage one

def size_score_plot(trials, path, metric_label='score (%)', title=None):
    """Selection score vs ONNX size (KB, log scale) of every finished trial."""
    return _tradeoff_plot(trials, path, 'onnx_kb', 'ONNX file size (KB, log scale)',
                          metric_label, title or 'Score vs model size, every trial', log=True)


def latency_score_plot(trials, path, metric_label='score (%)', title=None):
    """Selection score vs onnxruntime latency (ms per segment) of every finished trial."""
    return _tradeoff_plot(trials, path, 'latency_ms',
                          'onnxruntime latency (ms per segment, batch 1, log scale)',
                          metric_label, title or 'Score vs inference latency, every trial',
                          log=True)


def _tradeoff_plot(trials, path, x_col, x_label, metric_label, title, log):
    fig, ax = plt.subplots(figsize=(10, 5.6), layout='constrained')
    x, y = numeric_column(trials, x_col), 100 * numeric_column(trials, 'score')
    ok = (_status(trials) == TrialStatus.OK) & x.notna() & y.notna() & (x > 0)
    hidden = len(trials) - int(ok.sum())
    if not ok.any():
        _empty(ax, 'no finished trial with a score and a size yet')
        ax.set_title(title)
        return _save(fig, path)
    shown = trials[ok]
    colours = model_colors(trials['model'] if 'model' in trials.columns else [])
    pruned = _flags(shown, 'pruned')
    band = score_band(y[ok], pd.Series(True, index=shown.index), pruned)
    below = (y < band[0]) & ok & _flags(trials, 'pruned')
    for model, group in shown.groupby(shown.get('model', pd.Series('', index=shown.index)),
                                      sort=False):
        colour = colours.get(model, 'C0')
        keep, cut = group[~pruned[group.index]], group[pruned[group.index]]
        ax.scatter(x[keep.index], y[keep.index], color=colour, s=36, alpha=0.85,
                   label=str(model), zorder=3)
        inside = cut[~below[cut.index]]
        ax.scatter(x[inside.index], y[inside.index], facecolors='none', edgecolors=colour,
                   s=36, linewidths=1.2, zorder=3,
                   label=f"{model} (pruned)" if len(inside) else None)
        clipped = cut[below[cut.index]]
        ax.scatter(x[clipped.index], [band[0]] * len(clipped), marker='v', facecolors='none',
                   edgecolors=colour, s=44, linewidths=1.2, zorder=3, clip_on=False)
    if below.any():
        ax.scatter([], [], marker='v', facecolors='none', edgecolors='grey', s=44,
                   label=f"pruned, below {band[0]:.0f} % (at the bottom edge)")
    front = pareto_front(x[ok].to_numpy(), y[ok].to_numpy())
    fx, fy = x[ok].to_numpy()[front], y[ok].to_numpy()[front]
    ax.plot(fx, fy, color='black', linestyle='--', linewidth=1, drawstyle='steps-post',
            zorder=2, label='Pareto front')
    if log:
        ax.set_xscale('log')
        _plain_log_ticks(ax.xaxis)
    ax.margins(x=0.06, y=0.08)
    ax.set_ylim(*band)
    _label_best(ax, best_rows(shown), x, y, colours)
    ax.set_xlabel(x_label)
    ax.set_ylabel(metric_label)
    ax.grid(True, which='both', alpha=0.25)
    if hidden:
        title += f" ({hidden} trial(s) without size or score not shown)"
    ax.set_title(title)
    ax.legend(loc='upper left', bbox_to_anchor=(1.01, 1), frameon=False)
    return _save(fig, path)


def _plain_log_ticks(axis):
    """Log-axis tick labels as plain numbers (20, 50, 100), not powers of ten."""
    formatter = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axis.set_major_formatter(formatter)
    axis.set_minor_formatter(matplotlib.ticker.FuncFormatter(
        lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in '25' else ''))


def _label_best(ax, best, x, y, colours):
    """Ring and label each model's best trial; labels stacked so close points stay legible,
    and put on the side of the point that has room (left near the right edge, below near
    the top)."""
    ax.autoscale_view()
    to_axes = ax.transData + ax.transAxes.inverted()
    order = sorted(best.index, key=lambda i: (y[i], x[i]))
    for n, i in enumerate(order):
        row = best.loc[i]
        colour = colours.get(row.get('model'), 'C0')
        ax.scatter([x[i]], [y[i]], s=160, facecolors='none', edgecolors='black', linewidths=1.6,
                   zorder=4)
        fx, fy = to_axes.transform((x[i], y[i]))
        left, dy = fx > 0.7, (-16 if fy > 0.95 else 6) - 11 * (n % 2)
        text = f"{row.get('model', '')} {xx_yy(row)}".strip()
        ax.annotate(text, (x[i], y[i]), xytext=(-10 if left else 10, dy),
                    textcoords='offset points', ha='right' if left else 'left', fontsize=8,
                    color=colour, fontweight='bold', zorder=5,
                    bbox=dict(boxstyle='round,pad=0.15', fc='white', ec='none', alpha=0.85))


def xx_yy(row):
    """The 'xx-yy' folder name of a results row, '' when it has no digits."""
    xx = pd.to_numeric(row.get('xx'), errors='coerce')
    yy = pd.to_numeric(row.get('yy'), errors='coerce')
    return f"{int(xx)}-{int(yy)}" if pd.notna(xx) and pd.notna(yy) else ''


def lr_score_plot(trials, path, metric_label='score (%)', avoid_param=None, skipped=None):
    """One panel per model: score vs learning rate; pruned, diverged, failed marked, and
    the rates avoid.txt skipped (skipped: {model: [lr, ...]}) as grey crosses at the bottom.
    Successive halving: a trial's rungs at its rate are joined by a thin line, a 'promoted'
    rung a small point, a 'stopped' trial's last rung a hollow one."""
    models = list(dict.fromkeys(trials['model'])) if 'model' in trials.columns else []
    ncols = min(3, max(1, len(models)))
    nrows = max(1, math.ceil(len(models) / ncols))
    halving = halving_rows(trials)
    width = 3.6 * ncols + 0.6
    width = max(width, 7.8) if halving else width     # room for its title and longer legend
    fig, axes = plt.subplots(nrows, ncols, figsize=(width, 2.9 * nrows + 0.6),
                             layout='constrained', squeeze=False)
    for ax in axes.flat[len(models):]:
        ax.set_visible(False)
    if not models:
        axes[0, 0].set_visible(True)
        _empty(axes[0, 0], 'no trial recorded yet')
        return _save(fig, path)
    colours = model_colors(models)
    best = set(best_rows(trials).index)
    for ax, model in zip(axes.flat, models):
        _lr_panel(ax, trials[trials['model'] == model], model, colours[model], best, avoid_param,
                  sorted((skipped or {}).get(model, ())))
        ax.set_ylabel(metric_label if ax in axes[:, 0] else '')
    status = set(_status(trials))
    fig.suptitle('Score per learning rate (each marker is one trial)' if not halving else
                 'Score per learning rate (each marker is one rung of a trial, a thin line '
                 'joins a trial\'s rungs)')
    fig.legend(handles=_lr_legend(avoid_param is not None, any((skipped or {}).values()),
                                  stopped=TrialStatus.STOPPED in status,
                                  promoted=TrialStatus.PROMOTED in status),
               loc='outside lower center', ncols=3 if halving else 4, frameon=False)
    return _save(fig, path)


def _lr_panel(ax, group, model, colour, best, avoid_param, skipped=()):
    lr, score = numeric_column(group, 'lr'), 100 * numeric_column(group, 'score')
    status = _status(group)
    pruned = _flags(group, 'pruned')
    scored = (status == TrialStatus.OK) & score.notna() & lr.notna()
    # halving: the scores a trial had at its rungs (went on, or stopped there)
    rungs = status.isin([TrialStatus.STOPPED, TrialStatus.PROMOTED]) & score.notna() & lr.notna()
    band = score_band(score, scored | rungs, pruned)
    below = scored & (score < band[0]) if band else scored & False
    plain, cut = scored & ~pruned & ~below, scored & pruned & ~below
    if rungs.any():
        _rung_paths(ax, group, lr, score, colour)
        stopped, promoted = rungs & (status == TrialStatus.STOPPED), rungs & ~(status == TrialStatus.STOPPED)
        ax.scatter(lr[promoted], score[promoted], color=colour, s=12, zorder=3)
        ax.scatter(lr[stopped], score[stopped], facecolors='white', edgecolors=colour, s=40,
                   linewidths=1.3, zorder=3)
    ax.scatter(lr[plain], score[plain], color=colour, s=40, zorder=3)
    ax.scatter(lr[cut], score[cut], marker='v', color=PRUNED_COLOR, s=44, zorder=3)
    bottom = ax.get_xaxis_transform()           # x in data, y in axes fraction
    ax.scatter(lr[below], [0.0] * int(below.sum()), transform=bottom, marker='v',
               facecolors='none', edgecolors=PRUNED_COLOR, s=50, linewidths=1.3, zorder=4,
               clip_on=False)
    for i in group.index.intersection(list(best)):
        y, transform = (score[i], ax.transData) if not below[i] else (0.0, bottom)
        ax.scatter([lr[i]], [y], s=150, facecolors='none', edgecolors='black',
                   linewidths=1.5, zorder=4, transform=transform, clip_on=False)
    for state, marker, y in ((TrialStatus.DIVERGED, 'X', 0.06), (TrialStatus.FAILED, 'd', 0.06)):
        mask = (status == state) & lr.notna()
        ax.scatter(lr[mask], [y] * int(mask.sum()), transform=bottom, marker=marker,
                   color=NO_SCORE_COLOR if state == TrialStatus.FAILED else PRUNED_COLOR, s=50, zorder=3,
                   clip_on=False)
    ax.scatter(list(skipped), [0.06] * len(skipped), transform=bottom, marker='x',
               color=SKIPPED_COLOR, s=46, linewidths=1.6, zorder=3, clip_on=False)
    if avoid_param is not None:
        ax.axhline(100 * avoid_param, color=PRUNED_COLOR, linestyle=':', linewidth=1)
    if band:
        ax.set_ylim(*band)
    else:
        ax.set_yticks([])
    values = sorted(set(lr.dropna().unique()) | set(skipped))
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values], rotation=45, ha='right', fontsize=7)
    if len(values) == 1:
        ax.set_xlim(values[0] * 0.8, values[0] * 1.2)
    ax.set_xlabel('learning rate')
    ax.grid(True, alpha=0.25)
    ends = _status(trial_ends(group))
    stopped = int((ends == TrialStatus.STOPPED).sum())
    title = f"{model}: {len(ends)} trial(s)" + (f", {stopped} stopped" if stopped else '')
    ax.set_title(title + (f", {len(skipped)} skipped" if len(skipped) else ''))


def _rung_paths(ax, group, lr, score, colour):
    """A thin line per halving trial through its rungs' scores (rung 1 first, its last row
    last), at its learning rate."""
    rung = numeric_column(group, 'rung')
    paths = {}
    for i in group.index[rung.notna() & lr.notna() & score.notna()]:
        paths.setdefault(round(float(lr[i]), 12), []).append(i)
    for rows in paths.values():
        if len(rows) > 1:
            rows = sorted(rows, key=lambda i: rung[i])       # stable: a rerun's row after
            ax.plot(lr[rows], score[rows], color=colour, linewidth=0.9, alpha=0.55, zorder=2)


def _lr_legend(with_avoid, with_skipped=False, stopped=False, promoted=False):
    handles = [Line2D([], [], marker='o', linestyle='', color='grey', label='finished'),
               Line2D([], [], marker='v', linestyle='', color=PRUNED_COLOR,
                      label='pruned (score below AVOID_PARAM)'),
               Line2D([], [], marker='v', linestyle='', markerfacecolor='none',
                      markeredgecolor=PRUNED_COLOR, label='pruned, below the axis (at its edge)'),
               Line2D([], [], marker='X', linestyle='', color=PRUNED_COLOR,
                      label='diverged (no score)'),
               Line2D([], [], marker='d', linestyle='', color=NO_SCORE_COLOR,
                      label='failed (no score)'),
               Line2D([], [], marker='o', linestyle='', markerfacecolor='none',
                      markeredgecolor='black', markersize=10, label="model's best")]
    if with_skipped:
        handles.append(Line2D([], [], marker='x', linestyle='', color=SKIPPED_COLOR,
                              markeredgewidth=1.6, label='skipped (avoid.txt)'))
    if with_avoid:
        handles.append(Line2D([], [], color=PRUNED_COLOR, linestyle=':', label='AVOID_PARAM'))
    if promoted:
        handles.append(Line2D([], [], marker='o', markersize=3.5, color='grey', linewidth=0.9,
                              alpha=0.8, label='promoted (went on); line: one trial'))
    if stopped:
        handles.append(Line2D([], [], marker='o', linestyle='', markerfacecolor='white',
                              markeredgecolor='grey', markeredgewidth=1.3,
                              label='stopped at a rung (not pruned)'))
    return handles


# ----------------------------------------------------------------------------- loss curves

def loss_curves_plot(curves, path, title='Loss per epoch', sharey=False):
    """Small multiples: train and validation loss per epoch, one panel per curve.

    curves: dicts with 'label', 'history' (see history_frame), optional 'best_epoch' (the
    epoch whose weights were kept: a dashed line) and 'stop_reason' (the last epoch is
    marked as the early stop when it says so)."""
    curves = list(curves)
    ncols = min(4, max(1, len(curves)))
    nrows = max(1, math.ceil(len(curves) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(6.5, 3.3 * ncols + 0.4), 2.5 * nrows + 0.8),
                             layout='constrained', squeeze=False, sharey=sharey)
    for ax in axes.flat[len(curves):]:
        ax.set_visible(False)
    if not curves:
        axes[0, 0].set_visible(True)
        _empty(axes[0, 0], 'no trial to show')
    for ax, curve in zip(axes.flat, curves):
        _loss_panel(ax, curve)
    for ax in axes[:, 1:].flat:           # one y label per row is enough
        ax.set_ylabel('')
    fig.suptitle(title)
    fig.legend(handles=[Line2D([], [], color='C0', label='train loss'),
                        Line2D([], [], color='C1', label='validation loss'),
                        Line2D([], [], color='black', linestyle='--', label='best epoch (kept)'),
                        Line2D([], [], color=PRUNED_COLOR, marker='s', linestyle='',
                               label='early stop')],
               loc='outside lower center', ncols=4, frameon=False)
    return _save(fig, path)


def _loss_panel(ax, curve):
    ax.set_title(str(curve.get('label', '')), fontsize=8)
    history = history_frame(curve.get('history'))
    if history is None:
        _empty(ax, 'no history recorded')
        return
    epoch = history['epoch']
    ax.plot(epoch, history['train_loss'], color='C0', marker='.', markersize=3, linewidth=1.2)
    ax.plot(epoch, history['val_loss'], color='C1', marker='.', markersize=3, linewidth=1.2)
    best = pd.to_numeric(curve.get('best_epoch'), errors='coerce')
    if pd.notna(best) and best > 0:
        ax.axvline(best, color='black', linestyle='--', linewidth=0.9)
    if 'early' in str(curve.get('stop_reason', '')):
        last = history.dropna(subset=['epoch']).iloc[-1]
        ax.plot([last['epoch']], [last['val_loss']], marker='s', color=PRUNED_COLOR,
                linestyle='', markersize=6)
    ax.set_xlabel('epoch')
    ax.set_ylabel('cross-entropy loss')
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=8, integer=True))
    ax.grid(True, alpha=0.25)


# ----------------------------------------------------------------------------- confusion

def confusion_plot(confusion, path, title='Confusion matrices', class_names=None):
    """Validation and test confusion matrices side by side: counts, coloured by the share
    of each true class (row-normalised), so recall per class reads off the diagonal."""
    splits = [(s, np.asarray(confusion[s], dtype=float)) for s in ('val', 'test')
              if confusion.get(s) is not None and np.size(confusion[s])]
    fig, axes = plt.subplots(1, max(1, len(splits)), figsize=(3.1 * max(1, len(splits)) + 1.2, 3.0),
                             layout='constrained', squeeze=False)
    if not splits:
        _empty(axes[0, 0], 'no confusion matrix recorded')
    image = None
    for ax, (split, matrix) in zip(axes.flat, splits):
        panel = _label_panel if matrix.ndim == 3 else _confusion_panel
        image = panel(ax, split, matrix, class_names)
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.8, label='share of the true class')
    fig.suptitle(title)
    return _save(fig, path)


def _confusion_panel(ax, split, matrix, class_names):
    totals = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, totals, out=np.zeros_like(matrix), where=totals > 0)
    image = ax.imshow(share, cmap='Blues', vmin=0, vmax=1)
    k = len(matrix)
    names = [str(i) for i in range(k)]
    if class_names and len(class_names) == k:
        names = list(class_names)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, f"{int(matrix[i, j])}\n{100 * share[i, j]:.0f}%", ha='center',
                    va='center', fontsize=8 if k <= 6 else 6,
                    color='white' if share[i, j] > 0.6 else 'black')
    ax.set_xticks(range(k), names, rotation=30 if k > 3 else 0)
    ax.set_yticks(range(k), names)
    ax.set_xlabel('predicted class')
    ax.set_ylabel('true class')
    label = {'val': 'validation', 'test': 'test'}[split]
    ax.set_title(f"{label} ({int(matrix.sum())} segments)")
    return image


def _label_panel(ax, split, matrices, class_names):
    """Multi-label: one row per label (its 2x2 matrix [[TN, FP], [FN, TP]]): the share of
    segments without the label predicted without it, and with it predicted with it."""
    k = len(matrices)
    counts = np.stack([matrices[:, 0, 0], matrices[:, 1, 1]], axis=1)
    totals = np.stack([matrices[:, 0].sum(1), matrices[:, 1].sum(1)], axis=1)
    share = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    image = ax.imshow(share, cmap='Blues', vmin=0, vmax=1, aspect='auto')
    names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
    for i in range(k):
        for j in range(2):
            ax.text(j, i, f"{int(counts[i, j])}/{int(totals[i, j])}\n{100 * share[i, j]:.0f}%",
                    ha='center', va='center', fontsize=7,
                    color='white' if share[i, j] > 0.6 else 'black')
    ax.set_xticks(range(2), ['absent: kept out', 'present: found'])
    ax.set_yticks(range(k), names)
    label = {'val': 'validation', 'test': 'test'}[split]
    ax.set_title(f"{label} ({int(matrices[0].sum())} segments)")
    return image


# ----------------------------------------------------------------------------- stage two

def stage_two_grid_plot(cells, path, *, metric_target, size_target_kb, winner=None,
                        metric_label='score (%)', views=(('ONNX', 'score', 'kb'),)):
    """Channel-scale x FC-scale grid, one panel per view (e.g. float and INT8).

    cells: one row per candidate: channel_scale, fc_scale, status ('ok', 'over-size',
    'diverged', 'failed', halving's 'stopped' and 'promoted' with their rung; '' or missing =
    untrained) and, per view (title, score column, KB column), its score (%) and size (KB).
    winner: (channel_scale, fc_scale) or None. A stopped candidate's score (of its rung's
    epochs) is written in its cell, not coloured."""
    channels = sorted(numeric_column(cells, 'channel_scale').dropna().astype(int).unique())
    fcs = sorted(numeric_column(cells, 'fc_scale').dropna().astype(int).unique())
    width = max(5.0, 1.15 * max(1, len(fcs)) + 1.6)
    fig, axes = plt.subplots(1, len(views), figsize=(width * len(views) + 1.0,
                                                     1.0 * max(1, len(channels)) + 2.2),
                             layout='constrained', squeeze=False)
    final = ~_status(cells).isin([TrialStatus.STOPPED, TrialStatus.PROMOTED])
    scores = pd.concat([numeric_column(cells, score)[final] for _, score, _ in views])
    norm = _target_norm(scores.dropna(), metric_target)
    for ax, (title, score_col, kb_col) in zip(axes.flat, views):
        if not channels or not fcs:
            _empty(ax, 'no candidate recorded yet')
            continue
        _grid_panel(ax, cells, channels, fcs, score_col, kb_col, norm, winner)
        ax.set_title(title)
    if scores.notna().any():
        bar = fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap='RdYlGn'), ax=list(axes.flat),
                           shrink=0.85, label=metric_label)
        bar.ax.axhline(metric_target, color='black', linewidth=1.5)
    fig.suptitle(f"Stage-two candidates; targets:\n{metric_label} >= {metric_target:g}, "
                 f"ONNX <= {size_target_kb:.2f} KB")
    fig.legend(handles=_grid_legend(winner, set(_status(cells)) if len(cells) else ()),
               loc='outside lower center', ncols=2, frameon=False)
    return _save(fig, path)


def _target_norm(scores, target):
    """Red below the metric target, green above it."""
    centre = min(float(target), 99.5)
    low = min([centre - 10.0] + ([float(scores.min()) - 1] if len(scores) else []))
    return mcolors.TwoSlopeNorm(vmin=low, vcenter=centre, vmax=100.0)


def _grid_panel(ax, cells, channels, fcs, score_col, kb_col, norm, winner):
    cmap = plt.get_cmap('RdYlGn')
    latest = cells.assign(_c=numeric_column(cells, 'channel_scale'),
                          _f=numeric_column(cells, 'fc_scale'))
    latest = latest.drop_duplicates(['_c', '_f'], keep='last')
    for row_i, c in enumerate(channels):
        for col_j, f in enumerate(fcs):
            match = latest[(latest['_c'] == c) & (latest['_f'] == f)]
            row = match.iloc[0] if len(match) else None
            colour, hatch, text = _cell_look(row, score_col, kb_col, norm, cmap)
            edge = {OVER_SIZE_LOOK[1]: '#888888', BROKEN_LOOK[1]: BROKEN_EDGE,
                    STOPPED_LOOK[1]: STOPPED_EDGE}.get(hatch, 'white')
            ax.add_patch(Rectangle((col_j - 0.5, row_i - 0.5), 1, 1, facecolor=colour,
                                   hatch=hatch, edgecolor=edge, linewidth=0.8))
            ax.text(col_j, row_i, text, ha='center', va='center', fontsize=8.5,
                    bbox=dict(boxstyle='round,pad=0.2', fc='white', ec='none', alpha=0.75))
            if winner is not None and (c, f) == tuple(int(v) for v in winner):
                ax.add_patch(Rectangle((col_j - 0.47, row_i - 0.47), 0.94, 0.94, fill=False,
                                       edgecolor='black', linewidth=3, zorder=5))
    ax.set_xlim(-0.5, len(fcs) - 0.5)
    ax.set_ylim(-0.5, len(channels) - 0.5)
    ax.set_xticks(range(len(fcs)), [str(f) for f in fcs])
    ax.set_yticks(range(len(channels)), [str(c) for c in channels])
    ax.set_xlabel('FC scaling factor')
    ax.set_ylabel('channel scaling factor')
    ax.set_aspect('equal')


NOT_NEEDED = 'not needed'       # a cell's status: never trained, a smaller candidate met
OVER_SIZE_LOOK = ('#d9d9d9', '///')
BROKEN_LOOK = ('#f4c7c3', 'xx')   # diverged / failed: reddish, cross-hatched
STOPPED_LOOK = ('#d6e4f5', '..')  # halving: stopped at a rung: pale blue, dotted
STOPPED_EDGE = '#5b7fa8'
PROMOTED_FACE = '#eef4fb'         # halving, mid-search: promoted, its next rung not yet run


def _cell_look(row, score_col, kb_col, norm, cmap):
    """(face colour, hatch, text) of one grid cell."""
    if row is None:
        return '#f4f4f4', None, 'not trained'
    status = str(row.get('status', '') or '')
    kb = pd.to_numeric(row.get(kb_col), errors='coerce')
    size = f"{kb:.2f} KB" if pd.notna(kb) else ''
    if status in (TrialStatus.OVER_SIZE, TrialStatus.OVER_LATENCY, TrialStatus.OVER_RAM):
        return (*OVER_SIZE_LOOK, f"{size}\n{status}".strip())
    score = pd.to_numeric(row.get(score_col), errors='coerce')
    if status == TrialStatus.OK and pd.notna(score):
        return cmap(norm(score)), None, f"{size}\n{score:.1f}%"
    if status in (TrialStatus.DIVERGED, TrialStatus.FAILED):
        return (*BROKEN_LOOK, f"{size}\n{status}".strip())
    if status in (TrialStatus.STOPPED, TrialStatus.PROMOTED):
        rung = pd.to_numeric(row.get('rung'), errors='coerce')
        what = f"{status} (rung {int(rung)})" if pd.notna(rung) else status
        text = '\n'.join(t for t in (size, what, f"{score:.1f}%" if pd.notna(score) else '') if t)
        if status == TrialStatus.STOPPED:
            return (*STOPPED_LOOK, text)
        return PROMOTED_FACE, None, text
    if status.replace('-', ' ') == NOT_NEEDED:
        return '#ffffff', None, f"{size}\nnot needed".strip()
    return '#e8e8e8', None, f"{size}\nuntrained".strip()


def _grid_legend(winner, statuses=()):
    handles = [Patch(facecolor=OVER_SIZE_LOOK[0], hatch=OVER_SIZE_LOOK[1], edgecolor='#888888',
                     label='over the size target (never trained)'),
               Patch(facecolor=BROKEN_LOOK[0], hatch=BROKEN_LOOK[1], edgecolor=BROKEN_EDGE,
                     label='diverged / failed'),
               Patch(facecolor='#ffffff', edgecolor='#888888',
                     label='not needed (a smaller one met)'),
               Patch(facecolor='#e8e8e8', label='untrained')]
    if TrialStatus.STOPPED in statuses:
        handles.append(Patch(facecolor=STOPPED_LOOK[0], hatch=STOPPED_LOOK[1],
                             edgecolor=STOPPED_EDGE,
                             label='stopped at a rung (halving; score of its rung\'s epochs)'))
    if TrialStatus.PROMOTED in statuses:
        handles.append(Patch(facecolor=PROMOTED_FACE, edgecolor='#888888',
                             label='promoted, its next rung not trained yet'))
    if winner is not None:
        handles.append(Patch(facecolor='none', edgecolor='black', linewidth=3,
                             label=f"result c{winner[0]}-f{winner[1]}"))
    return handles
