"""Tests of the CSV and NumPy loaders (public/data/csv_format.py, public/data/numpy_format.py)
and of the seed data shapes they serve.

Every data set is generated in tmp_path: the Tianchi heartbeat CSV (4 classes, 205 samples,
an unlabelled test file), .npz/.npy arrays, and seed 002's 8-lead x 5000 .txt folder with
a few slightly short segments (zero-padded) and a few too short ones (excluded, counted).
"""
import os

import numpy as np
import pytest

import public.data.csv_format as format_csv
from public.dataset import DataError, LengthPolicy, load_folder
from public.data.csv_format import load_csv
from public.data.numpy_format import load_numpy

RNG_SEED = 0


def signals_text(values):
    return ','.join(f"{v:.6f}" for v in values)


def write_tianchi(path, signals, labels=None, ids=None, subjects=None, raw_labels=None):
    """A Tianchi-format CSV: id, "v1,v2,...", [label], [subject]; returns the path."""
    ids = list(range(len(signals))) if ids is None else ids
    header = ['id', 'heartbeat_signals']
    header += ['label'] if labels is not None or raw_labels is not None else []
    header += ['subject'] if subjects is not None else []
    lines = [','.join(header)]
    for i, values in enumerate(signals):
        text = values if isinstance(values, str) else signals_text(values)
        fields = [str(ids[i]), f'"{text}"']
        if raw_labels is not None:
            fields.append(raw_labels[i])
        elif labels is not None:
            fields.append(f"{float(labels[i])}")      # Tianchi writes labels as 0.0, 3.0
        if subjects is not None:
            fields.append(subjects[i])
        lines.append(','.join(fields))
    path.write_text('\n'.join(lines) + '\n')
    return path


def tianchi_data(n=12, length=205, seed=RNG_SEED):
    rng = np.random.default_rng(seed)
    return rng.random((n, length)).astype(np.float32), np.arange(n) % 4


# ----------------------------------------------------------------------------- CSV

def test_tianchi_csv_four_classes(tmp_path):
    signals, labels = tianchi_data()
    path = write_tianchi(tmp_path / 'train.csv', signals, labels)
    segments = load_csv(path, LengthPolicy(205))
    assert segments.x.shape == (12, 1, 205) and segments.x.dtype == np.float32
    np.testing.assert_allclose(segments.x[:, 0], signals, atol=1e-6)
    assert segments.rhythms.tolist() == [str(k) for k in labels]      # '0'..'3', not '0.0'
    assert segments.names.tolist() == [str(i) for i in range(12)]
    assert segments.subjects.tolist() == segments.names.tolist()      # each row its own subject
    assert segments.has_labels and not segments.from_cache
    assert segments.excluded == [] and segments.skipped == []


def test_unlabelled_test_csv(tmp_path):
    signals, _ = tianchi_data(n=5)
    segments = load_csv(write_tianchi(tmp_path / 'testA.csv', signals, ids=range(100, 105)),
                        LengthPolicy(205))
    assert not segments.has_labels
    assert segments.rhythms.tolist() == [''] * 5
    assert segments.names.tolist() == ['100', '101', '102', '103', '104']


def test_empty_label_column_means_unlabelled(tmp_path):
    signals, _ = tianchi_data(n=3)
    path = write_tianchi(tmp_path / 'testB.csv', signals, raw_labels=['', '', ''])
    segments = load_csv(path, LengthPolicy(205))
    assert not segments.has_labels and segments.rhythms.tolist() == ['', '', '']


def test_subject_column_gives_subjects(tmp_path):
    signals, labels = tianchi_data(n=4)
    path = write_tianchi(tmp_path / 'train.csv', signals, labels, subjects=['A', 'A', 'B', 'C'])
    assert load_csv(path, LengthPolicy(205)).subjects.tolist() == ['A', 'A', 'B', 'C']


