"""Tests of public/dataset.py and the modules it picks from: the original .txt folder format
(public/data/txt_format.py), bad files, the parse cache (public/data/segments.py), the split, and the
layout of the data path (a loader module never imports public.dataset)."""
import ast
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import public.dataset as dataset
import public.data.segments as segments_module
from conftest import ROOT, write_segment
from public.dataset import (DataError, LengthPolicy, cache_entry, excerpt, load_cached, load_folder,
                            parse_filename, save_cached, split_by_subject)

L = 16   # synthetic segments are short: the rules do not depend on the length


def _values(seed, length=L, leads=1):
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(length, leads)).round(4)
    return v[:, 0] if leads == 1 else v


def _folder(tmp_path, names=('S1-AFIB-0.txt', 'S1-N-1.txt', 'S2-AFIB-0.txt', 'S2--3.txt')):
    folder = tmp_path / 'data'
    folder.mkdir()
    for i, name in enumerate(names):
        write_segment(folder / name, _values(i))
    return folder


@pytest.mark.parametrize('name,subject,rhythm', [
    ('S12-AFIB-31.txt', 'S12', 'AFIB'),
    ('S47--0.txt', 'S47', ''),
    ('S1-N-0.txt', 'S1', 'N'),
    ('Sabc-SBR-x7.txt', 'Sabc', 'SBR'),
])
def test_file_names_of_the_original_format_parse(name, subject, rhythm):
    assert parse_filename(name) == (subject, rhythm)


@pytest.mark.parametrize('name', ['12-AFIB-1.txt', 'S1-AFIB.txt', 'S1-AFIB-1.csv',
                                  'S1-A-B-1.txt', 'S1-AFIB-.txt', 'notes.txt'])
def test_bad_file_names_are_rejected_with_the_pattern(name):
    with pytest.raises(DataError, match=rf"^{name}: file name does not follow the pattern S<subject>"):
        parse_filename(name)


def test_load_folder_reads_values_names_subjects_and_labels(tmp_path):
    folder = _folder(tmp_path)
    seg = load_folder(str(folder), L, progress=False)
    assert seg.x.shape == (4, 1, L) and seg.x.dtype == np.float32
    assert list(seg.names) == sorted(os.listdir(folder))
    for i, name in enumerate(seg.names):
        expected = np.loadtxt(folder / name, dtype=np.float64).astype(np.float32)
        np.testing.assert_array_equal(seg.x[i, 0], expected)
    assert list(seg.subjects) == ['S1', 'S1', 'S2', 'S2']
    assert list(seg.rhythms) == ['AFIB', 'N', '', 'AFIB']
    assert list(seg.labels(('AFIB',))) == [1, 0, 0, 1]
    assert list(seg.labels(('AFIB', 'N'))) == [1, 1, 0, 1]
    assert seg.skipped == [] and not seg.from_cache


def test_demo_data_folder_loads_at_1250_samples(small_data):
    seg = load_folder(str(small_data.train), 1250, progress=False)
    assert seg.x.shape == (96, 1, 1250)
    assert len(np.unique(seg.subjects)) == 8
    assert seg.labels(('AFIB',)).sum() == 48
    first = sorted(os.listdir(small_data.train))[0]
    np.testing.assert_array_equal(seg.x[0, 0], np.loadtxt(small_data.train / first).astype(np.float32))


