"""Tests of public/core/settings.py: params.py loading, KEY=VALUE overrides, the rules table."""
import re

import pytest

from conftest import PARAMS
from public.core.settings import (SettingsError, load_settings, settings_dict, validate,
                                  write_settings)


@pytest.fixture(scope='module')
def defaults():
    return settings_dict(load_settings([], params_path=str(PARAMS)))


def test_shipped_params_load_and_run_the_demo():
    s = load_settings([], params_path=str(PARAMS))
    assert s.DATA_DIR == 'ttdata/train' and s.TEST_DIR == 'ttdata/test'
    assert s.INPUT_SIZE == 1250
    assert s.POSITIVE_LABELS == ('AFIB',)
    assert s.SELECT_ON == 'val'
    assert s.LR_MIN <= s.LR_MAX and s.STEP > 0
    assert s.PARAMS_PATH == str(PARAMS)


# Edge values the rules accept.
ACCEPTED = [
    ('INPUT_SIZE', 16), ('VAL_FRACTION', 0.01), ('VAL_FRACTION', 0.99),
    ('AVOID_PARAM', 0), ('AVOID_PARAM', 1), ('AVOID_PARAM', 1.0),
    ('STAGE1_TARGET', 0), ('STAGE1_TARGET', 100), ('BATCH_SIZE', 2), ('NUM_EPOCHS', 1),
    ('PATIENCE', 1), ('OVERFIT_GAP', 0), ('WEIGHT_DECAY', 0), ('SEED', 0), ('NUM_THREADS', 0),
    ('NUM_WORKERS', 0), ('PREFETCH_FACTOR', 1), ('ONNX_OPSET', 18), ('ONNX_OPSET', 23),
    ('LATENCY_RUNS', 1), ('METRIC_TARGET', 100), ('METRIC_TARGET', 0.001),
    ('SIZE_TARGET_KB', 0.001), ('SIZE_TARGET_KB', 60), ('CHANNEL_SCALES', (1,)),
    ('FC_SCALES', [1, 2]), ('STEP', 1e-6), ('LR_MIN', 1e-6), ('LEARNING_RATE', 1e-6),
    ('POSITIVE_LABELS', ('AFIB', 'AFL')), ('POSITIVE_LABELS', ['AFIB']), ('TEST_DIR', ''),
    ('DEVICE', 'auto'), ('DEVICE', 'cpu'), ('SELECT_ON', 'test'), ('RESUME', False),
    ('SKIP_BAD_FILES', True), ('QUANTIZE_INT8', False),
    ('DATA_FORMAT', 'csv'), ('PAD_TOLERANCE', 0), ('PAD_TOLERANCE', 1249), ('SHORTER', 'exclude'),
    ('LONGER', 'crop'), ('CLASSES', ()), ('CLASSES', (0, 1, 2, 3)), ('CLASSES', ['N', 'AF']),
    ('SELECT_METRIC', 'abs_sum'), ('SELECT_METRIC', 'auc'), ('MODELS', ()), ('MODELS', ('AFNet',)),
]


@pytest.mark.parametrize('name,value', ACCEPTED)
def test_edge_values_are_accepted(defaults, name, value):
    s = validate({**defaults, name: value})
    expected = tuple(value) if isinstance(value, list) else value
    assert getattr(s, name) == expected


