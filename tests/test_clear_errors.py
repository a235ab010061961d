"""Bad input gets a clear error and loses nothing (issue 15): a full results disk, a
symbolic link that loops in the data folder, a public/model.py or public/ss_model.py that
does not import, a model name registered twice, an odd label or a copied file's index in
a file name, and settings given on the command line named as such.

Each error is checked where a user meets it: `python train_multi.py ...` (or
train_final.py) in a subprocess, on real files in tmp_path (a copy of the project where a
test breaks one of its files), with exit status 2, one `error: ...` line naming the file or
setting, the value and the rule, and no traceback. The quick failures run side by side
(one module fixture), so the file stays well under a minute on 2 cores.
"""
import concurrent.futures as futures
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import PARAMS, ROOT, settings_values, write_params
from public.core import atomic
from public.results import store
from public.cli import clear_message
from public.core.settings import load_settings
from public.dataset import load_folder, with_label_lines
from public.core.errors import DiskFullError, ModelFileError, SettingsError
from public.data.prepare import prepare_data

FAST = ['WORKERS=1', 'NUM_EPOCHS=1', 'LR_MIN=0.003', 'LR_MAX=0.003', 'LATENCY_RUNS=2',
        "MODELS=('AFNet',)", 'AVOID_PARAM=0.0']


def _env():
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    env.pop('CUDA_VISIBLE_DEVICES', None)
    return env


def _run(script, cwd, *args, timeout=180):
    """python <script> --params <cwd>/params.py ARGS in cwd -> (rc, stdout + stderr)."""
    proc = subprocess.run([sys.executable, str(script), '--params', str(Path(cwd) / 'params.py'),
                           *args], cwd=str(cwd), capture_output=True, text=True,
                          timeout=timeout, env=_env())
    return proc.returncode, proc.stdout + proc.stderr


def _error_line(out):
    lines = [line for line in out.splitlines() if line.startswith('error: ')]
    assert len(lines) == 1, out
    return lines[0]


def _assert_clear(rc, out):
    assert rc == 2, out
    assert 'Traceback' not in out, out
    return _error_line(out)


def _project(folder, data, **overrides):
    """A copy of the project (scripts, public/, params.py with small, fast settings and
    every output inside folder), for a test that breaks one of its files."""
    folder = Path(folder)
    shutil.copytree(ROOT / 'public', folder / 'public',
                    ignore=shutil.ignore_patterns('__pycache__'))
    for script in ('train_multi.py', 'train_final.py'):
        shutil.copy(ROOT / script, folder / script)
    write_params(folder, **settings_values(folder, data, **overrides))
    return folder


def _data_copy(folder, data):
    return Path(shutil.copytree(data.train, Path(folder) / 'train'))


# ----------------------------------------------------------------------------- quick failures

def _case_model_syntax(folder, data):
    project = _project(folder, data)
    path = project / 'public' / 'model.py'
    path.write_text(path.read_text().replace('class ShuffleNetV2(nn.Module):',
                                             'class ShuffleNetV2(nn.Module)'))
    return project / 'train_multi.py', project, []


def _case_model_raises(folder, data):
    project = _project(folder, data)
    path = project / 'public' / 'model.py'
    path.write_text(path.read_text().replace('def _channel_shuffle(',
                                             'SCALE = 1 / 0\n\n\ndef _channel_shuffle(', 1))
    return project / 'train_multi.py', project, []


def _case_duplicate_model(folder, data):
    project = _project(folder, data)
    with open(project / 'public' / 'model.py', 'a') as f:
        f.write('\n\n@register_model\nclass AFNet(nn.Module):\n    pass\n')
    return project / 'train_multi.py', project, []


def _case_ss_model_syntax(folder, data):
    project = _project(folder, data)
    with open(project / 'public' / 'ss_model.py', 'a') as f:
        f.write('\nWIDTHS = (1, 2\n')
    return project / 'train_final.py', project, []


IMPORT_LINE = 'from public.models.budget import BudgetNet, budget_config'


def _case_ss_model_import_error(folder, data):
    project = _project(folder, data)
    path = project / 'public' / 'ss_model.py'
    text = path.read_text()
    assert IMPORT_LINE in text, 'the default public/ss_model.py imports budget_config'
    path.write_text(text.replace(IMPORT_LINE, IMPORT_LINE.replace('budget_config', 'budget_confg')))
    return project / 'train_final.py', project, []


