"""Tests of public/results/: the append-only CSV tables and atomically replaced folders."""
import json
import os

import pandas as pd
import pytest

from public.core.errors import BusyError
from public.core.atomic import replace_folder
from public.results.store import recover_folders
from public.results.table import ResultsTable

COLUMNS = ['model', 'lr', 'status', 'wall_s', 'error']


def _row(i, **kw):
    return {'model': f'M{i}', 'lr': repr(0.001 * (i + 1)), 'status': 'ok', 'wall_s': 1.5 * i,
            'error': '', **kw}


def test_rows_are_appended_and_pandas_readable(tmp_path):
    table = ResultsTable(str(tmp_path / 'sub' / 'results.csv'), COLUMNS)
    assert table.rows() == []
    for i in range(3):
        table.append(_row(i))
    table.append(_row(3, error='ValueError: a, "quoted" message'))
    frame = pd.read_csv(table.path)
    assert list(frame.columns) == COLUMNS
    assert list(frame['model']) == ['M0', 'M1', 'M2', 'M3']
    assert frame['error'].iloc[3] == 'ValueError: a, "quoted" message'
    rows = table.rows()
    assert len(rows) == 4 and rows[1]['lr'] == '0.002' and rows[2]['wall_s'] == '3'
    assert open(table.path).read().count('model,lr') == 1      # one header


def test_unknown_column_is_refused(tmp_path):
    table = ResultsTable(str(tmp_path / 'r.csv'), COLUMNS)
    with pytest.raises(KeyError, match=r"unknown column\(s\) \['colour'\]"):
        table.append(_row(0, colour='red'))
    assert not os.path.exists(table.path)


def test_a_torn_last_line_is_ignored_and_the_next_row_survives(tmp_path):
    table = ResultsTable(str(tmp_path / 'r.csv'), COLUMNS)
    table.append(_row(0))
    table.append(_row(1))
    with open(table.path, 'a') as f:
        f.write('M9,0.00')                       # killed mid-write: no newline
    assert [r['model'] for r in table.rows()] == ['M0', 'M1']
    table.append(_row(2))
    assert [r['model'] for r in table.rows()] == ['M0', 'M1', 'M2']
    frame = pd.read_csv(table.path)
    assert list(frame.dropna(subset=['status'])['model']) == ['M0', 'M1', 'M2']


def test_a_table_with_an_older_header_is_not_silently_corrupted(tmp_path):
    path = str(tmp_path / 'r.csv')
    ResultsTable(path, COLUMNS[:-1]).append({k: v for k, v in _row(0).items() if k != 'error'})
    table = ResultsTable(path, COLUMNS)
    try:
        table.append(_row(1))
    except (KeyError, ValueError) as exc:           # a clear refusal naming the file is fine
        assert 'r.csv' in str(exc)
        return
    assert [r['model'] for r in table.rows()] == ['M0', 'M1']
    assert pd.read_csv(path).loc[1, 'status'] == 'ok'


def test_frame_has_the_declared_columns(tmp_path):
    table = ResultsTable(str(tmp_path / 'r.csv'), COLUMNS)
    table.append({'model': 'A', 'status': 'ok'})
    frame = table.frame()
    assert list(frame.columns) == COLUMNS and frame.loc[0, 'model'] == 'A'


# ----------------------------------------------------------------------------- folders

def _make_result(parent, name, content):
    folder = parent / name
    folder.mkdir(parents=True)
    (folder / 'saved.pth').write_text(content)
    (folder / 'result.json').write_text(json.dumps({'folder': name}))
    return folder


def _writer(content):
    def build(folder):
        with open(os.path.join(folder, 'saved.pth'), 'w') as f:
            f.write(content)
        with open(os.path.join(folder, 'result.json'), 'w') as f:
            json.dump({'folder': 'x'}, f)
    return build


def test_replace_folder_creates_and_replaces_the_same_name(tmp_path):
    final = replace_folder(str(tmp_path), '90-80', _writer('first'))
    assert final == str(tmp_path / '90-80')
    replace_folder(str(tmp_path), '90-80', _writer('second'))
    assert sorted(os.listdir(tmp_path)) == ['90-80']
    assert sorted(os.listdir(tmp_path / '90-80')) == ['.atml-owned', 'result.json', 'saved.pth']
    assert (tmp_path / '90-80' / 'saved.pth').read_text() == 'second'


def test_a_new_best_with_another_name_removes_the_previous_best(tmp_path):
    _make_result(tmp_path, '90-80', 'old')
    (tmp_path / 'results.csv').write_text('keep me')
    replace_folder(str(tmp_path), '95-91', _writer('new'), replaces=['90-80'])
    assert sorted(os.listdir(tmp_path)) == ['95-91', 'results.csv']
    assert (tmp_path / '95-91' / 'saved.pth').read_text() == 'new'


