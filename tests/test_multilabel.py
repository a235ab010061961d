"""Tests of multi-label data (LABEL_MODE='multilabel', seed 004 PTB-XL diagnostic superclasses)
through the data path: CSV and .npz sources, encode_labels, the splits, the error messages.

Every data file is written in tmp_path; arrays are small (a few records) except where the
seed-004 shape (12 leads x 1000 samples) is the point.
"""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from multilabel_data import PTBXL_CLASSES, write_ptbxl_like_npz
from public.dataset import (DataError, LabelSpec, LengthPolicy, encode_labels, load_data,
                            split_by_folds, split_by_subject)
from public.data.csv_format import load_csv
from public.data.numpy_format import load_numpy

L = 20       # samples per segment of the small files
MULTI = LabelSpec('multilabel', '|', PTBXL_CLASSES)


@pytest.fixture
def multilabel_settings(make_settings, tmp_path):
    """settings(path, **overrides): multi-label PTB-XL classes, data at path, no test set."""
    def settings(path, **overrides):
        values = dict(DATA_DIR=str(path), TEST_DIR='', INPUT_SIZE=L, LABEL_MODE='multilabel',
                      CLASSES=PTBXL_CLASSES, CACHE_DIR=str(tmp_path / 'cache'))
        values.update(overrides)
        return make_settings(**values)
    return settings


def write_csv(path, labels, subjects=None, folds=None, length=L):
    """A segment CSV (id, heartbeat_signals, label[, subject][, fold]) with the label text
    as given; returns path."""
    rng = np.random.default_rng(0)
    header = ['id', 'heartbeat_signals', 'label'] + (['subject'] if subjects else []) + (
        ['fold'] if folds else [])
    lines = [','.join(header)]
    for i, label in enumerate(labels):
        signal = ','.join(f"{v:.4f}" for v in rng.normal(size=length))
        fields = [str(i), f'"{signal}"', label]
        fields += [subjects[i]] if subjects else []
        fields += [str(folds[i])] if folds else []
        lines.append(','.join(fields))
    path.write_text('\n'.join(lines) + '\n')
    return path


def hot(*rows):
    """Multi-hot float32 rows from label-name lists, in PTBXL_CLASSES order."""
    return np.asarray([[name in row for name in PTBXL_CLASSES] for row in rows], np.float32)


# ----------------------------------------------------------------------------- CSV

def test_csv_multilabel_text_encodes_to_multi_hot(tmp_path, multilabel_settings):
    labels = ['NORM', 'NORM|MI', 'MI|STTC|HYP', '', ' CD | HYP ', 'HYP|MI']
    path = write_csv(tmp_path / 'ptbxl.csv', labels)
    settings = multilabel_settings(path)
    segments = load_data(str(path), settings, progress=False)
    assert segments.has_labels
    assert segments.rhythms.tolist() == ['NORM', 'NORM|MI', 'MI|STTC|HYP', '', 'CD|HYP', 'HYP|MI']
    y = encode_labels(segments, settings, str(path))
    assert y.dtype == np.float32 and y.shape == (6, 5)
    np.testing.assert_array_equal(y, hot(['NORM'], ['NORM', 'MI'], ['MI', 'STTC', 'HYP'], [],
                                         ['CD', 'HYP'], ['HYP', 'MI']))


def test_csv_multilabel_with_another_separator(tmp_path, multilabel_settings):
    path = write_csv(tmp_path / 'ptbxl.csv', ['NORM', 'MI;CD', 'STTC'])
    settings = multilabel_settings(path, LABEL_SEPARATOR=';')
    y = encode_labels(load_data(str(path), settings, progress=False), settings, str(path))
    np.testing.assert_array_equal(y, hot(['NORM'], ['MI', 'CD'], ['STTC']))


