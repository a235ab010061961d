"""Tests of public/train/contest.py: pooled F-beta against scikit-learn, hand-computed
per-subject cases (no AF, no non-AF, mixed), subject averages, the G score and the
IESD-2024 / TDC-2022 contest scores."""
import ast
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import fbeta_score

from public.train import contest
from public.train.contest import (CONTESTS, contest_score, contest_terms, fbeta,
                                  generalisation, normalised_contest_score, per_subject,
                                  subject_average)


# ----------------------------------------------------------------------- pooled F-beta

@pytest.mark.parametrize('beta', [0.5, 1.0, 2.0])
def test_fbeta_equals_sklearn_on_random_arrays(beta):
    rng = np.random.default_rng(1234)
    for _ in range(80):
        n = int(rng.integers(1, 40))
        p_true, p_pred = rng.choice([0.0, 0.1, 0.5, 0.9, 1.0], size=2)
        y_true = (rng.random(n) < p_true).astype(int)
        y_pred = (rng.random(n) < p_pred).astype(int)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            expected = fbeta_score(y_true, y_pred, beta=beta, zero_division=0)
        assert fbeta(y_true, y_pred, beta=beta) == pytest.approx(expected, abs=1e-12)


def test_fbeta_edge_cases_match_sklearn():
    cases = [([0, 0, 0], [0, 0, 0]), ([0, 0], [1, 1]), ([1, 1], [0, 0]), ([1, 1], [1, 1]),
             ([1], [0]), ([0], [1])]
    for y_true, y_pred in cases:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            expected = fbeta_score(y_true, y_pred, beta=2, zero_division=0)
        assert fbeta(y_true, y_pred) == pytest.approx(expected, abs=1e-12)
    # bool arrays are 0/1 arrays
    assert fbeta(np.array([True, False]), np.array([True, True])) == pytest.approx(5 / 6)