def test_a_build_that_fails_leaves_the_old_folder_intact(tmp_path):
    _make_result(tmp_path, '90-80', 'old')

    def build(folder):
        with open(os.path.join(folder, 'saved.pth'), 'w') as f:
            f.write('half')
        raise OSError('disk full')
    with pytest.raises(OSError, match='disk full'):
        replace_folder(str(tmp_path), '95-91', build, replaces=['90-80'])
    assert os.listdir(tmp_path) == ['90-80'], 'no .tmp-* or .old-* left behind'
    assert (tmp_path / '90-80' / 'saved.pth').read_text() == 'old'


def test_an_interrupt_during_build_leaves_the_old_folder_intact(tmp_path):
    _make_result(tmp_path, '90-80', 'old')

    def build(folder):
        raise KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        replace_folder(str(tmp_path), '90-80', build)
    assert os.listdir(tmp_path) == ['90-80']
    assert (tmp_path / '90-80' / 'saved.pth').read_text() == 'old'


def _crash_state(tmp_path):
    """What a crash inside replace_folder('95-91', replaces=['90-80']) can leave: the old best
    set aside, the new one under a temporary name, a stray temporary file; and a user's own
    folders whose names merely look like ATML's temporaries."""
    old = _make_result(tmp_path, '90-80', 'old')
    os.rename(old, tmp_path / '.atml-old-abcd1234-0')
    tmp = tmp_path / '.atml-tmp-abcd1234'
    tmp.mkdir()
    (tmp / '.atml-owned').write_text('')
    (tmp / 'saved.pth').write_text('new')
    (tmp_path / 'summary.csv.123-abcdef.atml-tmp').write_text('half')
    for mine in ('.tmp-my-notes', '.old-backup', '.atml-tmp-not-ours'):
        (tmp_path / mine).mkdir()
        (tmp_path / mine / 'notes.txt').write_text('a user file')


def test_recover_removes_only_what_atml_made_and_marked(tmp_path):
    _crash_state(tmp_path)
    actions = recover_folders(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ['.atml-tmp-not-ours', '.old-backup', '.tmp-my-notes']
    for mine in ('.tmp-my-notes', '.old-backup', '.atml-tmp-not-ours'):
        assert (tmp_path / mine / 'notes.txt').read_text() == 'a user file'
    assert len(actions) == 3 and all('interrupted write' in a for a in actions)


def test_replace_folder_never_removes_a_folder_atml_did_not_make(tmp_path):
    (tmp_path / '90-80').mkdir()
    (tmp_path / '90-80' / 'mine.txt').write_text('a user file')
    with pytest.raises(BusyError, match='90-80.*ATML did not make'):
        replace_folder(str(tmp_path), '90-80', _writer('new'))
    assert os.listdir(tmp_path / '90-80') == ['mine.txt']
    assert os.listdir(tmp_path) == ['90-80']


def test_recover_on_a_clean_or_missing_folder_does_nothing(tmp_path):
    assert recover_folders(str(tmp_path / 'absent')) == []
    _make_result(tmp_path, '90-80', 'old')
    assert recover_folders(str(tmp_path)) == []
    assert os.listdir(tmp_path) == ['90-80']


def test_a_torn_quoted_field_does_not_swallow_later_rows(tmp_path):
    table = ResultsTable(str(tmp_path / 'r.csv'), COLUMNS)
    table.append(_row(0))
    with open(table.path, 'a') as f:
        f.write('M9,0.01,failed,2.0,"ValueError: a, b')       # killed inside the quoted error
    table.append(_row(2))
    table.append(_row(3))
    assert [r['model'] for r in table.rows()] == ['M0', 'M2', 'M3']
    assert list(pd.read_csv(table.path).dropna(subset=['status'])['model'])[-2:] == ['M2', 'M3']


def test_worst_subjects_names_only_those_below_the_threshold(tmp_path):
    from public.results.files import worst_subjects_note
    folder = tmp_path / 'AFNet' / '98-97'
    folder.mkdir(parents=True)
    accuracy = [1.0, 0.95, 0.5, 0.7, 0.8, 0.85, 0.6, 0.89]
    pd.DataFrame({'split': 'test', 'subject': [f"S{i}" for i in range(len(accuracy))],
                  'accuracy': accuracy, 'segments': 40}).to_csv(folder / 'per_subject.csv',
                                                               index=False)
    [line] = worst_subjects_note([folder])
    assert line == "  AFNet/98-97 (test): S2 0.50, S6 0.60, S3 0.70, S4 0.80, S5 0.85 (of 40 segments each)"
    assert len(line) <= 100
    pd.DataFrame({'split': 'test', 'subject': ['S1'], 'accuracy': [0.95], 'segments': [40]}
                 ).to_csv(folder / 'per_subject.csv', index=False)
    assert worst_subjects_note([folder]) == []