def test_several_columns_are_several_leads(tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    for i in range(3):
        write_segment(folder / f'S{i}-N-0.txt', _values(i, leads=3))
    seg = load_folder(str(folder), L, progress=False)
    assert seg.x.shape == (3, 3, L)
    np.testing.assert_array_equal(seg.x[1], _values(1, leads=3).T.astype(np.float32))


@pytest.mark.parametrize('text', [
    ''.join(f'{v:.4f}\r\n' for v in _values(0)),            # Windows line endings
    ''.join(f'  {v:.4f}  \n' for v in _values(0)) + '\n\n',   # padding, trailing blank lines
    ''.join(f'{v:.4f}\n' for v in _values(0)).rstrip('\n'),  # no final newline
])
def test_harmless_formatting_variants_are_accepted(tmp_path, text):
    folder = tmp_path / 'data'
    folder.mkdir()
    write_segment(folder / 'S1-N-0.txt', text=text)
    write_segment(folder / 'S2-N-0.txt', _values(0))
    seg = load_folder(str(folder), L, progress=False)
    np.testing.assert_array_equal(seg.x[0], seg.x[1])


def _lines(values):
    return [f'{v:.4f}' for v in values]


# Bad files: (file name, content, message) -- the message names the file and what is wrong.
BAD_FILES = [
    ('S9-N-0.txt', _lines(_values(9))[:4] + ['abc'] + _lines(_values(9))[5:],
     r"S9-N-0\.txt: line 5: 'abc' is not a number"),
    ('S9-N-0.txt', _lines(_values(9))[:2] + ['nan'] + _lines(_values(9))[3:],
     r"S9-N-0\.txt: line 3: 'nan' is not a finite number"),
    ('S9-N-0.txt', _lines(_values(9))[:-1],
     r'S9-N-0\.txt: has 15 samples, but INPUT_SIZE=16'),
    ('S9-N-0.txt', _lines(_values(9)) + ['1.0'],
     r'S9-N-0\.txt: has 17 samples, but INPUT_SIZE=16'),
    ('S9-N-0.txt', [], r'S9-N-0\.txt: file is empty'),
    ('S9-N-0.txt', ['  ', ''], r'S9-N-0\.txt: file is empty'),
    ('S9-N-0.txt', _lines(_values(9))[:2] + [''] + _lines(_values(9))[3:],
     r'S9-N-0\.txt: line 3 is empty'),
    ('S9-N-0.txt', ['1.0'] + ['1.0 2.0'] + ['1.0'] * 14,
     r'S9-N-0\.txt: line 2 has 2 values, earlier lines have 1'),
    ('S9_N_0.txt', _lines(_values(9)), r'S9_N_0\.txt: file name does not follow the pattern'),
]
BAD_IDS = ['non-numeric', 'nan', 'short', 'long', 'empty', 'blank', 'blank-line',
           'ragged-columns', 'bad-name']


@pytest.mark.parametrize('name,lines,message', BAD_FILES, ids=BAD_IDS)
def test_bad_file_is_a_clear_error_naming_file_and_rule(tmp_path, name, lines, message):
    folder = _folder(tmp_path)
    (folder / name).write_text('\n'.join(lines) + ('\n' if lines else ''))
    with pytest.raises(DataError, match=message) as info:
        load_folder(str(folder), L, progress=False)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize('name,lines,message', BAD_FILES, ids=BAD_IDS)
def test_bad_file_is_skipped_and_counted_when_asked(tmp_path, name, lines, message):
    folder = _folder(tmp_path)
    (folder / name).write_text('\n'.join(lines) + ('\n' if lines else ''))
    seg = load_folder(str(folder), L, skip_bad=True, progress=False)
    assert len(seg) == 4 and name not in seg.names
    assert [s[0] for s in seg.skipped] == [name]
    assert re.search(message, seg.skipped[0][1])


def test_files_with_different_lead_counts_are_an_error(tmp_path):
    folder = _folder(tmp_path)
    write_segment(folder / 'S9-N-0.txt', _values(9, leads=2))
    with pytest.raises(DataError, match=r'different numbers of leads \(\[1, 2\]\)'):
        load_folder(str(folder), L, progress=False)


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=r'nowhere: data folder does not exist'):
        load_folder(str(tmp_path / 'nowhere'), L, progress=False)
    empty = tmp_path / 'empty'
    empty.mkdir()
    (empty / '.hidden').write_text('1\n')
    (empty / 'sub').mkdir()
    with pytest.raises(DataError, match=r'empty: data folder is empty'):
        load_folder(str(empty), L, progress=False)


def test_all_files_bad_is_an_error_even_when_skipping(tmp_path):
    folder = tmp_path / 'data'
    folder.mkdir()
    write_segment(folder / 'S1-N-0.txt', text='x\n')
    write_segment(folder / 'S2-N-0.txt', text='')
    with pytest.raises(DataError, match=r'no usable segment \(all 2 files are bad'):
        load_folder(str(folder), L, skip_bad=True, progress=False)


# ----------------------------------------------------------------------------- length policy