def test_regular_rows_take_the_vectorised_path(tmp_path, monkeypatch):
    def no_row_by_row(*args):
        raise AssertionError("row-by-row parser used for a regular file")
    monkeypatch.setattr(format_csv, '_parse_row', no_row_by_row)
    signals, labels = tianchi_data(n=50)
    assert load_csv(write_tianchi(tmp_path / 'train.csv', signals, labels),
                    LengthPolicy(205)).x.shape == (50, 1, 205)


def test_spaces_after_commas_parse_like_plain_values(tmp_path):
    signals, labels = tianchi_data(n=3)
    texts = [', '.join(f"{v:.6f}" for v in row) for row in signals]
    segments = load_csv(write_tianchi(tmp_path / 'spaced.csv', texts, labels), LengthPolicy(205))
    np.testing.assert_allclose(segments.x[:, 0], signals, atol=1e-6)


ROW_LENGTHS = [205, 204, 180, 210]       # rows 1..4 (ids 0..3)

# policy -> (kept ids, excluded ids) or the error the first offending row raises
LENGTH_RULES = [
    (LengthPolicy(205, 5, 'exclude', 'crop'), (['0', '1', '3'], ['2'])),
    (LengthPolicy(205, 25, 'exclude', 'crop'), (['0', '1', '2', '3'], [])),
    (LengthPolicy(205), r"row 2 \(id 1\): has 204 samples, but INPUT_SIZE=205"),
    (LengthPolicy(205, 5, 'error', 'crop'), r"row 3 \(id 2\): has 180 samples.*PAD_TOLERANCE=5"),
    (LengthPolicy(205, 30, 'exclude', 'error'), r"row 4 \(id 3\): has 210 samples.*LONGER"),
    (LengthPolicy(300, 5, 'exclude', 'error'), r"no usable row: all 4 rows are shorter than "
                                               r"INPUT_SIZE=300 - PAD_TOLERANCE=5 \(first: id 0, "
                                               r"205 samples"),
]


@pytest.mark.parametrize('policy, expected', LENGTH_RULES)
def test_csv_length_policy(tmp_path, policy, expected):
    rng = np.random.default_rng(1)
    signals = [rng.random(n).astype(np.float32) for n in ROW_LENGTHS]
    path = write_tianchi(tmp_path / 'train.csv', signals, labels=[0, 1, 2, 3])
    if isinstance(expected, str):
        with pytest.raises(DataError, match=expected) as error:
            load_csv(path, policy)
        assert str(path) in str(error.value)
        return
    kept, excluded = expected
    segments = load_csv(path, policy)
    assert segments.names.tolist() == kept
    assert [name for name, _ in segments.excluded] == excluded
    assert segments.x.shape == (len(kept), 1, 205)
    for row, name in enumerate(kept):
        original = signals[int(name)][:205]                    # cropped: the first 205
        np.testing.assert_allclose(segments.x[row, 0, :len(original)], original, atol=1e-6)
        assert (segments.x[row, 0, len(original):] == 0).all()  # padded: zeros at the end
    assert segments.rhythms.tolist() == kept                    # labels follow their rows


def _with_value(text, index, token):
    values = text.split(',')
    values[index] = token
    return ','.join(values)