def test_fbeta_rejects_bad_input():
    with pytest.raises(ValueError, match='0 and 1'):
        fbeta([0, 2], [0, 1])
    with pytest.raises(ValueError, match='length'):
        fbeta([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match='at least one'):
        fbeta([], [])
    with pytest.raises(ValueError, match='beta'):
        fbeta([0, 1], [0, 1], beta=0)


# ----------------------------------------------------------------------- per subject

# A: no AF, 4 segments, all predicted negative.
# B: no AF, 4 segments, one false alarm.
# C: no non-AF, 5 AF segments, 3 found (TP 3, FN 2, FP 0).
# D: mixed, 4 AF + 6 non-AF: TP 3, FN 1, FP 2, TN 4.
Y_TRUE = [0, 0, 0, 0] + [0, 0, 0, 0] + [1, 1, 1, 1, 1] + [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
Y_PRED = [0, 0, 0, 0] + [0, 1, 0, 0] + [1, 1, 1, 0, 0] + [1, 1, 1, 0, 1, 1, 0, 0, 0, 0]
SUBJ = ['A'] * 4 + ['B'] * 4 + ['C'] * 5 + ['D'] * 10

FB_C = 5 * 3 / (5 * 3 + 4 * 2 + 0)          # 15/23
FB_D = 5 * 3 / (5 * 3 + 4 * 1 + 2)          # 15/21 = 5/7


def _rows(rule='accuracy'):
    return {r['subject']: r for r in per_subject(Y_TRUE, Y_PRED, SUBJ, no_positive=rule)}


def test_subject_without_af_scores_its_accuracy():
    rows = _rows('accuracy')
    a, b = rows['A'], rows['B']
    assert (a['n'], a['positives'], a['fbeta'], a['f1'], a['accuracy']) == (4, 0, 1.0, 1.0, 1.0)
    assert (b['n'], b['positives'], b['fbeta'], b['f1'], b['accuracy']) == (4, 0, 0.75, 0.75, 0.75)
    # recall is undefined without AF; precision 0/0 for A, 0/1 for B
    assert a['recall'] is None and b['recall'] is None
    assert a['precision'] is None and b['precision'] == 0.0
    assert (b['tp'], b['fp'], b['fn'], b['tn']) == (0, 1, 0, 3)


def test_subject_without_non_af_scores_fbeta_from_its_counts():
    c = _rows()['C']
    assert (c['n'], c['positives']) == (5, 5)
    assert c['fbeta'] == pytest.approx(15 / 23)
    assert c['f1'] == pytest.approx(2 * 3 / (2 * 3 + 2 + 0))      # 0.75
    assert c['precision'] == 1.0 and c['recall'] == pytest.approx(0.6)
    assert c['accuracy'] == pytest.approx(0.6)
    # no positive found at all: F-beta 0, precision 0 (zero_division=0), no rule needed
    r = per_subject([1, 1], [0, 0], ['X', 'X'])[0]
    assert (r['fbeta'], r['f1'], r['precision'], r['recall']) == (0.0, 0.0, 0.0, 0.0)


def test_mixed_subject_hand_computed_beta_2():
    d = _rows()['D']
    assert (d['n'], d['positives']) == (10, 4)
    assert d['fbeta'] == pytest.approx(5 / 7)
    assert d['f1'] == pytest.approx(2 / 3)
    assert d['precision'] == pytest.approx(3 / 5) and d['recall'] == pytest.approx(3 / 4)
    assert d['accuracy'] == pytest.approx(7 / 10)
    # the same subject alone equals the pooled figure and sklearn's
    idx = [i for i, s in enumerate(SUBJ) if s == 'D']
    yt, yp = np.array(Y_TRUE)[idx], np.array(Y_PRED)[idx]
    assert d['fbeta'] == pytest.approx(fbeta(yt, yp))
    assert d['fbeta'] == pytest.approx(fbeta_score(yt, yp, beta=2))


def test_no_positive_rules():
    skip, zd1, cont = _rows('skip'), _rows('zero_division_1'), _rows('contest')
    assert skip['A']['fbeta'] is None and skip['B']['fbeta'] is None and skip['B']['f1'] is None
    assert skip['A']['accuracy'] == 1.0 and skip['B']['accuracy'] == 0.75
    assert zd1['A']['fbeta'] == 1.0 and zd1['B']['fbeta'] == 0.0
    # the contests' helpers: PPV = sensitivity = 1 when the subject has no AF
    assert cont['A']['fbeta'] == cont['B']['fbeta'] == 1.0
    assert cont['B']['precision'] == cont['B']['recall'] == 1.0
    # subjects with AF do not depend on the rule
    for rows in (skip, zd1, cont):
        assert rows['C']['fbeta'] == pytest.approx(FB_C)
        assert rows['D']['fbeta'] == pytest.approx(FB_D)
    with pytest.raises(ValueError, match='no_positive'):
        per_subject(Y_TRUE, Y_PRED, SUBJ, no_positive='ignore')


def test_rows_sorted_by_subject_as_string_and_keys():
    rows = per_subject([0, 1, 0, 1, 0], [0, 1, 0, 0, 1], [9, 9, 10, 10, 2])
    assert [r['subject'] for r in rows] == ['10', '2', '9']
    assert set(rows[0]) >= {'subject', 'n', 'positives', 'fbeta', 'f1', 'accuracy',
                            'precision', 'recall'}
    assert per_subject([], [], []) == []
    with pytest.raises(ValueError, match='subjects'):
        per_subject([0, 1], [0, 1], ['A'])


def test_beta_changes_per_subject_fbeta():
    d = {r['subject']: r for r in per_subject(Y_TRUE, Y_PRED, SUBJ, beta=0.5)}['D']
    assert d['fbeta'] == pytest.approx(1.25 * 3 / (1.25 * 3 + 0.25 * 1 + 2))


# ----------------------------------------------------------------------- averages and G

def test_subject_average_skip_vs_accuracy():
    acc = per_subject(Y_TRUE, Y_PRED, SUBJ, no_positive='accuracy')
    skip = per_subject(Y_TRUE, Y_PRED, SUBJ, no_positive='skip')
    assert subject_average(acc) == pytest.approx((1.0 + 0.75 + FB_C + FB_D) / 4)
    assert subject_average(skip) == pytest.approx((FB_C + FB_D) / 2)
    assert subject_average(skip, 'accuracy') == pytest.approx((1 + 0.75 + 0.6 + 0.7) / 4)
    # recall is None for the subjects without AF, under every rule but 'contest'
    assert subject_average(acc, 'recall') == pytest.approx((0.6 + 0.75) / 2)
    assert subject_average([{'fbeta': None}]) is None
    with pytest.raises(KeyError):
        subject_average(acc, 'sensitivity')


def test_generalisation_is_strictly_greater_than_threshold():
    rows = [{'fbeta': 0.9}, {'fbeta': 0.95}, {'fbeta': 0.5}, {'fbeta': None}]
    assert generalisation(rows) == pytest.approx(1 / 3)
    assert generalisation(rows, threshold=0.4) == 1.0
    assert generalisation([{'fbeta': None}]) is None
    # exact 0.9 from counts: accuracy 9/10 (no AF, one false alarm in 10) and
    # F-beta 45/50 (TP 9, FN 0, FP 5); neither counts, 0.95 does
    y_true = [0] * 10 + [1] * 9 + [0] * 5 + [1] * 19 + [0]
    y_pred = [0] * 9 + [1] + [1] * 9 + [1] * 5 + [1] * 19 + [0]
    subj = ['P'] * 10 + ['Q'] * 14 + ['R'] * 20
    rows = per_subject(y_true, y_pred, subj)
    assert [r['fbeta'] for r in rows] == pytest.approx([0.9, 0.9, 1.0])
    assert generalisation(rows) == pytest.approx(1 / 3)
    assert generalisation(rows, metric='accuracy', threshold=0.8) == pytest.approx(2 / 3)


# ----------------------------------------------------------------------- contest scores

def test_contest_tables_are_consistent():
    for name, spec in CONTESTS.items():
        assert spec['maximum'] == sum(t['weight'] for t in spec['terms'].values())
        assert spec['beta'] == 2.0
    assert CONTESTS['iesd2024']['maximum'] == 80 and CONTESTS['tdc2022']['maximum'] == 140


def test_iesd_winner_hand_computed():
    # Fbeta 0.935, G 0.833, 4.88 ms; flash not published: 100 KiB
    expected = (25 * (0.935 - 0.5) / 0.5 + 15 * 0.833 + 35 * (50 - 4.88) / 49.5
                + 5 * (1000 - 100) / 950)
    assert expected == pytest.approx(70.88487, abs=1e-5)    # 21.75+12.495+31.90303+4.73684
    score = contest_score('iesd2024', 0.935, 0.833, 4.88, 100)
    assert score == pytest.approx(expected, abs=1e-9)
    terms = contest_terms('iesd2024', 0.935, 0.833, 4.88, 100)
    assert terms == pytest.approx({'fbeta': 0.87, 'g': 0.833, 'latency_ms': 45.12 / 49.5,
                                   'size_kib': 900 / 950})
    assert normalised_contest_score('iesd2024', 0.935, 0.833, 4.88, 100) == \
        pytest.approx(expected / 80)


def test_tdc_winner_hand_computed():
    # Fbeta 0.972, 26.4 KiB, 1.75 ms; G is not a TDC-2022 term
    expected = 100 * 0.972 + 20 * (200 - 1.75) / 199 + 20 * (256 - 26.4) / 251
    assert expected == pytest.approx(135.41944, abs=1e-5)   # 97.2+19.92462+18.29482
    assert contest_score('tdc2022', 0.972, latency_ms=1.75, size_kib=26.4) == \
        pytest.approx(expected, abs=1e-9)
    assert contest_score('tdc2022', 0.972, 0.1, 1.75, 26.4) == pytest.approx(expected)
    assert set(contest_terms('tdc2022', 0.972, None, 1.75, 26.4)) == \
        {'fbeta', 'latency_ms', 'size_kib'}
    assert normalised_contest_score('tdc2022', 0.972, None, 1.75, 26.4) == \
        pytest.approx(expected / 140)


def test_contest_terms_clip_at_both_ends():
    best = contest_terms('iesd2024', 1.0, 1.0, 0.1, 10)
    assert best == {'fbeta': 1.0, 'g': 1.0, 'latency_ms': 1.0, 'size_kib': 1.0}
    assert contest_score('iesd2024', 1.0, 1.0, 0.5, 50) == pytest.approx(80)
    assert normalised_contest_score('iesd2024', 1.0, 1.0, 0.0, 0) == pytest.approx(1.0)
    worst = contest_terms('iesd2024', 0.3, 0.0, 120, 5000)
    assert worst == {'fbeta': 0.0, 'g': 0.0, 'latency_ms': 0.0, 'size_kib': 0.0}
    assert contest_score('iesd2024', 0.3, 0.0, 120, 5000) == 0.0
    assert contest_score('tdc2022', 0.0, None, 500, 300) == 0.0
    assert contest_score('tdc2022', 1.0, None, 0.5, 1) == pytest.approx(140)


def test_latency_scale_multiplies_measured_latency():
    scaled = contest_terms('iesd2024', 0.9, 0.8, 2.0, 100, latency_scale=10)
    assert scaled['latency_ms'] == pytest.approx((50 - 20) / 49.5)
    assert scaled == pytest.approx(contest_terms('iesd2024', 0.9, 0.8, 20.0, 100))
    assert contest_score('tdc2022', 0.9, None, 2.0, 30, latency_scale=0.5) == \
        pytest.approx(contest_score('tdc2022', 0.9, None, 1.0, 30))
    with pytest.raises(ValueError, match='latency_scale'):
        contest_score('iesd2024', 0.9, 0.8, 2.0, 100, latency_scale=0)


def test_contest_rejects_bad_input():
    with pytest.raises(ValueError, match='unknown contest'):
        contest_score('iesd2025', 0.9, 0.8, 2.0, 100)
    with pytest.raises(ValueError, match='g'):
        contest_score('iesd2024', 0.9, None, 2.0, 100)
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        contest_score('iesd2024', 93.5, 0.8, 2.0, 100)      # a percentage, not a share
    with pytest.raises(ValueError, match='negative'):
        contest_score('iesd2024', 0.9, 0.8, -1.0, 100)
    with pytest.raises(ValueError, match='finite'):
        contest_score('iesd2024', 0.9, 0.8, float('nan'), 100)


def test_module_imports_only_numpy_and_the_standard_library():
    import sys
    tree = ast.parse(Path(contest.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split('.')[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add((node.module or '').split('.')[0])
    assert roots - {'numpy'} <= set(sys.stdlib_module_names), roots
