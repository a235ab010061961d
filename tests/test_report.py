"""Tests of public/report/pages.py and public/report/plots.py: the figures and the one-page reports.

The reports are built from a small REAL run: a stage one over TinyNet, TinyNetB and a
model that does not build (1 epoch, 2 learning rates) and a stage two over a 2 x 2 grid
with one candidate over the size target, both on the small data set. Each page must parse,
embed every image as a PNG data URI (nothing fetched from anywhere), every figure file must
be a readable PNG, and a page regenerated from disk must equal the one first written. The
figure functions are also checked alone on synthetic tables: missing history, every trial
failed, only over-size candidates, missing columns.
"""
import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from conftest import PARAMS, TinyNet, TinyNetB, settings_values
import public.report.plots as plots
from public.core.settings import load_settings
from public.core.interrupts import NoInterrupts
from public.report.main import main
from public.report.pages import write_stage_one_report, write_stage_two_report
from public.report.reading import read_table

PNG = b'\x89PNG\r\n\x1a\n'


class BrokenInit(TinyNet):
    def __init__(self, **kwargs):
        raise RuntimeError('this model does not build')


def _settings(folder, small_data, **overrides):
    values = settings_values(folder, small_data, **overrides)
    argv = [f"{k}={v!r}" for k, v in values.items()]
    return load_settings(argv, params_path=str(PARAMS)), argv


# ----------------------------------------------------------------------------- real runs

STAGE1 = dict(LR_MIN=0.002, LR_MAX=0.003, STEP=0.001)
# BudgetNet float files: c1-f1 8.4, c1-f2 9.0, c2-f1 14.6, c2-f2 15.7 KB (over 15)
STAGE2 = dict(CHANNEL_SCALES=(1, 2), FC_SCALES=(1, 2), SIZE_TARGET_KB=15, METRIC_TARGET=100)


@pytest.fixture(scope='module')
def stage_one(tmp_path_factory, small_data, prepared):
    """A finished tiny stage one and the report written at its end."""
    from public.search.stage_one import run_stage_one
    folder = tmp_path_factory.mktemp('report-stage1')
    settings, argv = _settings(folder, small_data, **STAGE1)
    run_stage_one(settings, prepared, [TinyNet, TinyNetB, BrokenInit], NoInterrupts(),
                  log=lambda _: None, progress=False)
    path = write_stage_one_report(settings, data_summary=prepared.summary)
    return settings, argv, path


@pytest.fixture(scope='module')
def stage_two(tmp_path_factory, small_data, prepared):
    """A finished tiny stage two (c2-f2 over the size target, none meets METRIC_TARGET=100)."""
    from public.search.stage_two import run_stage_two
    folder = tmp_path_factory.mktemp('report-stage2')
    settings, argv = _settings(folder, small_data, **STAGE2)
    result = run_stage_two(settings, prepared, NoInterrupts(), log=lambda _: None, progress=False)
    path = write_stage_two_report(settings, result[0], data_summary=prepared.summary)
    return settings, argv, result[0], path