def _case_symlink_loop(folder, data):
    train = _data_copy(folder, data)
    os.symlink('loop', train / 'loop')
    write_params(folder, **settings_values(Path(folder), data, DATA_DIR=str(train)))
    return ROOT / 'train_multi.py', folder, FAST


def _case_copied_index(folder, data):
    train = _data_copy(folder, data)
    first = sorted(os.listdir(train))[0]
    shutil.copy(train / first, train / first.replace('.txt', ' copy.txt'))
    write_params(folder, **settings_values(Path(folder), data, DATA_DIR=str(train)))
    return ROOT / 'train_multi.py', folder, FAST


def _case_lr_cross_check(folder, data):
    write_params(folder, **settings_values(Path(folder), data))
    return ROOT / 'train_multi.py', folder, ['LR_MIN=0.01', 'LR_MAX=0.001']


def _case_unknown_model(folder, data):
    write_params(folder, **settings_values(Path(folder), data))
    return ROOT / 'train_multi.py', folder, ["MODELS=('NoSuchNet',)"]


QUICK = {name[len('_case_'):]: fn for name, fn in globals().items() if name.startswith('_case_')}


def _mount_small_disk(folder):
    """A 600 KB tmpfs at folder, filled up to 64 KB free; None, or why it cannot be made."""
    folder.mkdir()
    try:
        proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=600k', 'tmpfs', str(folder)],
                              capture_output=True, text=True, timeout=30)
    except OSError as exc:
        return f"cannot mount a small tmpfs to fill ({exc})"
    if proc.returncode != 0:
        return f"cannot mount a small tmpfs to fill: {proc.stderr.strip() or proc.returncode}"
    st = os.statvfs(folder)
    with open(folder / 'filler', 'wb') as f:
        f.write(b'\0' * (st.f_bavail * st.f_frsize - 64 * 1024))
    return None


def _case_full_results_disk(folder, data):
    save = folder / 'disk' / 'multi-result'
    write_params(folder, **settings_values(folder, data, MODEL_SAVE_PATH=str(save)))
    return ROOT / 'train_multi.py', folder, FAST


def _case_full_temp_disk(folder, data):
    temp = folder / 'disk' / 'temp'
    write_params(folder, **settings_values(folder, data, TEMP_DIR=str(temp)))
    return ROOT / 'train_multi.py', folder, FAST + ['LR_MAX=0.004']


DISK = {'full_results_disk': _case_full_results_disk, 'full_temp_disk': _case_full_temp_disk}


@pytest.fixture(scope='module')
def quick(tmp_path_factory, small_data):
    """{case: (rc, output, folder)} of every failing run, two at a time (the two full-disk
    runs first: they train); a full-disk case is (None, why, folder) where no small disk
    can be mounted. The small disks are unmounted afterwards."""
    prepared, mounted, runs = {}, [], {}
    try:
        for name, build in {**DISK, **QUICK}.items():
            folder = tmp_path_factory.mktemp(name)
            if name in DISK:
                why = _mount_small_disk(folder / 'disk')
                if why:
                    runs[name] = (None, why, folder)
                    continue
                mounted.append(folder / 'disk')
            prepared[name] = (build(folder, small_data), folder)
        with futures.ThreadPoolExecutor(2) as pool:
            jobs = {name: pool.submit(_run, script, cwd, *args)
                    for name, ((script, cwd, args), _) in prepared.items()}
            runs.update({name: (*job.result(), prepared[name][1]) for name, job in jobs.items()})
        yield runs
    finally:
        for disk in mounted:
            subprocess.run(['umount', '-l', str(disk)], capture_output=True, timeout=30)


def test_a_model_file_with_a_syntax_error_names_its_file_line_and_source(quick):
    rc, out, folder = quick['model_syntax']
    line = _assert_clear(rc, out)
    assert line.startswith("error: public/model.py, line ")
    assert "SyntaxError: expected ':'; the file cannot be imported" in line
    assert '    class ShuffleNetV2(nn.Module)' in out.splitlines()      # the offending line
    assert not (folder / 'multi-result').exists()                      # nothing was written