def test_csv_cache_keeps_label_rules_apart(tmp_path):
    """A parse under one label mode or separator is never served to another."""
    path = write_csv(tmp_path / 'ptbxl.csv', ['NORM', 'MI;CD', 'STTC'])
    cache = str(tmp_path / 'cache')
    semicolon = LabelSpec('multilabel', ';', PTBXL_CLASSES)
    first = load_csv(path, LengthPolicy(L), cache_dir=cache, label_spec=semicolon)
    assert not first.from_cache
    assert load_csv(path, LengthPolicy(L), cache_dir=cache, label_spec=semicolon).from_cache
    assert not load_csv(path, LengthPolicy(L), cache_dir=cache, label_spec=MULTI).from_cache
    with pytest.raises(DataError, match=r"row 1 \(id 0\): label 'NORM' is not an integer"):
        load_csv(path, LengthPolicy(L), cache_dir=cache)              # multi-class


@pytest.mark.parametrize('label', ['NORM||MI', 'MI|', '|CD'])
def test_csv_empty_label_name_is_named(tmp_path, label):
    path = write_csv(tmp_path / 'ptbxl.csv', ['NORM', label, 'STTC'])
    with pytest.raises(DataError, match=rf"row 2 \(id 1\): label '{label.replace('|', '[|]')}' "
                                        rf"has an empty label name; a multi-label label holds "
                                        rf"label names joined with LABEL_SEPARATOR='[|]'") as error:
        load_csv(path, LengthPolicy(L), label_spec=MULTI)
    assert str(error.value).startswith(f"{path}: ")


def test_csv_multiclass_keeps_integer_labels(tmp_path):
    path = write_csv(tmp_path / 'ptbxl.csv', ['0', 'NORM|MI'])
    with pytest.raises(DataError, match=r"row 2 \(id 1\): label 'NORM\|MI' is not an integer.*"
                                        r"LABEL_MODE='multilabel'"):
        load_csv(path, LengthPolicy(L))


def test_csv_all_empty_labels_mean_unlabelled(tmp_path):
    segments = load_csv(write_csv(tmp_path / 'test.csv', ['', '']), LengthPolicy(L),
                        label_spec=MULTI)
    assert not segments.has_labels and segments.rhythms.tolist() == ['', '']


# ----------------------------------------------------------------------------- NumPy

def test_npz_multi_hot_twelve_leads_with_folds(tmp_path, multilabel_settings):
    path = write_ptbxl_like_npz(tmp_path / 'ptbxl.npz', n=40, seed=1)
    arrays = np.load(path)
    settings = multilabel_settings(path, INPUT_SIZE=1000, VAL_FOLDS=(9, 10))
    segments = load_data(str(path), settings, progress=False)
    assert segments.x.shape == (40, 12, 1000) and segments.x.dtype == np.float32
    np.testing.assert_array_equal(segments.x, arrays['x'])
    y = encode_labels(segments, settings, str(path))
    assert y.dtype == np.float32
    np.testing.assert_array_equal(y, arrays['y'])
    assert segments.folds.tolist() == [str(f) for f in arrays['fold']]
    first = arrays['y'][0].astype(bool)
    assert segments.rhythms[0] == '|'.join(np.asarray(PTBXL_CLASSES)[first])
    train_idx, val_idx = split_by_folds(segments.folds, settings.VAL_FOLDS, str(path))
    assert set(arrays['fold'][val_idx]) <= {9, 10} and not set(arrays['fold'][train_idx]) & {9, 10}
    assert len(train_idx) + len(val_idx) == 40 and len(val_idx) > 0


def test_npz_rows_become_text_in_classes_order(tmp_path):
    y = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 1], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]], np.uint8)
    np.savez(tmp_path / 'd.npz', x=np.zeros((4, 2, L)), y=y)
    segments = load_numpy(tmp_path / 'd.npz', LengthPolicy(L), label_spec=MULTI)
    assert segments.rhythms.tolist() == ['NORM', 'MI|HYP', '', 'MI|STTC|CD|HYP']
    assert segments.has_labels


@pytest.mark.parametrize('y', [np.array([[1, 0, 0, 0, 0], [0, 1, 0, 0, 1]], dtype=bool),
                               np.array([[1., 0, 0, 0, 0], [0, 1, 0, 0, 1]]),
                               np.array(['NORM', 'MI|HYP']), np.array([b'NORM', b'HYP | MI'])])