# Malformed rows of a 5-row file: (row index, its signal text from the good one, message).
BAD_SIGNALS = {
    'wrong number of values': (2, lambda good: ','.join(good.split(',')[:200]),
                               r"row 3 \(id 2\): has 200 samples, but INPUT_SIZE=205"),
    'non-numeric value': (1, lambda good: _with_value(good, 16, 'abc'),
                          r"row 2 \(id 1\): value 17 of 'heartbeat_signals', 'abc', is not a "
                          r"number"),
    'non-finite value': (4, lambda good: _with_value(good, 0, 'nan'),
                         r"row 5 \(id 4\): value 1 of 'heartbeat_signals', 'nan', is not a "
                         r"finite number"),
    'trailing comma': (0, lambda good: good + ',',
                       r"row 1 \(id 0\): value 206 of 'heartbeat_signals', '', is not a number"),
    'empty signal': (3, lambda good: '',
                     r"row 4 \(id 3\): 'heartbeat_signals' is empty"),
}
# Malformed labels and ids: (changes to the good file's columns, message).
GOOD_LABELS = ['0.0', '1.0', '2.0', '3.0', '0.0']
BAD_COLUMNS = {
    'missing label': (dict(raw_labels=GOOD_LABELS[:3] + [''] + GOOD_LABELS[4:]),
                      r"row 4 \(id 3\): 'label' is empty; a file with a 'label' column needs a "
                      r"label in every row"),
    'non-integer label': (dict(raw_labels=GOOD_LABELS[:1] + ['1.5'] + GOOD_LABELS[2:]),
                          r"row 2 \(id 1\): label '1.5' is not an integer"),
    'text label': (dict(raw_labels=GOOD_LABELS[:4] + ['AFIB']),
                   r"row 5 \(id 4\): label 'AFIB' is not an integer"),
    'duplicate id': (dict(ids=[0, 1, 0, 3, 4]), r"rows 1 and 3 have the same id '0'"),
}


@pytest.mark.parametrize('case', list(BAD_SIGNALS) + list(BAD_COLUMNS))
def test_malformed_csv_row_is_named(tmp_path, case):
    signals, labels = tianchi_data(n=5)
    texts = [signals_text(v) for v in signals]
    kwargs = dict(labels=labels)
    if case in BAD_SIGNALS:
        row, change, message = BAD_SIGNALS[case]
        texts[row] = change(texts[row])
    else:
        changes, message = BAD_COLUMNS[case]
        kwargs.update(changes)
    path = write_tianchi(tmp_path / 'bad.csv', texts, **kwargs)
    with pytest.raises(DataError, match=message) as error:
        load_csv(path, LengthPolicy(205))
    assert str(error.value).startswith(f"{path}: ")


@pytest.mark.parametrize('text, message', [
    ('', r"file is empty"),
    ('id,signals,label\n0,"1,2",0\n', r"has no 'heartbeat_signals' column \(columns: 'id', "
                                      r"'signals', 'label'\)"),
    ('heartbeat_signals,label\n"1,2",0\n', r"has no 'id' column"),
    ('id,heartbeat_signals,label\n', r"has a header but no data rows"),
])
def test_malformed_csv_file(tmp_path, text, message):
    path = tmp_path / 'bad.csv'
    path.write_text(text)
    with pytest.raises(DataError, match=message):
        load_csv(path, LengthPolicy(2))


def test_missing_csv_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.csv: data file does not exist"):
        load_csv(tmp_path / 'nope.csv', LengthPolicy(205))


def test_other_column_names(tmp_path):
    path = tmp_path / 'custom.csv'
    path.write_text('rec,ecg,cls,patient\na,"1,2,3",1,p1\nb,"4,5,6",0,p2\n')
    segments = load_csv(path, LengthPolicy(3), id_column='rec', signal_column='ecg',
                        label_column='cls', subject_column='patient')
    assert segments.names.tolist() == ['a', 'b'] and segments.rhythms.tolist() == ['1', '0']
    assert segments.subjects.tolist() == ['p1', 'p2']
    np.testing.assert_array_equal(segments.x[:, 0], [[1, 2, 3], [4, 5, 6]])