# (length, pad tolerance, shorter, longer) -> 'same' | 'padded' | 'cropped' | None | error text
LENGTHS = [
    (16, 0, 'error', 'error', 'same'),
    (14, 2, 'error', 'error', 'padded'),                  # the tolerance's edge: padded
    (13, 2, 'error', 'error', r'has 13 samples, but INPUT_SIZE=16.*PAD_TOLERANCE=2'),
    (13, 2, 'exclude', 'error', None),                     # just past it: excluded
    (15, 0, 'exclude', 'error', None),
    (17, 0, 'error', 'error', r"has 17 samples, but INPUT_SIZE=16; longer segments are an error"),
    (17, 0, 'error', 'crop', 'cropped'),
    (40, 5, 'exclude', 'crop', 'cropped'),
]


@pytest.mark.parametrize('length,tolerance,shorter,longer,expected', LENGTHS)
def test_length_policy(length, tolerance, shorter, longer, expected):
    policy = LengthPolicy(L, tolerance, shorter, longer)
    array = (np.arange(length * 2, dtype=np.float32) + 1).reshape(length, 2)
    if expected not in ('same', 'padded', 'cropped', None):
        with pytest.raises(DataError, match=rf'^seg\.txt: {expected}'):
            policy.fit(array, 'seg.txt')
        return
    out = policy.fit(array, 'seg.txt')
    if expected is None:
        assert out is None
        return
    assert out.shape == (L, 2)
    np.testing.assert_array_equal(out[:min(length, L)], array[:L])
    assert (out[length:] == 0).all()


def test_load_folder_pads_and_excludes_by_policy(tmp_path):
    folder = _folder(tmp_path)
    write_segment(folder / 'S5-N-0.txt', _values(5)[:-1])          # 15: padded
    write_segment(folder / 'S6-N-0.txt', _values(6)[:-3])          # 13: excluded
    policy = LengthPolicy(L, pad_tolerance=1, shorter='exclude')
    seg = load_folder(str(folder), L, str(tmp_path / 'cache'), length_policy=policy,
                      progress=False)
    assert len(seg) == 5 and 'S6-N-0.txt' not in seg.names
    assert [e[0] for e in seg.excluded] == ['S6-N-0.txt']
    row = list(seg.names).index('S5-N-0.txt')
    assert seg.x[row, 0, -1] == 0 and seg.x[row, 0, -2] == np.float32(_values(5)[-2])
    again = load_folder(str(folder), L, str(tmp_path / 'cache'), length_policy=policy,
                        progress=False)
    assert again.from_cache and [e[0] for e in again.excluded] == ['S6-N-0.txt']
    with pytest.raises(DataError, match=r'S[56]-N-0\.txt: has 1[35] samples'):
        load_folder(str(folder), L, str(tmp_path / 'cache'), progress=False)


# ----------------------------------------------------------------------------- cache