def test_a_model_file_that_raises_at_import_names_its_file_line_and_source(quick):
    rc, out, folder = quick['model_raises']
    line = _assert_clear(rc, out)
    assert line.startswith('error: public/model.py, line ')
    assert 'ZeroDivisionError: division by zero; the file cannot be imported' in line
    assert '    SCALE = 1 / 0' in out.splitlines()
    number = int(line.split(', line ')[1].split(':')[0])
    assert (folder / 'public' / 'model.py').read_text().splitlines()[number - 1] == \
        'SCALE = 1 / 0'


def test_a_duplicate_model_name_names_both_definitions(quick):
    rc, out, folder = quick['duplicate_model']
    line = _assert_clear(rc, out)
    source = (folder / 'public' / 'model.py').read_text().splitlines()
    lines = [i + 1 for i, text in enumerate(source) if text.startswith('class AFNet(')]
    assert len(lines) == 2
    assert line == (f"error: public/model.py, line {lines[1]}: model name 'AFNet' is already "
                    f"registered (by public/model.py, line {lines[0]}, public.model.AFNet); "
                    f"model names must be unique: rename one of the two classes")


def test_a_stage_two_model_file_with_a_syntax_error_is_named(quick):
    rc, out, folder = quick['ss_model_syntax']
    line = _assert_clear(rc, out)
    assert line.startswith('error: public/ss_model.py, line ')
    assert "SyntaxError: '(' was never closed; the file cannot be imported" in line
    assert '    WIDTHS = (1, 2' in out.splitlines()
    assert not (folder / 'temp').exists()


def test_a_stage_two_model_file_whose_import_fails_is_named(quick):
    rc, out, _ = quick['ss_model_import_error']
    line = _assert_clear(rc, out)
    lines = (ROOT / 'public' / 'ss_model.py').read_text().splitlines()
    number = lines.index(IMPORT_LINE) + 1
    assert line.startswith(f'error: public/ss_model.py, line {number}: ImportError: cannot '
                           "import name 'budget_confg' from 'public.models.budget'")
    assert '    from public.models.budget import BudgetNet, budget_confg' in out.splitlines()


def test_a_symbolic_link_that_loops_in_the_data_folder_is_rejected_by_name(quick):
    rc, out, folder = quick['symlink_loop']
    line = _assert_clear(rc, out)
    assert line.startswith(f"error: {folder / 'train' / 'loop'}: is a symbolic link that loops "
                           f"(Too many levels of symbolic links")
    assert 'remove or fix the link (or set SKIP_BAD_FILES=True to skip it)' in line


def test_a_copied_file_with_a_non_integer_index_is_rejected_by_name(quick):
    rc, out, folder = quick['copied_index']
    line = _assert_clear(rc, out)
    copy = next(n for n in os.listdir(folder / 'train') if n.endswith(' copy.txt'))
    assert line.startswith(f"error: {folder / 'train' / copy}: file name does not follow the "
                           f"pattern S<subject>-<RHYTHM>-<index>.txt")
    assert f"its <index> must be letters, digits or _ only (e.g. 31), got index " \
           f"'{copy.split('-')[-1][:-4]}'; it looks like a copy made by a file manager" in line


def test_a_cross_check_of_command_line_settings_says_command_line(quick):
    rc, out, _ = quick['lr_cross_check']
    line = _assert_clear(rc, out)
    assert line == ('error: command line: LR_MIN must be <= LR_MAX, got LR_MIN=0.01 and '
                    'LR_MAX=0.001')


def test_an_unknown_model_given_on_the_command_line_says_command_line(quick):
    rc, out, _ = quick['unknown_model']
    line = _assert_clear(rc, out)
    assert line.startswith("error: command line: MODELS=('NoSuchNet',): unknown model "
                           "'NoSuchNet'; registered models: AFNet,")


# ----------------------------------------------------------------------------- settings' source

@pytest.mark.parametrize('args,message', [
    (['LR_MIN=0.01'], r"^command line \(LR_MIN\) and params\.py \(LR_MAX\): LR_MIN must be "
                      r"<= LR_MAX, got LR_MIN=0\.01 and LR_MAX=0\.005$"),
    (['PAD_TOLERANCE=1250'], r"^command line \(PAD_TOLERANCE\) and params\.py \(INPUT_SIZE\): "
                             r"PAD_TOLERANCE must be < INPUT_SIZE"),
    (["SELECT_ON='test'", "TEST_DIR=''"], r"^command line: SELECT_ON='test' needs a test set"),
    (['STEP=1e-9'], r"^command line \(STEP\) and params\.py \(LR_MIN, LR_MAX\): the "
                    r"learning-rate grid"),
])
def test_cross_checks_name_the_command_line_for_its_settings(args, message):
    with pytest.raises(SettingsError, match=message):
        load_settings(args, params_path=str(PARAMS))