def test_csv_cache_reused_until_the_file_changes(tmp_path):
    signals, labels = tianchi_data(n=6)
    path = write_tianchi(tmp_path / 'train.csv', signals, labels)
    cache = tmp_path / 'cache'
    first = load_csv(path, LengthPolicy(205), cache_dir=str(cache))
    again = load_csv(path, LengthPolicy(205), cache_dir=str(cache))
    assert not first.from_cache and again.from_cache
    np.testing.assert_array_equal(first.x, again.x)
    for name in ('names', 'rhythms', 'subjects'):
        assert getattr(first, name).tolist() == getattr(again, name).tolist()
    assert again.has_labels
    assert not load_csv(path, LengthPolicy(205, 5), cache_dir=str(cache)).from_cache
    write_tianchi(path, signals[:4], labels[:4])
    os.utime(path, ns=(1, 1))          # a new mtime, whatever the clock's resolution
    changed = load_csv(path, LengthPolicy(205), cache_dir=str(cache))
    assert not changed.from_cache and len(changed) == 4
    assert len(list(cache.glob('*.npy'))) == 1          # stale entries of the file dropped


# ----------------------------------------------------------------------------- NumPy

def test_npz_two_dimensional_with_integer_labels(tmp_path):
    x = np.random.default_rng(2).standard_normal((6, 100))
    np.savez(tmp_path / 'data.npz', x=x, y=np.array([0, 1, 2, 3, 0, 1]))
    segments = load_numpy(tmp_path / 'data.npz', LengthPolicy(100))
    assert segments.x.shape == (6, 1, 100) and segments.x.dtype == np.float32
    np.testing.assert_allclose(segments.x[:, 0], x, rtol=1e-6)
    assert segments.rhythms.tolist() == ['0', '1', '2', '3', '0', '1']
    assert segments.names.tolist() == [str(i) for i in range(6)] and segments.has_labels


def test_npz_multi_lead_with_strings_ids_and_subjects(tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 12, 100)).astype(np.float32)
    np.savez(tmp_path / 'ptbxl.npz', x=x, y=np.array(['NORM', 'MI', 'NORM', 'STTC']),
             subject=np.array([7, 7, 8, 9]), id=np.array([10.0, 11.0, 12.0, 13.0]))
    segments = load_numpy(tmp_path / 'ptbxl.npz', LengthPolicy(100))
    np.testing.assert_array_equal(segments.x, x)
    assert segments.rhythms.tolist() == ['NORM', 'MI', 'NORM', 'STTC']
    assert segments.subjects.tolist() == ['7', '7', '8', '9']
    assert segments.names.tolist() == ['10', '11', '12', '13']


def test_npy_is_unlabelled(tmp_path):
    np.save(tmp_path / 'x.npy', np.ones((3, 2, 50), dtype=np.float64))
    segments = load_numpy(tmp_path / 'x.npy', LengthPolicy(50))
    assert segments.x.shape == (3, 2, 50) and not segments.has_labels
    assert segments.rhythms.tolist() == ['', '', '']


@pytest.mark.parametrize('length, policy, expected', [
    (98, LengthPolicy(100, 2), 'padded'),
    (103, LengthPolicy(100, longer='crop'), 'cropped'),
    (98, LengthPolicy(100, 1), r"every segment\): has 98 samples, but INPUT_SIZE=100.*"
                               r"PAD_TOLERANCE=1"),
    (103, LengthPolicy(100), r"every segment\): has 103 samples.*'crop'"),
    (90, LengthPolicy(100, 2, shorter='exclude'), r"no usable segment: all 3 segments have 90 "
                                                  r"samples < INPUT_SIZE=100 - PAD_TOLERANCE=2"),
])
def test_numpy_length_policy(tmp_path, length, policy, expected):
    x = np.random.default_rng(4).standard_normal((3, 2, length)).astype(np.float32) + 5
    np.savez(tmp_path / 'data.npz', x=x)
    if expected not in ('padded', 'cropped'):
        with pytest.raises(DataError, match=expected):
            load_numpy(tmp_path / 'data.npz', policy)
        return
    segments = load_numpy(tmp_path / 'data.npz', policy)
    assert segments.x.shape == (3, 2, 100)
    kept = min(length, 100)
    np.testing.assert_array_equal(segments.x[..., :kept], x[..., :kept])
    assert (segments.x[..., kept:] == 0).all()