# Values just past the edges (and wrong types): (name, value, rule in the message).
REJECTED = [
    ('INPUT_SIZE', 15, 'an int >= 16'), ('INPUT_SIZE', 1250.0, 'an int >= 16'),
    ('VAL_FRACTION', 0, r'a number in \(0, 1\)'), ('VAL_FRACTION', 1, r'a number in \(0, 1\)'),
    ('AVOID_PARAM', -0.01, r'a number in \[0, 1\]'), ('AVOID_PARAM', 1.01, r'a number in \[0, 1\]'),
    ('STAGE1_TARGET', -1, r'an int in \[0, 100\]'), ('STAGE1_TARGET', 101, r'an int in \[0, 100\]'),
    ('STAGE1_TARGET', 97.5, r'an int in \[0, 100\]'),
    ('BATCH_SIZE', 1, 'an int >= 2'), ('NUM_EPOCHS', 0, 'an int >= 1'),
    ('NUM_EPOCHS', True, 'an int >= 1'), ('PATIENCE', 0, 'an int >= 1'),
    ('OVERFIT_GAP', -0.01, 'a number >= 0'), ('WEIGHT_DECAY', -1e-3, 'a number >= 0'),
    ('SEED', -1, 'an int >= 0'), ('NUM_THREADS', -1, 'an int >= 0'),
    ('ONNX_OPSET', 17, r'an int in \[18, 23\]'), ('ONNX_OPSET', 24, r'an int in \[18, 23\]'),
    ('LATENCY_RUNS', 0, 'an int >= 1'),
    ('METRIC_TARGET', 0, r'a number in \(0, 100\]'), ('METRIC_TARGET', 100.5, r'a number in \(0, 100\]'),
    ('METRIC_TARGET', -5, r'a number in \(0, 100\]'),
    ('SIZE_TARGET_KB', 0, 'a number > 0'), ('SIZE_TARGET_KB', -1, 'a number > 0'),
    ('CHANNEL_SCALES', (), 'a non-empty list/tuple of ints >= 1'),
    ('CHANNEL_SCALES', (0, 1), 'a non-empty list/tuple of ints >= 1'),
    ('CHANNEL_SCALES', (1.5,), 'a non-empty list/tuple of ints >= 1'),
    ('FC_SCALES', (), 'a non-empty list/tuple of ints >= 1'),
    ('STEP', 0, 'a number > 0'), ('STEP', -0.0005, 'a number > 0'),
    ('STEP', float('nan'), 'a number > 0'), ('LR_MIN', 0, 'a number > 0'),
    ('LR_MAX', float('inf'), 'a number > 0'), ('LEARNING_RATE', 0, 'a number > 0'),
    ('DEVICE', 'gpu', "one of 'auto', 'cpu', 'cuda'"), ('SELECT_ON', 'train', "one of 'val', 'test'"),
    ('POSITIVE_LABELS', (), 'a non-empty list/tuple'), ('POSITIVE_LABELS', 'AFIB', 'a non-empty list/tuple'),
    ('DATA_DIR', '', 'a non-empty path string'), ('CACHE_DIR', None, 'a non-empty path string'),
    ('RESUME', 1, 'True or False'), ('SKIP_BAD_FILES', 'yes', 'True or False'),
    ('DATA_FORMAT', 'xml', "one of 'auto', 'txt', 'csv', 'numpy'"),
    ('PAD_TOLERANCE', -1, 'an int >= 0'), ('SHORTER', 'pad', "one of 'error', 'exclude'"),
    ('LONGER', 'trim', "one of 'error', 'crop'"),
    ('CLASSES', (1,), 'a list/tuple of distinct class names'),
    ('CLASSES', ('a', 'a'), 'a list/tuple of distinct class names'),
    ('CLASSES', (0, '0'), 'a list/tuple of distinct class names'),
    ('CLASSES', (True, False), 'a list/tuple of distinct class names'),
    ('SELECT_METRIC', 'roc', "one of 'min4', 'f1', 'accuracy', 'auc', 'abs_sum'"),
    ('MODELS', 'AFNet', 'a list/tuple of registered model names'),
]


@pytest.mark.parametrize('name,value,rule', REJECTED)
def test_values_past_the_edge_are_rejected_naming_setting_rule_and_value(defaults, name, value, rule):
    with pytest.raises(SettingsError, match=rf"^params\.py: {name} must be {rule}.*, "
                                            rf"got {re.escape(f'{name}={value!r}')}$"):
        validate({**defaults, name: value})


def test_step_zero_message_is_exact():
    with pytest.raises(SettingsError) as info:
        load_settings(['STEP=0'], params_path=str(PARAMS))
    assert str(info.value) == 'command line: STEP must be a number > 0, got STEP=0'


def test_lr_min_above_lr_max_is_rejected_and_equal_is_accepted():
    s = load_settings(['LR_MIN=0.002', 'LR_MAX=0.002'], params_path=str(PARAMS))
    assert s.LR_MIN == s.LR_MAX == 0.002
    with pytest.raises(SettingsError, match=r'LR_MIN must be <= LR_MAX, got LR_MIN=0\.0021 '
                                            r'and LR_MAX=0\.002'):
        load_settings(['LR_MIN=0.0021', 'LR_MAX=0.002'], params_path=str(PARAMS))