def test_cross_checks_of_the_params_file_name_the_params_file(tmp_path):
    path = tmp_path / 'my_params.py'
    path.write_text(PARAMS.read_text() + '\nLR_MIN = 0.01\n')
    with pytest.raises(SettingsError, match=r'^my_params\.py: LR_MIN must be <= LR_MAX'):
        load_settings([], params_path=str(path))


# ----------------------------------------------------------------------------- labels, names

def test_the_data_summary_lists_every_label_with_its_count_and_class(tmp_path, small_data):
    train = _data_copy(tmp_path, small_data)
    first = sorted(n for n in os.listdir(train) if '-AFIB-' in n)[0]
    odd = first.replace('-AFIB-', '-AFİB<b>-')
    shutil.copy(train / first, train / odd)
    values = settings_values(tmp_path, small_data, DATA_DIR=str(train), TEST_DIR='')
    settings = load_settings([f"{k}={v!r}" for k, v in values.items()], params_path=str(PARAMS))
    summary = with_label_lines(prepare_data(settings, progress=False).summary, settings)
    lines = summary.splitlines()
    afib = sum('-AFIB-' in n for n in os.listdir(train))
    normal = sum('-N-' in n for n in os.listdir(train))
    assert f"labels of {train} (label: segments -> class (1 = POSITIVE_LABELS=('AFIB',))): " \
           f"'AFIB' {afib} -> 1, 'AFİB<b>' 1 -> 0, 'N' {normal} -> 0" in lines
    assert (f"warning: {train}: label 'AFİB<b>' (1 segment(s), first {odd}) has character(s) "
            f"'<', '>', 'İ' outside [A-Za-z0-9_+() ]; it is labelled class 0; check its file "
            f"name(s) or label(s)") in lines
    assert lines[-1] == 'device: cpu'


def test_skip_bad_files_skips_a_copied_file_and_a_looping_link_with_a_warning(tmp_path,
                                                                              small_data):
    train = _data_copy(tmp_path, small_data)
    count = len(os.listdir(train))
    first = sorted(os.listdir(train))[0]
    shutil.copy(train / first, train / first.replace('.txt', ' (1).txt'))
    os.symlink(train / 'b', train / 'a')
    os.symlink(train / 'a', train / 'b')
    segments = load_folder(str(train), 1250, skip_bad=True, progress=False)
    assert len(segments) == count
    reasons = dict(segments.skipped)
    assert sorted(reasons) == sorted(['a', 'b', first.replace('.txt', ' (1).txt')])
    assert reasons['a'].startswith(f"{train / 'a'}: is a symbolic link that loops")
    assert "got index '" in reasons[first.replace('.txt', ' (1).txt')]


# ----------------------------------------------------------------------------- full disks

def _leftovers(folder):
    return [os.path.join(root, n) for root, dirs, files in os.walk(folder)
            for n in dirs + files if '.atml-tmp' in n or n.endswith('.tmp')]


def _disk_run(quick, name):
    rc, out, folder = quick[name]
    if rc is None:
        pytest.skip(out)
    return rc, out, folder


def test_a_full_results_disk_is_a_clear_error_and_a_rerun_finishes(quick):
    rc, out, folder = _disk_run(quick, 'full_results_disk')
    save = folder / 'disk' / 'multi-result'
    line = _assert_clear(rc, out)
    assert line.startswith(f"error: {save}/.store/")
    # torch.save's short write ('unexpected pos', no errno), or an OSError ENOSPC
    assert f"(in MODEL_SAVE_PATH='{save}'): the disk is full (" in line
    assert ('(a write came up short: torch could not write the whole file)' in line
            or '(No space left on device)' in line)
    assert ' bytes free there; about ' in line and ' bytes needed for this write' in line
    assert 'The half-written files were removed and finished work is kept' in line
    assert _leftovers(save) == []
    rows = (save / 'results.csv').read_text().splitlines() if (save / 'results.csv').exists() \
        else []
    assert len(rows) <= 1                       # a header at most: the trial was not recorded
    os.remove(folder / 'disk' / 'filler')       # room again: the same command finishes
    rc, out = _run(ROOT / 'train_multi.py', folder, *FAST)
    assert rc == 0, out
    assert len((save / 'results.csv').read_text().splitlines()) == 2
    best = save / 'AFNet' / next(n for n in os.listdir(save / 'AFNet') if not n.startswith('.'))
    assert os.path.isfile(best / 'saved.pth') and os.path.isfile(best / 'saved.onnx')