def test_npz_multilabel_y_dtypes_and_text(tmp_path, multilabel_settings, y):
    path = tmp_path / 'd.npz'
    np.savez(path, x=np.zeros((2, L)), y=y)
    settings = multilabel_settings(path)
    labels = encode_labels(load_data(str(path), settings, progress=False), settings, str(path))
    np.testing.assert_array_equal(labels, hot(['NORM'], ['MI', 'HYP']))


# (y, LABEL_MODE, message): each names the file and what is wrong.
NPZ_ERRORS = {
    'K is not len(CLASSES)': (np.zeros((3, 4)), 'multilabel',
                              r"y has shape \(3, 4\): 4 labels per segment, but CLASSES=\('NORM', "
                              r"'MI', 'STTC', 'CD', 'HYP'\) names 5"),
    'value 2': (np.array([[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [0, 1, 0, 2, 0]]), 'multilabel',
                r"y\[2, 3\] \(segment 2, label 'CD'\) is 2; a multi-label y holds 0 or 1"),
    'value 0.5': (np.array([[1, 0, 0.5, 0, 0], [0, 0, 0, 0, -1.0], [0] * 5]), 'multilabel',
                  r"y\[0, 2\] \(segment 0, label 'STTC'\) is 0.5"),
    'NaN': (np.array([[0, 0, 0, 0, 0], [np.nan, 0, 0, 0, 0], [0] * 5]), 'multilabel',
            r"y\[1, 0\] \(segment 1, label 'NORM'\) is nan"),
    'text matrix': (np.full((3, 5), 'x'), 'multilabel', r"y has shape \(3, 5\) and dtype <U1"),
    'wrong N': (np.zeros((2, 5)), 'multilabel',
                r"y has shape \(2, 5\), but x holds 3 segments; y must have shape \(3,\).* or "
                r"\(3, 5\): one 0/1 column per CLASSES name"),
    'empty name': (np.array(['NORM', 'MI||CD', '']), 'multilabel',
                   r"y\[1\] is 'MI\|\|CD', which has an empty label name"),
    'matrix, multiclass': (np.zeros((3, 5)), 'multiclass',
                           r"y has shape \(3, 5\): multi-label\? set LABEL_MODE='multilabel' and "
                           r"CLASSES to the 5 label names"),
}


@pytest.mark.parametrize('case', list(NPZ_ERRORS))
def test_malformed_multilabel_npz_is_named(tmp_path, case):
    y, mode, message = NPZ_ERRORS[case]
    path = tmp_path / 'bad.npz'
    np.savez(path, x=np.zeros((3, L)), y=y)
    spec = LabelSpec(mode, '|', PTBXL_CLASSES)
    with pytest.raises(DataError, match=message) as error:
        load_numpy(path, LengthPolicy(L), label_spec=spec)
    assert str(error.value).startswith(f"{path}: ")


# ----------------------------------------------------------------------------- txt, encode

def test_txt_folder_cannot_be_multilabel(small_data, multilabel_settings):
    settings = multilabel_settings(small_data.train, INPUT_SIZE=1250)
    with pytest.raises(DataError, match=rf"^{small_data.train}: LABEL_MODE='multilabel' needs a "
                                        rf"CSV or \.npz source"):
        load_data(str(small_data.train), settings, progress=False)


@pytest.mark.parametrize('labels, segment, label', [
    (['NORM', 'NORM|AFIB', 'MI'], '1', 'AFIB'),
    (['NORM', 'MI', 'norm'], '2', 'norm'),              # names are case-sensitive
])
def test_unknown_label_names_source_segment_label_and_classes(tmp_path, multilabel_settings,
                                                              labels, segment, label):
    path = write_csv(tmp_path / 'ptbxl.csv', labels)
    settings = multilabel_settings(path)
    segments = load_data(str(path), settings, progress=False)
    with pytest.raises(DataError, match=rf"^{path}: {segment} has label '{label}' .*which is not "
                                        rf"in CLASSES=\('NORM', 'MI', 'STTC', 'CD', 'HYP'\)"):
        encode_labels(segments, settings, str(path))


@pytest.mark.parametrize('overrides, rhythms, expected', [
    (dict(), ['AFIB', 'N', ''], [1, 0, 0]),
    (dict(POSITIVE_LABELS=('1',)), ['1', '0', '1'], [1, 0, 1]),
    (dict(CLASSES=(0, 1, 2)), ['2', '0', '1'], [2, 0, 1]),
])
def test_single_label_encoding_is_unchanged(tmp_path, make_settings, overrides, rhythms,
                                            expected):
    path = tmp_path / 'd.npz'
    np.savez(path, x=np.zeros((3, L)), y=np.array(rhythms))
    settings = make_settings(DATA_DIR=str(path), TEST_DIR='', INPUT_SIZE=L, **overrides)
    y = encode_labels(load_data(str(path), settings, progress=False), settings, str(path))
    assert y.dtype == np.int64 and y.tolist() == expected


# ----------------------------------------------------------------------------- split

def _split_before_multilabel(subjects, labels, val_fraction, seed):
    """split_by_subject as it was before (N, K) labels: the binary/multi-class reference."""
    unique = np.unique(subjects)
    n_val = min(len(unique) - 1, max(1, int(round(val_fraction * len(unique)))))
    rng = np.random.default_rng(seed)
    for _ in range(100):
        val_subjects = rng.permutation(unique)[:n_val]
        val_mask = np.isin(subjects, val_subjects)
        if (len(np.unique(labels[val_mask])) == len(np.unique(labels))
                and len(np.unique(labels[~val_mask])) == len(np.unique(labels))):
            break
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)