@pytest.mark.parametrize('overrides,message', [
    (['PAD_TOLERANCE=1250'], r'PAD_TOLERANCE must be < INPUT_SIZE, got PAD_TOLERANCE=1250 and '
                             r'INPUT_SIZE=1250'),
    (["SELECT_METRIC='auc'", 'CLASSES=(0, 1, 2)'], r"SELECT_METRIC='auc' is for binary and multi-label"),
])
def test_settings_that_contradict_each_other_are_rejected(overrides, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(overrides, params_path=str(PARAMS))


def test_select_on_test_needs_a_test_folder():
    with pytest.raises(SettingsError, match=r"SELECT_ON='test' needs a test set, got TEST_DIR=''"):
        load_settings(["SELECT_ON='test'", "TEST_DIR=''"], params_path=str(PARAMS))


@pytest.mark.parametrize('override', ['CHANNEL_SCALES=(1, 2, 1)', 'FC_SCALES=[3, 3]'])
def test_repeated_scales_are_rejected(override):
    with pytest.raises(SettingsError, match='must not repeat a value'):
        load_settings([override], params_path=str(PARAMS))


@pytest.mark.parametrize('args,setting,hint', [
    (['NUM_EPOCH=3'], 'NUM_EPOCH', 'NUM_EPOCHS'),
    (['--LR_MAXX=0.01'], 'LR_MAXX', 'LR_MAX'),
    (['ZZZ_QQQ=1'], 'ZZZ_QQQ', None),
])
def test_unknown_override_is_rejected_with_did_you_mean(args, setting, hint):
    with pytest.raises(SettingsError) as info:
        load_settings(args, params_path=str(PARAMS))
    message = str(info.value)
    assert message.startswith(f'command line: unknown setting {setting}')
    if hint:
        assert f'(did you mean {hint}?)' in message
    else:
        assert 'did you mean' not in message
    assert 'known settings:' in message and 'NUM_EPOCHS' in message


def test_unknown_setting_in_params_file_is_rejected(tmp_path):
    path = tmp_path / 'params.py'
    path.write_text(PARAMS.read_text() + '\nBATCH_SIZ = 64\n')
    with pytest.raises(SettingsError, match=r'^params\.py: unknown setting BATCH_SIZ '
                                            r'\(did you mean BATCH_SIZE\?\)'):
        load_settings([], params_path=str(path))


def test_overrides_are_typed_python_literals():
    s = load_settings(['NUM_EPOCHS=3', 'SELECT_ON=test', "TEST_DIR='ttdata/test'",
                       'CHANNEL_SCALES=(1,2)', 'RESUME=False', 'METRIC_TARGET=95.5'],
                      params_path=str(PARAMS))
    assert (s.NUM_EPOCHS, s.SELECT_ON, s.CHANNEL_SCALES, s.RESUME, s.METRIC_TARGET) == \
        (3, 'test', (1, 2), False, 95.5)
    assert s.OVERRIDES['NUM_EPOCHS'] == 3


@pytest.mark.parametrize('override,rule', [
    ('NUM_EPOCHS=2.5', 'an int >= 1'),
    ('NUM_EPOCHS=True', 'an int >= 1'),
    ('LR_MIN=abc', 'a number > 0'),
    ('RESUME=yes', 'True or False'),
])
def test_override_of_the_wrong_type_is_rejected(override, rule):
    name = override.split('=')[0]
    with pytest.raises(SettingsError, match=f'{name} must be {rule}'):
        load_settings([override], params_path=str(PARAMS))


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(SettingsError, match=r"command line: expected KEY=VALUE \(a setting of params.py, e.g. NUM_EPOCHS=30\), got 'NUM_EPOCHS'"):
        load_settings(['NUM_EPOCHS'], params_path=str(PARAMS))


def _params_with_old_spelling(tmp_path, value='0.004'):
    text = PARAMS.read_text()
    assert re.search(r'^LEARNING_RATE\s*=', text, re.M)
    path = tmp_path / 'params.py'
    path.write_text(re.sub(r'^LEARNING_RATE\s*=\s*[^#\n]*', f'LEARING_RATE = {value} ', text,
                           flags=re.M))
    return path


def test_original_spelling_learing_rate_is_accepted(tmp_path):
    s = load_settings([], params_path=str(_params_with_old_spelling(tmp_path)))
    assert s.LEARNING_RATE == 0.004
    assert not hasattr(s, 'LEARING_RATE')
    s = load_settings(['LEARING_RATE=0.005'], params_path=str(PARAMS))
    assert s.LEARNING_RATE == 0.005


def test_both_spellings_with_different_values_in_one_file_are_rejected(tmp_path):
    path = tmp_path / 'params.py'
    path.write_text(PARAMS.read_text() + '\nLEARING_RATE = 0.009\n')
    with pytest.raises(SettingsError, match='both LEARNING_RATE=.* and LEARING_RATE=0.009 are set'):
        load_settings([], params_path=str(path))


def test_override_of_learning_rate_wins_over_old_spelling_in_file(tmp_path):
    s = load_settings(['LEARNING_RATE=0.006'], params_path=str(_params_with_old_spelling(tmp_path)))
    assert s.LEARNING_RATE == 0.006


def test_missing_setting_is_named(tmp_path):
    path = tmp_path / 'params.py'
    path.write_text(re.sub(r'^NUM_EPOCHS\s*=.*$', '', PARAMS.read_text(), flags=re.M))
    with pytest.raises(SettingsError, match=r'missing setting\(s\) NUM_EPOCHS'):
        load_settings([], params_path=str(path))


def test_params_file_that_does_not_execute_is_named(tmp_path):
    path = tmp_path / 'params.py'
    path.write_text(PARAMS.read_text() + '\nNUM_EPOCHS = = 3\n')
    with pytest.raises(SettingsError, match=r'params\.py: cannot be executed: SyntaxError'):
        load_settings([], params_path=str(path))


def test_params_path_errors(tmp_path):
    with pytest.raises(SettingsError, match='--params needs a path'):
        load_settings(['--params'])
    with pytest.raises(SettingsError, match='settings file not found'):
        load_settings(['--params', str(tmp_path / 'nope.py')])


def test_written_settings_load_back_identically(tmp_path):
    s = load_settings(['NUM_EPOCHS=7', 'CHANNEL_SCALES=(2, 3)', "SELECT_ON='test'"],
                      params_path=str(PARAMS))
    path = tmp_path / 'params_used.py'
    write_settings(s, path)
    again = load_settings([], params_path=str(path))
    assert settings_dict(again) == settings_dict(s)