class _Page(HTMLParser):
    """Collects the img sources, links and tags of a page."""

    def __init__(self):
        super().__init__()
        self.images, self.links, self.tags, self.text = [], [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == 'img':
            self.images.append(attrs.get('src', ''))
        if 'href' in attrs:
            self.links.append(attrs['href'])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    with open(path, encoding='utf-8') as f:
        text = f.read()
    page = _Page()
    page.feed(text)
    page.close()
    page.raw = text
    page.plain = ' '.join(page.text)
    return page


def _check_self_contained(path):
    page = _parse(path)
    assert page.tags[:2] == ['html', 'head'] and 'body' in page.tags
    assert page.images, 'the page has no figure'
    for src in page.images:
        assert src.startswith('data:image/png;base64,'), src[:60]
        data = base64.b64decode(src.split(',', 1)[1], validate=True)
        assert data.startswith(PNG) and len(data) > 1000
    assert 'script' not in page.tags and 'link' not in page.tags and 'iframe' not in page.tags
    assert 'http://' not in page.raw and 'https://' not in page.raw and 'file:' not in page.raw
    assert 'url(' not in page.raw and '@import' not in page.raw
    for href in page.links:                     # only in-page anchors and relative folders
        assert href.startswith('#') or ('://' not in href and not os.path.isabs(href)), href
    assert 'could not be drawn' not in page.plain
    return page


def _check_pngs(folder, page):
    files = sorted(f for f in os.listdir(folder) if f != '.digests.json')
    assert files and all(f.endswith('.png') for f in files)     # no temporary file left
    embedded = {base64.b64decode(src.split(',', 1)[1]) for src in page.images}
    for name in files:
        path = os.path.join(folder, name)
        with open(path, 'rb') as f:
            data = f.read()
        assert data.startswith(PNG) and plots.is_png(path)
        with Image.open(io.BytesIO(data)) as image:
            image.verify()
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.std() > 0
        assert data in embedded, f"{name} is not the figure embedded in the page"
    return files


def test_stage_one_report_is_one_self_contained_page(stage_one):
    settings, _, path = stage_one
    assert path == os.path.join(settings.MODEL_SAVE_PATH, 'report.html')
    page = _check_self_contained(path)
    files = _check_pngs(os.path.join(settings.MODEL_SAVE_PATH, 'figures'), page)
    assert {'stage1-size.png', 'stage1-latency.png', 'stage1-lr.png'} <= set(files)
    assert len(page.images) == len(files)


def test_stage_one_report_shows_the_search(stage_one, prepared):
    settings, _, path = stage_one
    page = _parse(path)
    for text in ('TinyNet', 'TinyNetB', 'BrokenInit', 'Best trial per model', 'Settings',
                 f"NUM_EPOCHS = {settings.NUM_EPOCHS}", prepared.summary.splitlines()[0]):
        assert text in page.plain, text
    assert '5 trial(s) of 3 model(s): 4 finished' in page.plain and '1 failed' in page.plain
    folders = [h for h in page.links if not h.startswith('#')]
    assert len(folders) >= 2                     # each best folder, linked relative to the page
    for href in folders:
        assert os.path.isfile(os.path.join(settings.MODEL_SAVE_PATH, href, 'saved.onnx'))
    rows = read_table(os.path.join(settings.MODEL_SAVE_PATH, 'results.csv'))
    if 'history' not in rows.columns:            # before per-trial history is recorded
        assert 'loss curves are not available' in page.plain


def _between(raw, start, end):
    """The page text from the first `start` to the next `end`."""
    i = raw.index(start)
    return raw[i:raw.index(end, i)]


def test_stage_one_next_step_names_the_pick_and_the_command(stage_one):
    from public.report.pages import stage_one_pick
    from public.report.reading import load_stage_one
    settings, _, path = stage_one
    page = _parse(path)
    trials, _ = load_stage_one(settings)
    best = plots.best_rows(trials)
    pick = stage_one_pick(best)
    assert pick['score'] == best['score'].max()
    box = _between(page.raw, '<div class="next', '</div>')
    assert f"Recommended: <b>{pick['model']}</b>" in box
    assert f"python train_final.py LEARNING_RATE={pick['lr']:g}" in box
    assert 'public/ss_model.py' in box and 'NUM_EPOCHS=1' in box    # overrides carried


def test_stage_one_pick_breaks_ties_by_the_smaller_file():
    from public.report.pages import stage_one_pick
    best = pd.DataFrame({'model': ['Big', 'Small', 'Worse'], 'score': [0.9, 0.9, 0.8],
                         'onnx_kb': [80.0, 12.5, 3.0], 'lr': [0.001, 0.002, 0.003]})
    assert stage_one_pick(best)['model'] == 'Small'
    assert stage_one_pick(best.iloc[0:0]) is None


def test_settings_changed_first_the_rest_folded_stage_two_only_in_stage_two(stage_one,
                                                                             stage_two):
    one, two = _parse(stage_one[2]).raw, _parse(stage_two[3]).raw
    for raw in (one, two):
        shown, folded = raw.split('<h2 id="settings">')[1].split('<details>')
        assert 'NUM_EPOCHS = 1   # command line' in shown and 'ONNX_OPSET' not in shown
        assert 'ONNX_OPSET = 18' in folded
    assert 'CHANNEL_SCALES' not in one.split('<h2 id="settings">')[1]
    assert 'SIZE_TARGET_KB = 15   # command line' in two


def test_both_pages_show_the_subjects_worst_first(stage_one, stage_two):
    tiny = os.path.join(stage_one[0].MODEL_SAVE_PATH, 'TinyNet')
    for path, folder, label in ((stage_one[2], os.path.join(tiny, os.listdir(tiny)[0]),
                                 'TinyNet '), (stage_two[3], stage_two[2], stage_two[2])):
        section = _parse(path).raw.split('<h2 id="subjects">')[1]
        section = section[section.index(f"<h3>{label}"):]
        section = section[:section.index('</table>')]
        rows = pd.read_csv(os.path.join(folder, 'per_subject.csv'), dtype={'subject': str})
        test = rows[rows['split'] == 'test'].sort_values(['accuracy', 'f1'], kind='stable')
        assert f"{len(test)} test subject(s), worst first" in section
        assert re.findall(r'<td class="text">(S\d+)</td>', section) == test['subject'].tolist()


def test_stage_two_next_step_and_no_link_into_temp(stage_two):
    settings, _, folder, path = stage_two
    page = _parse(path)
    box = _between(page.raw, '<div class="next', '</div>')
    assert 'the targets are missed' in box and 'c1-f1' in box
    assert f"python predict.py {os.path.join(folder, 'saved.onnx')} {settings.TEST_DIR}" in box
    assert not [h for h in page.links if 'temp' in h or '..' in h]
    assert '4 candidate(s):' in page.plain and '1 over the size target' in page.plain


def test_stage_one_report_regenerated_from_disk_is_identical(stage_one, capsys):
    settings, argv, path = stage_one
    first = open(path, 'rb').read()
    figures = os.path.join(settings.MODEL_SAVE_PATH, 'figures')
    pngs = {f: open(os.path.join(figures, f), 'rb').read() for f in os.listdir(figures)}
    assert write_stage_one_report(settings) == path          # no data summary given: kept
    assert open(path, 'rb').read() == first
    shutil.rmtree(figures)                                   # every figure drawn again
    assert main(['stage1', '--params', str(PARAMS), *argv]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    assert open(path, 'rb').read() == first
    assert {f: open(os.path.join(figures, f), 'rb').read() for f in os.listdir(figures)} == pngs


def _add_history(root):
    """What the bookkeeping records per trial: a history column, history and confusion in
    each best folder's result.json."""
    path = os.path.join(root, 'results.csv')
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    history = [[1, 0.7, 0.69, 0.003], [2, 0.6, 0.62, 0.003], [3, 0.5, 0.64, 0.0015]]
    table['history'] = [json.dumps(history) if s == 'ok' else '' for s in table['status']]
    table.to_csv(path, index=False)
    for model in ('TinyNet', 'TinyNetB'):
        model_dir = os.path.join(root, model)
        [best] = [d for d in os.listdir(model_dir) if os.path.isdir(os.path.join(model_dir, d))]
        info_path = os.path.join(model_dir, best, 'result.json')
        info = json.load(open(info_path))
        info.update(history=history, best_epoch=2, confusion={'val': [[5, 1], [2, 4]],
                                                              'test': [[3, 1], [1, 3]]})
        json.dump(info, open(info_path, 'w'))


def test_stage_one_report_draws_history_and_confusion_when_recorded(stage_one, small_data,
                                                                    tmp_path):
    settings, _, _ = stage_one
    copy, _ = _settings(tmp_path, small_data, **STAGE1)
    shutil.copytree(settings.MODEL_SAVE_PATH, copy.MODEL_SAVE_PATH)
    figures = os.path.join(copy.MODEL_SAVE_PATH, 'figures')
    before = {f: open(os.path.join(figures, f), 'rb').read() for f in os.listdir(figures)}
    _add_history(copy.MODEL_SAVE_PATH)
    page = _check_self_contained(write_stage_one_report(copy))
    files = _check_pngs(figures, page)
    assert {'stage1-best-loss.png', 'TinyNet-confusion.png', 'TinyNetB-confusion.png',
            'TinyNet-trials-loss.png', 'TinyNetB-trials-loss.png'} <= set(files)
    assert 'loss curves are not available' not in page.plain
    for name in ('stage1-best-loss.png', 'TinyNet-confusion.png'):   # changed data: redrawn
        assert open(os.path.join(figures, name), 'rb').read() != before.get(name)
    assert open(os.path.join(figures, 'stage1-size.png'), 'rb').read() == before['stage1-size.png']


def test_stage_two_report_is_one_self_contained_page(stage_two):
    settings, _, folder, path = stage_two
    assert folder and path == os.path.join(folder, 'report.html')
    page = _check_self_contained(path)
    files = _check_pngs(os.path.join(folder, 'figures'), page)
    assert 'stage2-grid.png' in files
    for text in ('does NOT meet both targets', 'c2-f2', 'over SIZE_TARGET_KB=15', 'c1-f1',
                 'Settings', 'METRIC_TARGET = 100'):
        assert text in page.plain, text
    for href in (h for h in page.links if not h.startswith('#')):
        assert os.path.isfile(os.path.join(folder, href, 'saved.onnx')), href


def test_stage_two_report_regenerated_from_disk_is_identical(stage_two, capsys):
    settings, argv, folder, path = stage_two
    first = open(path, 'rb').read()
    assert write_stage_two_report(settings, folder) == path
    assert open(path, 'rb').read() == first
    for extra in (['--folder', folder], []):          # given, or found in FINAL_RESULT_DIR
        assert main(['stage2', *extra, '--params', str(PARAMS), *argv]) == 0
        assert f"wrote {path}" in capsys.readouterr().out
        assert open(path, 'rb').read() == first


def test_reports_of_an_empty_folder_say_so(make_settings):
    settings = make_settings()
    page = _parse(write_stage_one_report(settings))
    assert 'No trial of the current search is recorded yet' in page.plain
    path = write_stage_two_report(settings, None)
    assert path == os.path.join(settings.TEMP_DIR, 'report.html')
    assert 'No stage-two candidate of the current settings' in _parse(path).plain


def test_rows_of_other_settings_and_torn_lines_are_left_out(stage_one, small_data, tmp_path):
    settings, _, _ = stage_one
    copy, _ = _settings(tmp_path, small_data, **STAGE1)
    shutil.copytree(settings.MODEL_SAVE_PATH, copy.MODEL_SAVE_PATH)
    path = os.path.join(copy.MODEL_SAVE_PATH, 'results.csv')
    lines = open(path).read().splitlines()
    other = lines[1].replace(lines[1].split(',')[0] + ',', 'OldNet,', 1)
    key = pd.read_csv(path, dtype=str)['settings_key'][0]
    with open(path, 'w') as f:
        f.write('\n'.join(lines + [other.replace(key, 'otherkey00'), '"torn,']) + '\n')
    page = _parse(write_stage_one_report(copy))
    assert 'OldNet' not in page.plain
    assert '1 row(s) of results.csv recorded with other settings are not shown' in page.plain


def test_main_usage(capsys):
    assert main([]) == 2 and main(['stage3']) == 2
    assert main(['--help']) == 0
    assert 'python -m public.report stage1|stage2' in capsys.readouterr().out


# ----------------------------------------------------------------------------- figures alone

def _trials(**columns):
    base = dict(model=['A', 'A', 'A', 'B', 'B', 'C'],
                lr=[0.001, 0.002, 0.003, 0.001, 0.002, 0.001],
                status=['ok', 'ok', 'diverged', 'ok', 'failed', 'ok'],
                pruned=[False, True, True, False, False, False],
                score=[0.9, 0.5, np.nan, 0.95, np.nan, 0.7], xx=[95, 60, np.nan, 97, np.nan, 80],
                yy=[90, 50, np.nan, 95, np.nan, 70],
                onnx_kb=[88.0, 88.0, np.nan, 150.0, np.nan, 14.0],
                latency_ms=[0.04, 0.05, np.nan, 0.16, np.nan, 0.03])
    base.update(columns)
    return pd.DataFrame(base)


def _png(path):
    assert plots.is_png(path) and os.path.getsize(path) > 1000
    with Image.open(path) as image:
        image.verify()
    return path


def test_pareto_front_and_best_rows():
    assert plots.pareto_front([10, 20, 5, 30, 15], [0.5, 0.9, 0.4, 0.8, 0.9]) == [2, 0, 4]
    assert plots.pareto_front([np.nan, 1], [1, np.nan]) == []
    best = plots.best_rows(_trials())
    assert best['model'].tolist() == ['A', 'B', 'C'] and best.index.tolist() == [0, 3, 5]
    assert plots.best_rows(_trials(status=['failed'] * 6)).empty


@pytest.mark.parametrize('history, epochs', [
    ([[1, 0.5, 0.6, 0.001], [2, 0.4, 0.55, 0.001]], [1, 2]),
    ('[[1, 0.5, 0.6, 0.001], [2, 0.4, "NaN", 0.0005]]', [1, 2]),
    ([{'epoch': 1, 'train_loss': 0.5, 'val_loss': 0.6}], [1]),
    ([[1, 0.5, 0.6]], [1]),
    (None, None), ('', None), (float('nan'), None), ('not json', None), ([], None),
    ([[None]], None),
])
def test_history_frame(history, epochs):
    frame = plots.history_frame(history)
    assert (frame is None) if epochs is None else frame['epoch'].tolist() == epochs


def test_stage_one_figures_from_a_synthetic_table(tmp_path):
    trials = _trials()
    _png(plots.size_score_plot(trials, str(tmp_path / 'size.png'), metric_label='min4 (%)'))
    _png(plots.latency_score_plot(trials, str(tmp_path / 'latency.png')))
    _png(plots.lr_score_plot(trials, str(tmp_path / 'lr.png'), avoid_param=0.8))
    assert sorted(os.listdir(tmp_path)) == ['latency.png', 'lr.png', 'size.png']


@pytest.mark.parametrize('trials', [
    _trials(status=['failed'] * 6, score=[np.nan] * 6, onnx_kb=[np.nan] * 6),   # all failed
    _trials().iloc[0:0],                                                         # no trial yet
    pd.DataFrame({'model': ['A', 'B']}),                                          # no columns
    _trials(status=['diverged'] * 6),
])
def test_stage_one_figures_without_scores_still_draw(tmp_path, trials):
    for name, function in (('size', plots.size_score_plot), ('lr', plots.lr_score_plot),
                           ('latency', plots.latency_score_plot)):
        _png(function(trials, str(tmp_path / f'{name}.png')))


def test_loss_curves_with_and_without_history(tmp_path):
    history = [[e, 1 / e, 1 / e + 0.01 * e * e, 0.003] for e in range(1, 15)]
    curves = [{'label': 'A lr=0.003', 'history': history, 'best_epoch': 6,
               'stop_reason': 'early-stop'},
              {'label': 'B (no history)', 'history': None},
              {'label': 'C diverged', 'history': [[1, float('nan'), float('inf'), 0.003]]}]
    _png(plots.loss_curves_plot(curves, str(tmp_path / 'loss.png'), sharey=True))
    _png(plots.loss_curves_plot([], str(tmp_path / 'none.png')))
    _png(plots.loss_curves_plot(curves[1:2], str(tmp_path / 'missing.png')))


@pytest.mark.parametrize('confusion, names', [
    ({'val': [[40, 2], [3, 35]], 'test': [[30, 10], [3, 37]]}, ['0 other', '1 AFIB']),
    ({'val': np.arange(16).reshape(4, 4).tolist()}, ['0', '1', '2', '3']),   # no test split
    ({'val': [[0, 0], [0, 0]], 'test': None}, None),                          # empty split
    ({}, None),
])
def test_confusion_plot(tmp_path, confusion, names):
    _png(plots.confusion_plot(confusion, str(tmp_path / 'cm.png'), class_names=names))


def _cells(statuses, scores):
    pairs = [(c, f) for c in (1, 2) for f in (1, 2, 3)]
    return pd.DataFrame({'channel_scale': [c for c, _ in pairs], 'fc_scale': [f for _, f in pairs],
                         'status': statuses, 'score': scores,
                         'kb': [18.1, 24.0, 29.8, 29.9, 41.5, 53.2],
                         'int8_score': scores, 'int8_kb': [6.0, 8.0, 9.9, 10.0, 13.8, 17.7]})


@pytest.mark.parametrize('statuses, scores, winner', [
    (['ok', 'ok', 'diverged', 'ok', '', 'over-size'], [54, 92, np.nan, 99, np.nan, np.nan], (1, 2)),
    (['over-size'] * 6, [np.nan] * 6, None),                                   # only over-size
    (['', 'failed', '', '', '', ''], [np.nan] * 6, None),                      # nothing trained
])
def test_stage_two_grid(tmp_path, statuses, scores, winner):
    cells = _cells(statuses, scores)
    float_view = ('ONNX', 'score', 'kb')
    int8_view = ('INT8', 'int8_score', 'int8_kb')
    _png(plots.stage_two_grid_plot(cells, str(tmp_path / 'grid.png'), metric_target=90,
                                   size_target_kb=45, winner=winner, views=(float_view,)))
    _png(plots.stage_two_grid_plot(cells.iloc[:4], str(tmp_path / 'int8.png'), metric_target=100,
                                   size_target_kb=45, winner=winner, views=(float_view, int8_view)))
    _png(plots.stage_two_grid_plot(cells.iloc[0:0], str(tmp_path / 'empty.png'), metric_target=90,
                                   size_target_kb=45))


def test_figures_are_deterministic(tmp_path):
    a = plots.size_score_plot(_trials(), str(tmp_path / 'a.png'))
    b = plots.size_score_plot(_trials(), str(tmp_path / 'b.png'))
    assert open(a, 'rb').read() == open(b, 'rb').read()


def test_score_band_holds_the_finished_trials_not_the_pruned_ones():
    score = pd.Series([99.0, 95.0, 0.0, np.nan])
    finished = pd.Series([True, True, True, False])
    pruned = pd.Series([False, False, True, False])
    low, high = plots.score_band(score, finished, pruned)
    assert 90 < low < 95 and 99 < high <= 102                   # the 0 is clipped, not shown
    assert plots.score_band(score, finished, pd.Series([True] * 4))[0] < 0   # all pruned
    assert plots.score_band(score, finished & False, pruned) is None


def test_skipped_rates_are_grid_rates_without_a_row_that_avoid_txt_rules_out(make_settings,
                                                                            tmp_path):
    from public.report.pages import skipped_rates
    settings = make_settings(LR_MIN=0.001, LR_MAX=0.004, STEP=0.0005)
    (tmp_path / 'avoid.txt').write_text('0.001 A\n')
    trials = pd.DataFrame({'model': ['A', 'B'], 'lr': [0.001, 0.004]})
    # A: 0.0015 and 0.002 lie within 2*STEP of 0.001; B has no avoid.txt entry.
    assert skipped_rates(settings, trials) == {'A': [0.0015, 0.002], 'B': []}
    path = plots.lr_score_plot(_trials(), str(tmp_path / 'lr.png'), avoid_param=0.8,
                               skipped={'A': [0.0015, 0.0025], 'C': [0.002]})
    _png(path)


def test_the_grid_shows_every_planned_cell(make_settings, tmp_path):
    from public.report.pages import grid_cells, planned_cells
    settings = make_settings(CHANNEL_SCALES=(1, 2, 3), FC_SCALES=(1, 2))
    rows = pd.DataFrame({'candidate': ['c1-f1', 'c3-f2'], 'channel_scale': [1, 3],
                         'fc_scale': [1, 2], 'status': ['ok', 'over-size'], 'score': [0.97, np.nan],
                         'predicted_bytes': [18577, 64253], 'onnx_bytes': [18577, np.nan]})
    met = planned_cells(rows, settings, met=True)
    assert len(met) == 6 and sorted(met['candidate']) == ['c1-f1', 'c1-f2', 'c2-f1', 'c2-f2',
                                                          'c3-f1', 'c3-f2']
    assert (met['status'] == plots.NOT_NEEDED).sum() == 4
    assert (planned_cells(rows, settings)['status'] == '').sum() == 4       # a miss: untrained
    cells, views = grid_cells(met, settings)
    assert cells['kb'].round(2).tolist()[:2] == [18.14, 62.75]              # KB, two decimals
    _png(plots.stage_two_grid_plot(cells, str(tmp_path / 'grid.png'), metric_target=90,
                                   size_target_kb=30, winner=(1, 1), views=views))
    look = plots._cell_look
    norm, cmap = plots._target_norm(pd.Series([97.0]), 90), plots.plt.get_cmap('RdYlGn')
    over, broken = (look(pd.Series({'status': s, 'kb': 41.54}), 'score', 'kb', norm, cmap)
                    for s in ('over-size', 'failed'))
    assert over[0] != broken[0] and over[1] != broken[1]                    # distinguishable
    assert over[2] == '41.54 KB\nover-size'
    assert 'not needed' in look(met.iloc[2], 'score', 'kb', norm, cmap)[2]
