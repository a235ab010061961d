"""The reports of a SCHEDULER='halving' search show each trial's rungs and status.

A real small halving search (canned trials, tests/test_halving.py's HalvingTrainer: real
bookkeeping, best folders and ONNX files, scores that rise with the epochs) over two models
and eight learning rates, with a diverged trial and a pruned early stop:
- stage one's page has a "Successive halving" table (one row per model and rate: its score at
  each rung, its final status, the epochs it trained), its lead counts the stopped trials, the
  summary counts each trial once, and the per-learning-rate figure draws every rung;
- the same search as a grid has none of it;
- stage two's candidates table has a rung column, a stopped candidate reads 'stopped (rung k)',
  and the grid figure gives it a look of its own.
"""
import base64
import csv
import os
import re
from html.parser import HTMLParser

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from conftest import PARAMS, TinyNet, TinyNetB, settings_values
import public.report.plots as plots
from public.core.interrupts import NoInterrupts
from public.core.settings import load_settings
from public.report.pages import write_stage_one_report, write_stage_two_report
from public.results.table import ResultsTable, STAGE1_COLUMNS
from public.search.executor import SerialExecutor
from public.search.stage_one import run_stage_one
from test_halving import HalvingTrainer

PNG = b'\x89PNG\r\n\x1a\n'
# rungs of 1, 2, 4, 8 -> 12 epochs (eta 2; a rung of one goes straight to NUM_EPOCHS)
HALVING = dict(SCHEDULER='halving', NUM_EPOCHS=12, HALVING_MIN_EPOCHS=1, HALVING_ETA=2,
               LR_MIN=0.001, LR_MAX=0.008, STEP=0.001, AVOID_PARAM=0.45, STAGE1_TARGET=100)


def _plan():
    values = {'TinyNet': [0.50, 0.62, 0.61, 0.70, 0.40, 0.66, 0.55, 0.30],
              'TinyNetB': [0.72, 0.58, 0.64, 0.81, 0.69, 0.60, 0.75, 0.30]}
    plan = {f"{m}@{round(0.001 * (i + 1), 3)}": ('ok', v, 12)
            for m, vs in values.items() for i, v in enumerate(vs)}
    plan['TinyNet@0.008'] = ('diverged', 0.0, 1)         # diverges in rung 1
    plan['TinyNetB@0.008'] = ('ok', 0.3, 1)               # early stop, below AVOID_PARAM: pruned
    plan['TinyNetB@0.004'] = ('ok', 0.81, 3)              # early stop inside rung 3 (4 epochs)
    return plan


def _settings(folder, small_data, **overrides):
    values = settings_values(folder, small_data, **overrides)
    return load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))


def _search(folder, small_data, prepared, **overrides):
    settings = _settings(folder, small_data, **{**HALVING, **overrides})
    run_stage_one(settings, prepared, [TinyNet, TinyNetB], NoInterrupts(), log=lambda m: None,
                  progress=False, executor=SerialExecutor(prepared),
                  trainer=HalvingTrainer(_plan(), HALVING['NUM_EPOCHS']))
    return settings, write_stage_one_report(settings)


@pytest.fixture(scope='module')
def halving(tmp_path_factory, small_data, prepared):
    return _search(tmp_path_factory.mktemp('report-halving'), small_data, prepared)


@pytest.fixture(scope='module')
def grid(tmp_path_factory, small_data, prepared):
    return _search(tmp_path_factory.mktemp('report-grid'), small_data, prepared, SCHEDULER='grid')