def test_second_load_comes_from_the_cache(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    first = load_folder(str(folder), L, str(cache), progress=False)
    second = load_folder(str(folder), L, str(cache), progress=False)
    assert not first.from_cache and second.from_cache
    np.testing.assert_array_equal(first.x, second.x)
    assert list(first.names) == list(second.names)
    assert list(first.rhythms) == list(second.rhythms)
    assert os.listdir(cache)


def _edit_same_size(folder, name, new_first):
    path = folder / name
    lines = path.read_text().splitlines()
    assert len(new_first) == len(lines[0])
    lines[0] = new_first
    st = os.stat(path)
    path.write_text('\n'.join(lines) + '\n')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert os.path.getsize(path) == st.st_size


def _edit_other_size(folder, name, new_first):
    path = folder / name
    lines = path.read_text().splitlines()
    lines[0] = new_first
    path.write_text('\n'.join(lines) + '\n')


@pytest.mark.parametrize('change', ['add', 'remove', 'edit-same-size', 'edit-other-size'])
def test_a_changed_folder_is_reparsed_never_stale(tmp_path, change):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    load_folder(str(folder), L, str(cache), progress=False)
    name = 'S1-N-1.txt'
    old_value = load_folder(str(folder), L, str(cache), progress=False).x[1, 0, 0]
    if change == 'add':
        write_segment(folder / 'S3-AFIB-9.txt', _values(99))
    elif change == 'remove':
        os.remove(folder / name)
    elif change == 'edit-same-size':
        first = (folder / name).read_text().splitlines()[0]
        new = '9' * len(first) if not first.startswith('-') else '-' + '9' * (len(first) - 1)
        _edit_same_size(folder, name, new)
    else:
        _edit_other_size(folder, name, '12345.5')
    seg = load_folder(str(folder), L, str(cache), progress=False)
    assert not seg.from_cache
    fresh = load_folder(str(folder), L, None, progress=False)      # no cache: the truth
    assert list(seg.names) == list(fresh.names)
    np.testing.assert_array_equal(seg.x, fresh.x)
    if change == 'add':
        assert len(seg) == 5 and 'S3-AFIB-9.txt' in seg.names
    elif change == 'remove':
        assert len(seg) == 3 and name not in seg.names
    else:
        assert seg.x[1, 0, 0] != old_value
    again = load_folder(str(folder), L, str(cache), progress=False)
    assert again.from_cache
    np.testing.assert_array_equal(again.x, fresh.x)
    assert len(os.listdir(cache)) == 2, 'one cache entry (array + meta) per folder'


def test_a_corrupt_cache_is_ignored_and_rebuilt(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    truth = load_folder(str(folder), L, str(cache), progress=False)
    for f in os.listdir(cache):
        (cache / f).write_bytes(b'garbage')
    seg = load_folder(str(folder), L, str(cache), progress=False)
    assert not seg.from_cache
    np.testing.assert_array_equal(seg.x, truth.x)


def test_cache_is_keyed_by_input_size(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    load_folder(str(folder), L, str(cache), progress=False)
    with pytest.raises(DataError, match='has 16 samples, but INPUT_SIZE=8'):
        load_folder(str(folder), 8, str(cache), progress=False)


def test_skipped_files_are_remembered_by_the_cache(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    write_segment(folder / 'S9-N-0.txt', text='x\n' * L)
    first = load_folder(str(folder), L, str(cache), skip_bad=True, progress=False)
    second = load_folder(str(folder), L, str(cache), skip_bad=True, progress=False)
    assert second.from_cache
    assert [s[0] for s in first.skipped] == [s[0] for s in second.skipped] == ['S9-N-0.txt']
    with pytest.raises(DataError, match='S9-N-0.txt'):
        load_folder(str(folder), L, str(cache), skip_bad=False, progress=False)


def test_parallel_parsing_of_many_files_matches_serial(tmp_path):
    folder = tmp_path / 'many'
    folder.mkdir()
    rng = np.random.default_rng(0)
    values = rng.normal(size=(1203, 8)).round(3)
    for i, v in enumerate(values):
        (folder / f'S{i % 7}-{"AFIB" if i % 3 else "N"}-{i}.txt').write_text(
            ''.join(f'{a:.3f}\n' for a in v))
    start = time.perf_counter()
    serial = load_folder(str(folder), 8, workers=1, progress=False)
    parallel = load_folder(str(folder), 8, workers=2, progress=False)
    assert time.perf_counter() - start < 60
    assert len(parallel) == 1203
    np.testing.assert_array_equal(serial.x, parallel.x)
    assert list(serial.names) == list(parallel.names)
    (folder / 'S1-N-1202.txt').write_text('1\n' * 7 + 'oops\n')
    with pytest.raises(DataError, match=r"S1-N-1202\.txt: line 8: 'oops' is not a number"):
        load_folder(str(folder), 8, workers=2, progress=False)


# ----------------------------------------------------------------------------- split

def test_split_keeps_every_subject_on_one_side(small_data):
    seg = load_folder(str(small_data.train), 1250, progress=False)
    y = seg.labels(('AFIB',))
    train_idx, val_idx = split_by_subject(seg.subjects, y, 0.2, seed=42)
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(len(seg)))
    assert not set(seg.subjects[train_idx]) & set(seg.subjects[val_idx])
    assert set(y[train_idx]) == set(y[val_idx]) == {0, 1}
    again = split_by_subject(seg.subjects, y, 0.2, seed=42)
    np.testing.assert_array_equal(again[1], val_idx)


@pytest.mark.parametrize('n_subjects,fraction,n_val', [
    (10, 0.2, 2), (10, 0.05, 1), (10, 0.99, 9), (2, 0.2, 1), (2, 0.9, 1), (5, 0.5, 2),
])
def test_split_validation_subject_count(n_subjects, fraction, n_val):
    subjects = np.repeat([f'S{i}' for i in range(n_subjects)], 4)
    labels = np.tile([0, 1, 0, 1], n_subjects)
    train_idx, val_idx = split_by_subject(subjects, labels, fraction, seed=1)
    assert len(np.unique(subjects[val_idx])) == n_val
    assert len(np.unique(subjects[train_idx])) == n_subjects - n_val
    assert not set(subjects[train_idx]) & set(subjects[val_idx])


def test_split_needs_two_subjects():
    with pytest.raises(DataError, match=r'has 1 subject\(s\); a subject-wise validation split '
                                        r'needs at least 2'):
        split_by_subject(np.array(['S1'] * 4), np.array([0, 1, 0, 1]), 0.2, seed=0)


def test_split_error_names_the_data_folder():
    with pytest.raises(DataError, match=r'^data/train: the training data has 1 subject\(s\); '
                                        r'a subject-wise validation split needs at least 2'):
        split_by_subject(np.array(['S1'] * 4), np.array([0, 1, 0, 1]), 0.2, 0, source='data/train')


# ----------------------------------------------------------------------------- binary files

def test_binary_file_error_is_a_short_escaped_excerpt(tmp_path):
    folder = _folder(tmp_path)
    blob = b'\x89PNG\r\n\x1a\n' + bytes(np.random.default_rng(0).integers(0, 256, 3000,
                                                                            dtype=np.uint8))
    (folder / 'S9-N-0.txt').write_bytes(blob)
    with pytest.raises(DataError) as info:
        load_folder(str(folder), L, progress=False)
    message = str(info.value)
    assert message.startswith(f"{folder / 'S9-N-0.txt'}: is not a text file (it holds NUL bytes")
    assert "starts with b'\\x89PNG\\r\\n\\x1a\\n" in message and 'one number per line' in message
    assert len(message) - len(str(folder)) < 160 and '\n' not in message
    seg = load_folder(str(folder), L, skip_bad=True, progress=False)
    assert [s[0] for s in seg.skipped] == ['S9-N-0.txt'] and len(seg.skipped[0][1]) < 250


def test_a_long_bad_line_is_cut_to_a_short_excerpt(tmp_path):
    folder = _folder(tmp_path)
    write_segment(folder / 'S9-N-0.txt', text='\xe9t\xe9 ' * 200 + '\n' + '1.0\n' * (L - 1))
    with pytest.raises(DataError, match=r"S9-N-0\.txt: line 1: '\xe9t\xe9 \xe9t\xe9 .*'\.\.\. is "
                                        r"not a number; every line must hold one number") as info:
        load_folder(str(folder), L, progress=False)
    assert len(str(info.value)) - len(str(folder)) < 130


@pytest.mark.parametrize('value,expected', [
    ('abc', "'abc'"), (b'\x00\x01', "b'\\x00\\x01'"), ('x' * 50, "'" + 'x' * 35 + "'..."),
    (b'\x00' * 50, "b'" + '\\x00' * 8 + "'..."),
])
def test_excerpt_is_short_and_escaped(value, expected):
    assert excerpt(value) == expected and len(excerpt(value)) <= 40


# ----------------------------------------------------------------------------- robust cache

def test_cache_dir_naming_a_file_is_a_clear_error(tmp_path):
    folder, not_a_folder = _folder(tmp_path), tmp_path / 'cache.txt'
    not_a_folder.write_text('a file, not a folder\n')
    with pytest.raises(DataError, match=rf"^{re.escape(str(not_a_folder))}: CACHE_DIR names an "
                                        rf"existing file; CACHE_DIR must be a folder"):
        load_folder(str(folder), L, str(not_a_folder), progress=False)
    with pytest.raises(DataError, match=r'cache\.txt/sub: CACHE_DIR cannot be created .*must be '
                                        r'a folder'):
        load_folder(str(folder), L, str(not_a_folder / 'sub'), progress=False)
    assert not_a_folder.read_text() == 'a file, not a folder\n'


def _entry(cache):
    """(meta path, array path) of the one cache entry in cache."""
    (meta,) = cache.glob('*.meta.npz')
    return meta, meta.with_name(meta.name.replace('.meta.npz', '.npy'))


def _flip_byte(path, offset):
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x5A]))