@pytest.mark.parametrize('arrays, message', [
    (dict(signals=np.zeros((2, 10))), r"has no array 'x' \(arrays: signals\)"),
    (dict(x=np.zeros(10)), r"x has shape \(10,\); it must be \(N, L\) or \(N, C, L\)"),
    (dict(x=np.zeros((2, 1, 10, 1))), r"x has shape \(2, 1, 10, 1\)"),
    (dict(x=np.zeros((3, 10)), y=np.zeros(2)), r"y has shape \(2,\), but x holds 3 segments"),
    (dict(x=np.zeros((3, 10)), subject=np.zeros((3, 1))), r"subject has shape \(3, 1\)"),
    (dict(x=np.zeros((3, 10)), y=np.array([0, 0.5, 1])), r"y\[1\] is 0.5, not an integer"),
    (dict(x=np.zeros((3, 10)), id=np.array([1, 2, 1])), r"id holds duplicate values"),
    (dict(x=np.where(np.arange(30).reshape(3, 10) == 17, np.nan, 0.0)),
     r"x\[1, 0, 7\] \(segment 1\) is nan; every sample must be a finite number"),
    (dict(x=np.array([['a', 'b']])), r"x has dtype <U1; it must hold real numbers"),
])
def test_malformed_numpy(tmp_path, arrays, message):
    path = tmp_path / 'bad.npz'
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=message) as error:
        load_numpy(path, LengthPolicy(10))
    assert str(error.value).startswith(f"{path}: ")


def test_unreadable_numpy_file(tmp_path):
    path = tmp_path / 'broken.npy'
    path.write_bytes(b'not numpy')
    with pytest.raises(DataError, match=r"broken\.npy: cannot be read as a \.npy/\.npz file"):
        load_numpy(path, LengthPolicy(10))


# ----------------------------------------------------------------------------- seed 002 folder