def test_a_trial_failing_on_a_full_temp_dir_stops_the_search(quick):
    rc, out, folder = _disk_run(quick, 'full_temp_disk')
    temp = folder / 'disk' / 'temp'
    line = _assert_clear(rc, out)
    assert line.startswith(f"error: TEMP_DIR='{temp}': the disk is full (No space left on "
                           f"device; trial AFNet lr=0.003 failed with: ")
    rows = (folder / 'multi-result' / 'results.csv').read_text().splitlines()
    assert len(rows) == 2 and ',failed,' in rows[1]     # stopped at the first such trial
    assert not [n for n in os.listdir(temp) if n.startswith('.atml-scratch')]   # removed


def _failing_open(fail_after=0):
    """open() whose file's write raises ENOSPC (the file is created, as a real one is)."""
    def fake_open(path, mode='r', *args, **kwargs):
        real = open(path, mode, *args, **kwargs)

        class Full:
            def write(self, data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            def __getattr__(self, name):
                return getattr(real, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()
        return Full()
    return fake_open


def test_write_atomic_on_a_full_disk_removes_its_temp_file_and_keeps_the_old(tmp_path,
                                                                            monkeypatch):
    path = tmp_path / 'summary.csv'
    path.write_text('old\n')
    monkeypatch.setattr(atomic, 'open', _failing_open(), raising=False)
    with pytest.raises(DiskFullError) as info:
        atomic.write_atomic(str(path), 'new text\n')
    assert os.listdir(tmp_path) == ['summary.csv'] and path.read_text() == 'old\n'
    assert str(info.value).startswith(f"{tmp_path}: the disk is full (No space left on device)")
    assert 'about 9 bytes needed' in str(info.value)


def test_replace_folder_on_a_full_disk_removes_its_temp_folder_and_names_the_folder(tmp_path):
    def build(folder):
        with open(os.path.join(folder, 'saved.pth'), 'wb') as f:
            f.write(b'x' * 100)
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
    (tmp_path / 'AFNet').mkdir()
    with pytest.raises(DiskFullError) as info:
        atomic.replace_folder(str(tmp_path / 'AFNet'), '0.003', build)
    assert os.listdir(tmp_path / 'AFNet') == []
    assert str(info.value).startswith(f"{tmp_path / 'AFNet' / '0.003'}: the disk is full "
                                      f"(a write came up short")


def test_check_writable_on_a_full_disk_names_the_setting(tmp_path, monkeypatch):
    monkeypatch.setattr(store, 'open', _failing_open(), raising=False)
    with pytest.raises(DiskFullError, match=rf"^TEMP_DIR='{tmp_path}': the disk is full"):
        store.check_writable(str(tmp_path), 'TEMP_DIR')
    assert os.listdir(tmp_path) == []


def test_the_cli_turns_a_disk_full_cause_into_one_line_naming_the_setting(tmp_path):
    settings = load_settings([f"MODEL_SAVE_PATH={str(tmp_path / 'mr')!r}"],
                             params_path=str(PARAMS))
    oserror = OSError(errno.ENOSPC, 'No space left on device', str(tmp_path / 'mr' / 'x.csv'))
    assert clear_message(oserror, settings).startswith(
        f"MODEL_SAVE_PATH='{tmp_path / 'mr'}': the disk is full (No space left on device)")
    wrapped = SettingsError('public/ss_model.py: generate_config(...) does not build')
    wrapped.__cause__ = oserror                 # a stage's own message over a full disk
    assert clear_message(wrapped, settings).startswith(f"MODEL_SAVE_PATH='{tmp_path / 'mr'}'")
    assert clear_message(ValueError('a bug'), settings) is None       # a traceback, as before
    assert clear_message(ModelFileError('public/model.py, line 3: ...')) == \
        'public/model.py, line 3: ...'