def _corrupt(path, how):
    data = path.read_bytes()
    st = os.stat(path)
    if how == 'truncated':
        path.write_bytes(data[:len(data) // 2])
    elif how == 'empty':
        path.write_bytes(b'')
    elif how == 'garbage':
        path.write_bytes(b'garbage')
    elif how == 'pickle':
        path.write_bytes(b'\x80\x04\x95' + data[3:])
    elif how == 'flipped-byte':                  # same size, same mtime: only a checksum sees it
        _flip_byte(path, len(data) - 1 if path.suffix == '.npy' else 200)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif how == 'npy-not-npz':
        np.save(path.with_suffix('.tmp.npy'), np.arange(3))
        os.replace(path.with_suffix('.tmp.npy'), path)
    elif how == 'int32-header':                     # same bytes read as another dtype
        path.write_bytes(data.replace(b"'descr': '<f4'", b"'descr': '<i4'", 1))


CORRUPTIONS = [('meta', h) for h in ('truncated', 'empty', 'garbage', 'pickle',
                                     'flipped-byte', 'npy-not-npz')] + \
              [('array', h) for h in ('truncated', 'empty', 'garbage', 'pickle',
                                      'flipped-byte', 'int32-header')]


@pytest.mark.parametrize('which,how', CORRUPTIONS, ids=[f'{w}-{h}' for w, h in CORRUPTIONS])
def test_corrupt_cache_entry_is_a_quiet_miss_and_is_rewritten(tmp_path, capfd, which, how):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    truth = load_folder(str(folder), L, str(cache), progress=False)
    meta, array = _entry(cache)
    target = meta if which == 'meta' else array
    _corrupt(target, how)
    capfd.readouterr()
    seg = load_folder(str(folder), L, str(cache), progress=False)
    out, err = capfd.readouterr()
    assert not seg.from_cache
    np.testing.assert_array_equal(seg.x, truth.x)
    assert list(seg.names) == list(truth.names)
    assert out == '' and len(err.splitlines()) == 1, err
    assert err.startswith(f'warning: {target}: cache entry ') and 'Traceback' not in err
    again = load_folder(str(folder), L, str(cache), progress=False)      # the entry was rewritten
    assert again.from_cache and capfd.readouterr() == ('', '')
    np.testing.assert_array_equal(again.x, truth.x)


def test_array_bytes_overwritten_in_place_fail_the_checksum(tmp_path, capfd):
    """The defect: an .npy overwritten in place (same size and mtime) loaded without complaint."""
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    truth = load_folder(str(folder), L, str(cache), progress=False)
    _, array = _entry(cache)
    st = os.stat(array)
    payload_start = st.st_size - truth.x.nbytes
    with open(array, 'r+b') as f:                    # a value in the middle of the payload
        f.seek(payload_start + truth.x.nbytes // 2)
        f.write(np.float32(1234.5).tobytes())
    os.utime(array, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert load_cached(str(array)[:-4], verify=False).x.ravel()[truth.x.size // 2] == 1234.5
    assert load_cached(str(array)[:-4]) is None
    assert 'crc32 checksum does not match' in capfd.readouterr().err
    seg = load_folder(str(folder), L, str(cache), progress=False)
    assert not seg.from_cache
    np.testing.assert_array_equal(seg.x, truth.x)


def test_random_damage_to_the_cache_never_raises_nor_returns_wrong_data(tmp_path, capfd):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    truth = load_folder(str(folder), L, str(cache), progress=False)
    meta, array = _entry(cache)
    pristine = {meta: meta.read_bytes(), array: array.read_bytes()}
    rng = np.random.default_rng(7)
    for trial in range(150):
        for path, data in pristine.items():
            path.write_bytes(data)
        path = (meta, array)[trial % 2]
        data = bytearray(pristine[path])
        if trial % 3 == 0:
            data = data[:rng.integers(0, len(data))]
        else:
            for offset in rng.integers(0, len(data), rng.integers(1, 4)):
                data[offset] ^= int(rng.integers(1, 256))
        path.write_bytes(bytes(data))
        seg = load_folder(str(folder), L, str(cache), progress=False)
        np.testing.assert_array_equal(seg.x, truth.x)
        assert list(seg.names) == list(truth.names) and list(seg.rhythms) == list(truth.rhythms)
        assert len(capfd.readouterr().err.splitlines()) <= 1


def test_save_keeps_in_progress_and_newer_files_and_drops_stale_ones(tmp_path):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    segments = load_folder(str(folder), L, progress=False)
    prefix, newer = cache_entry(str(cache), str(folder), 'key written later by another process')
    save_cached(str(cache), prefix, newer, segments)
    future = time.time_ns() + 60 * 10**9
    os.utime(newer + '.meta.npz', ns=(future, future))
    _, older = cache_entry(str(cache), str(folder), 'an older key')
    save_cached(str(cache), prefix, older, segments)
    in_progress = cache / f'{prefix}-0123.npy.99-abc.tmp'     # another process is writing it
    in_progress.write_bytes(b'partial')
    stale = [cache / f'{prefix}-4567.npy.98-def.tmp', cache / f'{prefix}-89ab.npy']
    for path in stale:                                        # left by a killed writer
        path.write_bytes(b'partial')
        os.utime(path, ns=(1, time.time_ns() - 2 * 3600 * 10**9))
    _, stem = cache_entry(str(cache), str(folder), 'this key')
    save_cached(str(cache), prefix, stem, segments)
    left = sorted(os.listdir(cache))
    assert not os.path.exists(older + '.npy') and not os.path.exists(older + '.meta.npz')
    assert not any(path.exists() for path in stale)
    assert in_progress.name in left and os.path.basename(newer) + '.npy' in left
    assert load_cached(stem) is not None and load_cached(newer) is not None


def test_a_failed_cache_write_is_one_warning_and_the_data_still_loads(tmp_path, capfd):
    folder, cache = _folder(tmp_path), tmp_path / 'cache'
    segments = load_folder(str(folder), L, progress=False)
    prefix, stem = cache_entry(str(cache), str(folder), 'key')
    os.makedirs(stem + '.npy')                  # the rename onto it fails, even for root
    save_cached(str(cache), prefix, stem, segments)
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and 'cannot write the cache entry' in err, err
    assert sorted(os.listdir(cache)) == [os.path.basename(stem) + '.npy'], 'no temporary file left'
    assert load_cached(stem) is None and capfd.readouterr().err == ''


_WORKER = '''
import os, sys, time
import numpy as np
from public.dataset import cache_entry, load_cached, load_folder, save_cached
folder, cache, go, mode, rounds = sys.argv[1:]
truth = load_folder(folder, 16, None, progress=False)
prefix, stem = cache_entry(cache, folder, 'shared key')
while not os.path.exists(go):
    time.sleep(0.0005)
for i in range(int(rounds)):
    if mode == 'save':        # both processes write the same entry again and again
        save_cached(cache, prefix, stem, truth)
        got = load_cached(stem)
        assert got is not None, 'own entry not loadable'
    else:                     # load_folder with two keys: misses, saves and drops interleave
        got = load_folder(folder, 16, cache, skip_bad=bool(i % 2), progress=False, workers=1)
    assert np.array_equal(got.x, truth.x) and list(got.names) == list(truth.names)
print('ok')
'''


@pytest.mark.parametrize('mode', ['save', 'load_folder'])
def test_two_processes_writing_the_cache_at_once(tmp_path, mode):
    """The defect: two processes saving one folder's cache crashed with FileNotFoundError."""
    folder, cache = tmp_path / 'data', tmp_path / 'cache'
    folder.mkdir()
    for i in range(300):              # ~20 KB array: each save takes long enough to overlap
        write_segment(folder / f'S{i % 5}-{"AFIB" if i % 2 else "N"}-{i}.txt', _values(i))
    go = tmp_path / 'go'
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    workers = [subprocess.Popen([sys.executable, '-c', _WORKER, str(folder), str(cache), str(go),
                                 mode, '60'], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(2)]
    time.sleep(0.5)
    go.write_text('')
    results = [w.communicate(timeout=120) for w in workers]
    for worker, (out, err) in zip(workers, results):
        assert worker.returncode == 0 and out.strip() == 'ok', err
        assert 'Traceback' not in err and 'warning' not in err, err
    truth = load_folder(str(folder), L, None, progress=False)
    if mode == 'save':
        final = load_cached(cache_entry(str(cache), str(folder), 'shared key')[1])
        assert final is not None
    else:
        final = load_folder(str(folder), L, str(cache), skip_bad=True, progress=False)
        assert final.from_cache       # the key of both processes' last round
    np.testing.assert_array_equal(final.x, truth.x)
    assert not list(cache.glob('*tmp')), 'temporary files left behind'


# ----------------------------------------------------------------------------- layout

def _imported_modules(path):
    """Every module a source file imports, at any depth ('from public import x' counts as
    public.x), by parsing it: nothing is executed."""
    names = set()
    for node in ast.walk(ast.parse(Path(path).read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.ImportFrom):       # a relative import: always reported
            names.add('.' * node.level + (node.module or ''))
    return names


def _loader_modules():
    return sorted({sys.modules[loader.load.__module__] for loader in dataset.LOADERS.values()},
                  key=lambda module: module.__name__)


def test_every_format_has_a_loader_module_of_its_own():
    assert list(dataset.LOADERS) == ['txt', 'csv', 'numpy']
    modules = [sys.modules[loader.load.__module__].__name__ for loader in dataset.LOADERS.values()]
    assert modules == ['public.data.txt_format', 'public.data.csv_format', 'public.data.numpy_format']


@pytest.mark.parametrize('module', _loader_modules(), ids=lambda m: m.__name__)
def test_a_loader_module_imports_only_the_shared_data_module(module):
    """The data path has one direction: public.data.loading -> loaders -> public.data.segments."""
    public = {name for name in _imported_modules(module.__file__)
              if name.startswith(('public', '.'))}
    allowed = {'public.data.segments', 'public.core.errors'}
    assert {name for name in public if not name.startswith(tuple(allowed))} == set(), \
        f"{module.__name__} imports {sorted(public)}; a loader imports only {sorted(allowed)}"


def test_the_shared_data_module_imports_no_other_data_module():
    public = {name for name in _imported_modules(segments_module.__file__)
              if name.startswith(('public', '.'))}
    assert {name for name in public if not name.startswith('public.core.')} == set(), public


def test_a_new_format_is_one_loader_and_one_table_line(tmp_path, make_settings, monkeypatch):
    """detect_format and load_data need nothing but the LOADERS line."""
    seen = []

    def load_wav(path, options):
        seen.append((path, options))
        return 'segments'

    monkeypatch.setitem(dataset.LOADERS, 'wav', dataset.Loader(load_wav, ('.wav',), 'a .wav file'))
    path = tmp_path / 'ecg.wav'
    path.write_bytes(b'RIFF')
    assert dataset.detect_format(str(path)) == 'wav'
    settings = make_settings(DATA_DIR=str(path), TEST_DIR='', INPUT_SIZE=100, PAD_TOLERANCE=3,
                             CACHE_DIR=str(tmp_path / 'cache'))
    assert dataset.load_data(str(path), settings, progress=False) == 'segments'
    (_, options), = seen
    assert options.policy == LengthPolicy(100, 3) and options.cache_dir == str(tmp_path / 'cache')
    assert options.labels == dataset.LabelSpec('multiclass', '|', ())
    unknown = tmp_path / 'ecg.edf'
    unknown.write_bytes(b'0')
    with pytest.raises(DataError, match=r"cannot tell the data format: expected a folder of \.txt "
                                        r"files, a \.csv file, a \.npy/\.npz file or a \.wav file"):
        dataset.detect_format(str(unknown))


@pytest.mark.parametrize('name, expected', [('train.csv', 'csv'), ('X.NPZ', 'numpy'),
                                            ('x.npy', 'numpy'), ('folder', 'txt')])
def test_detect_format(tmp_path, name, expected):
    path = tmp_path / name
    if expected == 'txt':
        path.mkdir()
    assert dataset.detect_format(str(path)) == expected


def test_detect_format_names_missing_and_unknown_paths(tmp_path):
    with pytest.raises(DataError, match=r"nowhere: data path does not exist"):
        dataset.detect_format(str(tmp_path / 'nowhere'))
    (tmp_path / 'notes.md').write_text('')
    with pytest.raises(DataError, match=r"notes\.md: cannot tell the data format: expected a "
                                        r"folder of \.txt files, a \.csv file or a \.npy/\.npz "
                                        r"file \(or set DATA_FORMAT\)"):
        dataset.detect_format(str(tmp_path / 'notes.md'))