def write_lead_folder(folder, lengths, leads=8, seed=5):
    """One S<subj>-<RHYTHM>-<i>.txt per length: `leads` whitespace-separated columns a line.
    Returns {file name: values (length, leads)}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for i, length in enumerate(lengths):
        name = f"S{i % 3}-{'AFIB' if i % 2 else 'N'}-{i}.txt"
        values = np.round(rng.standard_normal((length, leads)), 4).astype(np.float32) + 3
        np.savetxt(folder / name, values, fmt='%.4f')
        written[name] = values
    return written


def test_eight_lead_folder_pads_short_and_excludes_too_short(tmp_path):
    lengths = [5000, 4999, 4950, 4949, 3000, 5000]   # pad 1 and 50; exclude 4949 and 3000
    written = write_lead_folder(tmp_path / 'ecg', lengths)
    segments = load_folder(str(tmp_path / 'ecg'), 5000, progress=False,
                           length_policy=LengthPolicy(5000, 50, 'exclude', 'error'))
    too_short = {n for n, v in written.items() if len(v) < 4950}
    assert segments.x.shape == (4, 8, 5000)
    assert {name for name, _ in segments.excluded} == too_short
    assert set(segments.names) == set(written) - too_short
    for row, name in enumerate(segments.names):
        values = written[name].T
        np.testing.assert_allclose(segments.x[row, :, :values.shape[1]], values, atol=1e-6)
        assert (segments.x[row, :, values.shape[1]:] == 0).all()
    assert {r for r in segments.rhythms} == {'AFIB', 'N'}


def test_eight_lead_folder_longer_segment_is_an_error_or_cropped(tmp_path):
    written = write_lead_folder(tmp_path / 'ecg', [5000, 5003])
    folder = str(tmp_path / 'ecg')
    with pytest.raises(DataError, match=r"S1-AFIB-1\.txt: has 5003 samples"):
        load_folder(folder, 5000, progress=False,
                    length_policy=LengthPolicy(5000, 50, 'exclude', 'error'))
    cropped = load_folder(folder, 5000, progress=False,
                          length_policy=LengthPolicy(5000, 50, 'exclude', 'crop'))
    np.testing.assert_allclose(cropped.x[1], written['S1-AFIB-1.txt'][:5000].T, atol=1e-6)


# ----------------------------------------------------------------------------- robustness

def test_csv_with_a_binary_header_gives_a_short_message(tmp_path):
    path = tmp_path / 'bad.csv'
    header = 'x' * 300 + ',' + ','.join(f'col{i}' for i in range(40))
    path.write_text(header + '\n1,2\n')
    with pytest.raises(DataError, match=r"has no 'id' column \(columns: 'x{30,}'\.\.\., 'col0', "
                                        r".*\(41 columns\)\); a segment CSV needs") as error:
        load_csv(path, LengthPolicy(2))
    assert len(str(error.value)) - len(str(path)) < 330


def test_long_bad_csv_value_is_cut_to_a_short_excerpt(tmp_path):
    path = tmp_path / 'bad.csv'
    path.write_text('id,heartbeat_signals\n0,"1,' + 'é' * 500 + ',3"\n')
    with pytest.raises(DataError, match=r"row 1 \(id 0\): value 2 of 'heartbeat_signals', "
                                        r"'é+'\.\.\., is not a number") as error:
        load_csv(path, LengthPolicy(3))
    assert len(str(error.value)) - len(str(path)) < 160       # not 500 characters


@pytest.mark.parametrize('damage', ['zip-magic-then-garbage', 'truncated', 'flipped-byte'])
def test_corrupt_npz_data_file_is_a_data_error(tmp_path, damage):
    path = tmp_path / 'data.npz'
    np.savez(path, x=np.arange(400, dtype=np.float32).reshape(4, 100), y=np.arange(4) % 2)
    data = path.read_bytes()
    if damage == 'zip-magic-then-garbage':
        path.write_bytes(b'PK\x03\x04' + b'\xff' * 300)
    elif damage == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    else:                                              # inside x's data: a zip CRC error
        path.write_bytes(data[:300] + bytes([data[300] ^ 0xFF]) + data[301:])
    with pytest.raises(DataError, match=r"data\.npz: cannot be read as a \.(npy/\.)?npz file"
                                        r".*(BadZipFile|EOFError|ValueError|OSError)") as error:
        load_numpy(path, LengthPolicy(100))
    assert len(str(error.value)) - len(str(path)) < 200


def test_csv_cache_dir_naming_a_file_is_a_clear_error(tmp_path):
    signals, labels = tianchi_data(n=3)
    path = write_tianchi(tmp_path / 'train.csv', signals, labels)
    (tmp_path / 'cache').write_text('')
    with pytest.raises(DataError, match=r"cache: CACHE_DIR names an existing file; CACHE_DIR "
                                        r"must be a folder"):
        load_csv(path, LengthPolicy(205), cache_dir=str(tmp_path / 'cache'))


def test_corrupt_csv_cache_is_a_quiet_miss_and_is_rewritten(tmp_path, capfd):
    signals, labels = tianchi_data(n=6)
    path = write_tianchi(tmp_path / 'train.csv', signals, labels)
    cache = tmp_path / 'cache'
    first = load_csv(path, LengthPolicy(205), cache_dir=str(cache))
    (meta,) = cache.glob('*.meta.npz')
    meta.write_bytes(meta.read_bytes()[:100])                      # truncated
    capfd.readouterr()
    again = load_csv(path, LengthPolicy(205), cache_dir=str(cache))
    err = capfd.readouterr().err
    assert not again.from_cache and err.count('\n') == 1 and str(meta) in err
    np.testing.assert_array_equal(again.x, first.x)
    assert load_csv(path, LengthPolicy(205), cache_dir=str(cache)).from_cache
