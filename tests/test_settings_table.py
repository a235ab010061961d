"""The one settings table (public/core/settings.py SETTINGS): params.py and
docs/settings.md are written from it and must match it; --help lists every setting."""
import os

import pytest

from conftest import PARAMS, ROOT
from public.cli import usage
from public.core.settings import (SETTINGS, SettingsError, load_settings, params_text,
                                  parse_overrides, settings_markdown, validate)


def test_the_shipped_params_py_is_the_tables_defaults():
    assert PARAMS.read_text() == params_text(), \
        'params.py is out of date: run python tools/write_settings_docs.py'


def test_docs_settings_md_is_written_from_the_table():
    assert (ROOT / 'docs' / 'settings.md').read_text() == settings_markdown(), \
        'docs/settings.md is out of date: run python tools/write_settings_docs.py'


def test_every_default_obeys_its_rule_and_validates():
    for s in SETTINGS.values():
        assert s.check(s.default), f"{s.name}: default {s.default!r} breaks '{s.rule}'"
        assert s.doc and s.section and s.rule
    settings = validate({s.name: s.default for s in SETTINGS.values()})
    assert settings.NUM_EPOCHS == SETTINGS['NUM_EPOCHS'].default


def test_help_lists_every_setting_with_its_current_value_and_doc(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    text = usage('train_multi.py', ['NUM_EPOCHS=7'])
    for s in SETTINGS.values():
        assert f"  {s.name} = " in text and s.doc[:40] in text
    assert 'NUM_EPOCHS = 7  (changed; default 30)' in text
    assert '--report' in text and '"MODELS=(\'SepNet\',)"' in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_help_answers_even_when_the_settings_do_not_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                      # no params.py here
    text = usage('train_final.py')
    assert 'defaults (the settings do not load' in text and 'SIZE_TARGET_KB = 60' in text


@pytest.mark.parametrize('arg, hint', [('--epochs', 'NUM_EPOCHS=30'), ('--seed', 'SEED=42')])
def test_an_option_instead_of_a_setting_names_the_setting(arg, hint):
    with pytest.raises(SettingsError, match=f"expected KEY=VALUE .*e.g. {hint}.*--help"):
        parse_overrides([arg, '3'])


def test_load_settings_from_the_shipped_params(monkeypatch):
    monkeypatch.chdir(ROOT)
    settings = load_settings([])
    assert {n: getattr(settings, n) for n in SETTINGS} == \
        {n: (tuple(s.default) if isinstance(s.default, list) else s.default)
         for n, s in SETTINGS.items()}
    assert os.path.basename(settings.PARAMS_PATH) == 'params.py'