@pytest.mark.parametrize('seed', range(6))
def test_single_label_split_is_the_same_as_before(seed):
    rng = np.random.default_rng(seed)
    subjects = rng.integers(0, 12, 80).astype(str)
    labels = rng.choice(4, 80, p=[0.7, 0.2, 0.07, 0.03])   # rare classes force retries
    for fraction in (0.2, 0.5):
        got = split_by_subject(subjects, labels, fraction, seed)
        expected = _split_before_multilabel(subjects, labels, fraction, seed)
        for a, b in zip(got, expected):
            np.testing.assert_array_equal(a, b)


def test_multilabel_split_keeps_subjects_whole_and_every_label_on_both_sides(tmp_path):
    arrays = np.load(write_ptbxl_like_npz(tmp_path / 'ptbxl.npz', n=60, seed=3))
    subjects, y = arrays['subject'], arrays['y'].astype(np.float32)
    train_idx, val_idx = split_by_subject(subjects, y, 0.2, seed=42)
    assert sorted(np.concatenate([train_idx, val_idx])) == list(range(60))
    assert not set(subjects[train_idx]) & set(subjects[val_idx])
    assert y[train_idx].any(axis=0).all() and y[val_idx].any(axis=0).all()
    np.testing.assert_array_equal(split_by_subject(subjects, y, 0.2, seed=42)[1], val_idx)


# ----------------------------------------------------------------------------- learnable

def test_ptbxl_like_data_is_learnable_by_a_small_convnet(tmp_path):
    """The end-to-end tests rely on it: two epochs of a tiny convnet score far above chance."""
    arrays = np.load(write_ptbxl_like_npz(tmp_path / 'ptbxl.npz', n=240, seed=0))
    x, y, fold = torch.from_numpy(arrays['x']), arrays['y'], arrays['fold']
    assert x.shape == (240, 12, 1000) and y.shape == (240, 5) and set(np.unique(y)) == {0, 1}
    assert sorted(set(fold.tolist())) == list(range(1, 11))
    assert 0 < (y.sum(axis=1) == 0).mean() < 0.1 and (y.mean(axis=0) > 0.1).all()
    train, val = fold <= 8, fold > 8
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv1d(12, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.Conv1d(16, 16, 9, stride=4), nn.BatchNorm1d(16), nn.ReLU(),
                        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 5))
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    x_train, y_train = x[train], torch.from_numpy(y[train]).float()
    for _ in range(2):
        for batch in torch.randperm(len(x_train)).split(16):
            loss = nn.functional.binary_cross_entropy_with_logits(net(x_train[batch]),
                                                                  y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    with torch.no_grad():
        scores = net(x[val]).numpy()
    auc = [roc_auc_score(y[val][:, k], scores[:, k]) for k in range(5)]
    assert np.mean(auc) > 0.8 and min(auc) > 0.7, auc