class _Tables(HTMLParser):
    """The page's text, its h2 headings, and each table (rows of cell texts, the row's class)
    under the h2 heading it follows."""

    def __init__(self):
        super().__init__()
        self.text, self.h2, self.tables, self.images = [], [], [], []
        self._in, self._cell, self._row = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == 'h2':
            self._in = 'h2'
            self.h2.append('')
        elif tag == 'table':
            self.tables.append((self.h2[-1] if self.h2 else '', []))
        elif tag == 'tr':
            self._row = ([], attrs.get('class', ''))
            self.tables[-1][1].append(self._row)
        elif tag in ('td', 'th'):
            self._cell = []
        elif tag == 'img':
            self.images.append(attrs.get('src', ''))

    def handle_endtag(self, tag):
        if tag == 'h2':
            self._in = None
        elif tag in ('td', 'th') and self._cell is not None:
            self._row[0].append(''.join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in == 'h2':
            self.h2[-1] += data
        if self._cell is not None:
            self._cell.append(data)


def _page(path):
    with open(path, encoding='utf-8') as f:
        raw = f.read()
    page = _Tables()
    page.feed(raw)
    page.raw, page.plain = raw, ' '.join(page.text)
    return page


def _table(page, heading, index=0):
    found = [rows for h, rows in page.tables if h == heading]
    return found[index]


def _rows(settings):
    return ResultsTable(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'), STAGE1_COLUMNS).rows()


def _summary(settings):
    with open(os.path.join(settings.MODEL_SAVE_PATH, 'summary.csv')) as f:
        return {r['model']: r for r in csv.DictReader(f)}


def test_the_halving_table_shows_each_trials_score_per_rung_status_and_epochs(halving):
    settings, path = halving
    page = _page(path)
    assert 'Successive halving' in page.h2
    assert page.h2.index('Successive halving') < page.h2.index(
        'Per subject: the best folders, worst first')           # after the summary tables
    table = _table(page, 'Successive halving')
    head, body = table[0][0], table[1:]
    assert head == ['model', 'lr', 'rung 1 (1 ep)', 'rung 2 (2 ep)', 'rung 3 (4 ep)',
                    'rung 4 (12 ep)', 'final status', 'epochs trained']
    rows = _rows(settings)
    trials = {}
    for r in rows:                       # rows are appended in rung order
        trials.setdefault((r['model'], float(r['lr'])), []).append(r)
    assert [(c[0], float(c[1])) for c, _ in body] == sorted(trials, key=lambda k: (k[0] != 'TinyNet', k[1]))
    for cells, css in body:
        mine = trials[(cells[0], float(cells[1]))]
        expected = ['' for _ in range(4)]
        for r in mine:
            expected[int(r['rung']) - 1] = (f"{100 * float(r['score']):.1f}" if r['score']
                                            else r['status'])
        assert cells[2:6] == expected, cells
        last = mine[-1]
        status = {'ok': 'pruned' if last['pruned'] == 'True' else 'ok',
                  'stopped': f"stopped at rung {last['rung']}"}.get(last['status'], last['status'])
        assert cells[6] == status
        assert cells[7] == str(max(int(r['epochs'] or 0) for r in mine))
        assert all(r['status'] == 'promoted' for r in mine[:-1])
        assert (css == 'best') == (cells[:2] in (['TinyNet', '0.002'], ['TinyNetB', '0.001']))
    by_key = {(c[0], c[1]): c for c, _ in body}
    assert by_key[('TinyNet', '0.002')][6:] == ['ok', '12']         # every rung, to 12 epochs
    assert by_key[('TinyNet', '0.008')][2:] == ['diverged', '', '', '', 'diverged', '1']
    assert by_key[('TinyNetB', '0.008')][6:] == ['pruned', '1']
    assert by_key[('TinyNetB', '0.004')][5:] == ['', 'ok', '3']     # early stop inside rung 3
    assert by_key[('TinyNet', '0.001')][6:] == ['stopped at rung 1', '1']
    # the summary's epochs trained and stopped trials, as summary.csv counts them
    summary = _summary(settings)
    for model in ('TinyNet', 'TinyNetB'):
        mine = [c for c, _ in body if c[0] == model]
        assert sum(int(c[7]) for c in mine) == int(summary[model]['epochs_trained'])
        assert sum(c[6].startswith('stopped') for c in mine) == int(summary[model]['stopped'])


def test_the_lead_and_summary_count_each_trial_once_and_the_stopped_ones(halving):
    settings, path = halving
    page = _page(path)
    summary = _summary(settings)
    stopped = sum(int(s['stopped']) for s in summary.values())
    assert stopped == 11
    lead = re.search(r'<p class="lead">(.*?)</p>', page.raw).group(1)
    assert lead.startswith('16 trial(s) of 2 model(s): 4 finished')
    assert f"; {stopped} stopped at a rung (successive halving" in lead
    assert '<a href="#halving">halving</a>' in page.raw
    head, *body = _table(page, 'Best trial per model')
    entries = {c[0]: dict(zip(head[0], c)) for c, _ in body}
    for model, entry in entries.items():
        assert entry['trials'] == summary[model]['trials'] == '8'
        assert entry['stopped'] == summary[model]['stopped']
        assert entry['epochs trained'] == summary[model]['epochs_trained']
    assert 'the size and latency figures show the trials that finished' in page.plain
    for src in page.images:
        assert base64.b64decode(src.split(',', 1)[1]).startswith(PNG)
    lr_png = os.path.join(settings.MODEL_SAVE_PATH, 'figures', 'stage1-lr.png')
    assert plots.is_png(lr_png)
    assert 'a thin line joins the scores of one trial' in page.plain


def test_a_grid_search_page_has_no_halving_table(grid):
    settings, path = grid
    page = _page(path)
    assert 'Successive halving' not in page.h2
    assert 'stopped' not in page.plain and 'rung' not in page.plain
    assert '#halving' not in page.raw
    head = _table(page, 'Best trial per model')[0][0]
    assert 'stopped' not in head and 'epochs trained' not in head
    assert all(r['rung'] == '' for r in _rows(settings))


def test_trial_labels_name_the_rung():
    from public.report.pages import _trial_label
    row = pd.Series({'lr': 0.002, 'xx': 79, 'yy': 78, 'status': 'promoted', 'pruned': False,
                     'rung': 2.0})
    assert _trial_label(row) == 'lr=0.002 79-78 rung 2 promoted'
    assert _trial_label(row.drop('rung').replace({'promoted': 'ok'})) == 'lr=0.002 79-78'
    assert _trial_label({**row.to_dict(), 'rung': np.nan, 'status': 'ok'}) == 'lr=0.002 79-78'


def _halving_trials():
    """One model: 0.001 stopped at rung 1 (low), 0.002 promoted twice and ok, 0.003 ok."""
    return pd.DataFrame({
        'model': ['A'] * 5, 'lr': [0.001, 0.002, 0.002, 0.002, 0.003],
        'status': ['stopped', 'promoted', 'promoted', 'ok', 'ok'],
        'score': [0.40, 0.70, 0.85, 0.95, 0.93], 'pruned': [False] * 5,
        'rung': [1, 1, 2, 3, 3], 'rung_epochs': [1, 1, 2, 4, 4], 'epochs': [1, 1, 2, 4, 4]})


def test_the_lr_panel_draws_every_rung_within_its_band():
    trials = _halving_trials()
    fig, ax = plt.subplots()
    plots._lr_panel(ax, trials, 'A', 'C0', set(plots.best_rows(trials).index), 0.8)
    low, high = ax.get_ylim()
    assert low < 40 and high > 95                  # the stopped 40 % is inside, not clipped
    assert ax.get_title() == 'A: 3 trial(s), 1 stopped'
    paths = [line for line in ax.lines if len(line.get_xdata()) == 3]
    assert len(paths) == 1 and list(paths[0].get_ydata()) == pytest.approx([70, 85, 95])
    plt.close(fig)
    # a grid search's table draws as before: no path, the title counts rows
    fig, ax = plt.subplots()
    grid = trials.drop(columns=['rung', 'rung_epochs']).iloc[[0, 3, 4]].assign(status='ok')
    plots._lr_panel(ax, grid, 'A', 'C0', set(), 0.8)
    assert ax.get_title() == 'A: 3 trial(s)' and len(ax.lines) == 1      # AVOID_PARAM only
    plt.close(fig)
    assert len(plots.trial_ends(trials)) == 3 and plots.trial_ends(grid) is grid


def test_the_lr_figure_legend_shows_stopped_and_promoted_only_when_present():
    labels = [h.get_label() for h in plots._lr_legend(True, stopped=True, promoted=True)]
    assert any(t.startswith('stopped') for t in labels)
    assert any(t.startswith('promoted') for t in labels)
    assert not any(t.startswith(('stopped', 'promoted'))
                   for t in (h.get_label() for h in plots._lr_legend(True)))


# ----------------------------------------------------------------------------- stage two

def test_stage_two_page_shows_the_rung_and_stopped_candidates(tmp_path, small_data, prepared):
    import public.search.stage_two as scaling
    plan = {'c1-f1': ('ok', 0.80, 12), 'c2-f1': ('ok', 0.87, 12), 'c3-f1': ('ok', 0.70, 12)}
    settings = _settings(tmp_path, small_data, CHANNEL_SCALES=(1, 2, 3), FC_SCALES=(1,),
                         SIZE_TARGET_KB=1000, METRIC_TARGET=92, SCHEDULER='halving',
                         NUM_EPOCHS=12, HALVING_MIN_EPOCHS=1, HALVING_ETA=2)
    folder, met, rows = scaling.run_stage_two(settings, prepared, NoInterrupts(),
                                              log=lambda m: None, progress=False,
                                              trainer=HalvingTrainer(plan, 12),
                                              executor=SerialExecutor(prepared))
    page = _page(write_stage_two_report(settings, folder))
    head, *body = _table(page, 'Candidates, smallest first')
    assert head[0][4:6] == ['status', 'rung']
    last = {}
    for r in rows:
        last[r['candidate']] = r
    shown = {c[0]: (c[4], c[5]) for c, _ in body}
    assert shown == {name: ((f"stopped (rung {r['rung']})" if r['status'] == 'stopped'
                             else r['status']), r['rung']) for name, r in last.items()}
    stopped = sum(r['status'] == 'stopped' for r in last.values())
    assert stopped and f"{stopped} stopped at a rung (successive halving)" in page.plain
    assert 'Pale blue, dotted: stopped at a rung' in page.plain
    # the grid's look of a stopped cell: its own, with its rung and score in the text
    look = plots._cell_look
    norm, cmap = plots._target_norm(pd.Series([97.0]), 90), plt.get_cmap('RdYlGn')
    looks = {s: look(pd.Series({'status': s, 'kb': 18.33, 'score': 88.7, 'rung': 2.0}),
                     'score', 'kb', norm, cmap) for s in ('stopped', 'over-size', 'failed', 'ok', '')}
    assert looks['stopped'][2] == '18.33 KB\nstopped (rung 2)\n88.7%'
    assert len({str(v[:2]) for v in looks.values()}) == len(looks)        # all distinct
    labels = [h.get_label() for h in plots._grid_legend(None, {'stopped', 'ok'})]
    assert any(t.startswith('stopped at a rung') for t in labels)
    assert not any('stopped' in h.get_label() for h in plots._grid_legend(None, {'ok'}))
