"""Tests of predict.py: probabilities CSV from an exported model over every data format.

The models are untrained seed models exported with public.compress.export.export_onnx, a small
HeartbeatCNN (1 lead x 205 samples, 4 classes) and an SEResNet1d (8 leads x 5000), and, for
--snap, a fake whose logits follow the signal's mean, so that its probabilities range from
confident to undecided. One end-to-end run goes through a subprocess; the other cases call
predict.main().
"""
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import predict
import public
from conftest import ROOT
from public.compress.export import export_onnx
from test_formats import tianchi_data, write_lead_folder, write_tianchi




@pytest.fixture(scope='module')
def heartbeat(seed_models, tmp_path_factory):
    """A 4-class HeartbeatCNN exported to ONNX, a labelled and an unlabelled Tianchi CSV."""
    root = tmp_path_factory.mktemp('predict-heartbeat')
    torch.manual_seed(0)
    model = seed_models.HeartbeatCNN(input_size=205, in_channels=1, num_classes=4,
                                     fc_hidden=64).eval()
    export_onnx(model, str(root / 'model.onnx'), in_channels=1, input_size=205, opset=18)
    signals, labels = tianchi_data(n=40, seed=3)
    write_tianchi(root / 'train.csv', signals, labels)
    test_signals, _ = tianchi_data(n=17, seed=4)
    write_tianchi(root / 'testA.csv', test_signals, ids=range(100000, 100017))
    return root, model, test_signals


def _run(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / 'predict.py'), *map(str, args)],
                          cwd=str(cwd), capture_output=True, text=True, timeout=120)


def test_predict_csv_end_to_end(heartbeat, tmp_path):
    root, model, test_signals = heartbeat
    out = tmp_path / 'predictions.csv'
    proc = _run(root / 'model.onnx', root / 'testA.csv', '--out', out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote 17 rows (4 classes) to {out}" in proc.stdout
    table = pd.read_csv(out)
    assert list(table.columns) == ['id', 'label_0', 'label_1', 'label_2', 'label_3', 'label']
    assert table['id'].tolist() == list(range(100000, 100017))
    probabilities = _probabilities(table)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-3)   # 4 decimals
    assert all(len(f"{p:.10f}".rstrip('0').split('.')[1]) <= 4 for p in probabilities.ravel())
    assert table['label'].tolist() == probabilities.argmax(axis=1).tolist()
    assert 'metrics on' not in proc.stdout                       # testA.csv has no labels
    with torch.no_grad():
        logits = model(torch.from_numpy(test_signals)[:, None, :, None])
    np.testing.assert_allclose(probabilities, torch.softmax(logits, 1).numpy(), atol=2e-4)


def _probabilities(table):
    """The probability columns of a predictions CSV (id first, the predicted label last)."""
    return table.drop(columns=['id', 'label']).to_numpy()


class MeanLogits(nn.Module):
    """Logits = mean of the signal x (8, 0, -8, 0): confident for means near +-1, even at 0."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([8.0, 0.0, -8.0, 0.0]))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.weight


def test_snap_gives_zero_one_or_middle_values(heartbeat, tmp_path):
    root, _, _ = heartbeat
    export_onnx(MeanLogits(), str(tmp_path / 'mean.onnx'), in_channels=1, input_size=205, opset=18)
    means = np.linspace(-1, 1, 21)
    signals = (means[:, None] + 0.01 * np.random.default_rng(5).standard_normal((21, 205)))
    write_tianchi(tmp_path / 'means.csv', signals, labels=np.arange(21) % 4)
    plain, snapped = tmp_path / 'plain.csv', tmp_path / 'snapped.csv'
    for out, extra in ((plain, []), (snapped, ['--snap'])):
        assert predict.main([str(tmp_path / 'mean.onnx'), str(tmp_path / 'means.csv'),
                             '--out', str(out), *extra]) == 0
    values = _probabilities(pd.read_csv(snapped))
    assert len(values) == 21
    assert np.all((values == 0) | (values == 1) | ((values >= 0.1) & (values <= 0.9)))
    assert (values == 0).any() and (values == 1).any() and ((values > 0) & (values < 1)).any()
    unsnapped = _probabilities(pd.read_csv(plain))
    np.testing.assert_array_equal(values, predict.snap(unsnapped))
    assert values[0].tolist() == [0, 0, 1, 0] and values[-1].tolist() == [1, 0, 0, 0]
    np.testing.assert_allclose(unsnapped[10], 0.25, atol=0.02)        # mean 0: undecided


@pytest.mark.parametrize('p, snapped', [(0.0, 0.0), (0.0999, 0.0), (0.1, 0.1), (0.5, 0.5),
                                        (0.9, 0.9), (0.9001, 1.0), (1.0, 1.0)])
def test_snap_boundaries(p, snapped):
    assert predict.snap(np.array([[p]]))[0, 0] == snapped


def test_predict_numpy_ids_are_indices_or_the_id_array(heartbeat, tmp_path):
    root, _, test_signals = heartbeat
    np.save(tmp_path / 'x.npy', test_signals[:5])
    np.savez(tmp_path / 'x.npz', x=test_signals[:3, None, :], id=np.array(['a', 'b', 'c']))
    for name, ids in (('x.npy', [0, 1, 2, 3, 4]), ('x.npz', ['a', 'b', 'c'])):
        out = tmp_path / f'{name}.csv'
        assert predict.main([str(root / 'model.onnx'), str(tmp_path / name),
                             '--out', str(out), '--batch', '2']) == 0
        table = pd.read_csv(out)
        assert table['id'].tolist() == ids
        np.testing.assert_allclose(_probabilities(table).sum(axis=1), 1.0, atol=1e-3)


def test_predict_eight_lead_folder_pads_short_segments(seed_models, tmp_path, capsys):
    torch.manual_seed(0)
    model = seed_models.SEResNet1d(input_size=5000, in_channels=8, num_classes=2).eval()
    export_onnx(model, str(tmp_path / 'se.onnx'), in_channels=8, input_size=5000, opset=18)
    written = write_lead_folder(tmp_path / 'ecg', [5000, 4990, 5000])
    out = tmp_path / 'ecg.csv'
    args = [str(tmp_path / 'se.onnx'), str(tmp_path / 'ecg'), '--out', str(out)]
    assert predict.main(args) == 2                           # 4990 samples: not without padding
    assert 'has 4990 samples, but INPUT_SIZE=5000' in capsys.readouterr().err
    assert predict.main(args + ['--pad-tolerance', '50']) == 0
    table = pd.read_csv(out)
    assert table['id'].tolist() == sorted(written)           # file names, in name order
    assert list(table.columns) == ['id', 'label_0', 'label_1', 'label']
    np.testing.assert_allclose(_probabilities(table).sum(axis=1), 1.0, atol=1e-3)


def _error(capsys, *args):
    assert predict.main([str(a) for a in args]) == 2
    captured = capsys.readouterr()
    assert captured.out == ''
    return captured.err


def test_missing_model_is_an_error(heartbeat, tmp_path, capsys):
    root, _, _ = heartbeat
    err = _error(capsys, tmp_path / 'nope.onnx', root / 'testA.csv')
    assert err.startswith('error: ') and 'nope.onnx: model file does not exist' in err


def test_unloadable_model_is_an_error(heartbeat, tmp_path, capsys):
    root, _, _ = heartbeat
    (tmp_path / 'junk.onnx').write_bytes(b'not a model')
    assert 'junk.onnx: cannot be loaded by onnxruntime' in _error(
        capsys, tmp_path / 'junk.onnx', root / 'testA.csv')


def test_leads_that_do_not_match_the_model_are_an_error(heartbeat, tmp_path, capsys):
    root, _, _ = heartbeat
    np.savez(tmp_path / 'eight.npz', x=np.zeros((2, 8, 205), dtype=np.float32))
    err = _error(capsys, root / 'model.onnx', tmp_path / 'eight.npz', '--out', tmp_path / 'o.csv')
    assert "takes 1 lead(s) (input [N, 1, 205, 1]), but" in err and 'eight.npz has 8' in err
    assert not (tmp_path / 'o.csv').exists()


def test_input_size_that_does_not_match_the_model_is_an_error(heartbeat, capsys):
    root, _, _ = heartbeat
    err = _error(capsys, root / 'model.onnx', root / 'testA.csv', '--input-size', 1250)
    assert 'the model takes segments of 205 samples, but --input-size is 1250' in err


def test_data_errors_are_reported_not_raised(heartbeat, tmp_path, capsys):
    root, _, _ = heartbeat
    (tmp_path / 'short.csv').write_text('id,heartbeat_signals\n0,"1,2,3"\n')
    err = _error(capsys, root / 'model.onnx', tmp_path / 'short.csv')
    assert 'short.csv: row 1 (id 0): has 3 samples, but INPUT_SIZE=205' in err
    err = _error(capsys, root / 'model.onnx', tmp_path / 'data.bin')
    assert 'data.bin: data path does not exist' in err


# ----------------------------------------------------------------------------- length policy

class MeanNet(nn.Module):
    """Two logits from the signal's mean: any input length exports and runs."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([1.0, -1.0]))

    def forward(self, x):
        return x.mean(dim=(1, 2, 3))[:, None] * self.weight


@pytest.fixture
def padded_model(tmp_path):
    """A result folder trained with INPUT_SIZE=500, PAD_TOLERANCE=50, SHORTER='exclude'
    (params_used.py written as the search writes it), and segments of 500, 470, 450, 400."""
    from conftest import PARAMS
    from public.core.settings import load_settings, write_settings
    folder = tmp_path / 'multi-result' / 'MeanNet' / '97-95'
    folder.mkdir(parents=True)
    export_onnx(MeanNet(), str(folder / 'saved.onnx'), in_channels=1, input_size=500, opset=18)
    settings = load_settings(['INPUT_SIZE=500', 'PAD_TOLERANCE=50', "SHORTER='exclude'"],
                             params_path=str(PARAMS))
    write_settings(settings, str(folder / 'params_used.py'))
    written = write_lead_folder(tmp_path / 'ecg', [500, 470, 450, 400], leads=1)
    return folder, tmp_path / 'ecg', list(written)                  # in the order of lengths


def test_predict_reads_the_length_policy_of_the_model_folder(padded_model, tmp_path, capsys):
    folder, data, names = padded_model
    out = tmp_path / 'p.csv'
    assert predict.main([str(folder / 'saved.onnx'), str(data), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert (f"length policy from {folder / 'params_used.py'}: PAD_TOLERANCE=50, "
            f"SHORTER='exclude'") in printed
    assert "1 segment(s) shorter than INPUT_SIZE - PAD_TOLERANCE excluded" in printed
    kept = pd.read_csv(out)['id'].tolist()
    assert kept == sorted(names[:3])                 # 500 kept, 470 and 450 padded, 400 excluded


@pytest.mark.parametrize('flags, message', [
    (['--shorter', 'error'], 'has 400 samples, but INPUT_SIZE=500'),
    (['--pad-tolerance', '0', '--shorter', 'error'], 'samples, but INPUT_SIZE=500'),
])
def test_flags_override_the_model_folders_policy(padded_model, tmp_path, capsys, flags, message):
    folder, data, _ = padded_model
    args = [str(folder / 'saved.onnx'), str(data), '--out', str(tmp_path / 'p.csv'), *flags]
    assert predict.main(args) == 2
    assert message in capsys.readouterr().err


def test_without_params_used_the_defaults_apply(padded_model, tmp_path, capsys):
    folder, data, _ = padded_model
    alone = tmp_path / 'alone.onnx'
    alone.write_bytes((folder / 'saved.onnx').read_bytes())
    assert predict.main([str(alone), str(data), '--out', str(tmp_path / 'p.csv')]) == 2
    err = capsys.readouterr().err
    assert 'samples, but INPUT_SIZE=500' in err and 'PAD_TOLERANCE=0' in err


def test_a_bad_policy_in_params_used_is_reported(padded_model, tmp_path, capsys):
    folder, data, _ = padded_model
    text = (folder / 'params_used.py').read_text().replace('PAD_TOLERANCE = 50', 'PAD_TOLERANCE = -5')
    (folder / 'params_used.py').write_text(text)
    assert predict.main([str(folder / 'saved.onnx'), str(data), '--out', str(tmp_path / 'p.csv')]) == 2
    err = capsys.readouterr().err
    assert 'params_used.py: line' in err and 'PAD_TOLERANCE must be an int >= 0, got PAD_TOLERANCE=-5' in err


# ----------------------------------------------------------------------------- labels and metrics

@pytest.mark.parametrize('probabilities, names, multilabel, labels', [
    ([[0.2, 0.8], [0.7, 0.3]], None, False, [1, 0]),                         # argmax index
    ([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]], ['N', 'AF', 'O'], False, ['O', 'N']),  # CLASSES names
    ([[0.6, 0.2, 0.9], [0.1, 0.1, 0.1], [0.5, 0.49, 0.5]], ['NORM', 'MI', 'CD'], True,
     ['NORM|CD', '', 'NORM|CD']),                                            # p >= 0.5, '|'
])
def test_predicted_labels(probabilities, names, multilabel, labels):
    assert predict.predicted_labels(np.array(probabilities), names, multilabel) == labels


def _mean_folder(folder, means):
    """One 500-sample .txt segment per (name, mean)."""
    folder.mkdir()
    for name, mean in means:
        np.savetxt(folder / name, np.full((500, 1), mean, dtype=np.float32), fmt='%.4f')
    return folder


def test_labelled_folder_prints_metrics_and_subjects_worst_first(tmp_path, capsys):
    export_onnx(MeanNet(), str(tmp_path / 'mean.onnx'), in_channels=1, input_size=500, opset=18)
    # MeanNet: class 1 (AFIB) for a negative mean. S2's AFIB segment is missed.
    data = _mean_folder(tmp_path / 'ecg', [('S1-AFIB-0.txt', -1), ('S1-N-1.txt', 1),
                                           ('S2-AFIB-2.txt', 1), ('S2-N-3.txt', 1)])
    out = tmp_path / 'p.csv'
    assert predict.main([str(tmp_path / 'mean.onnx'), str(data), '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert pd.read_csv(out)['label'].tolist() == [1, 0, 0, 0]
    assert printed.index('wrote 4 rows') < printed.index('metrics on 4 labelled segment(s)')
    assert ('F1 0.6667, accuracy 0.7500, precision 1.0000, recall 0.5000 (class 1)'
            in printed)
    lines = printed.splitlines()
    confusion = lines.index('confusion counts (rows: true class, columns: predicted class):')
    assert [line.split()[-2:] for line in lines[confusion + 2:confusion + 4]] == [['2', '0'],
                                                                               ['1', '1']]
    table = lines.index('per subject, worst first (2 of 2):')
    subjects = [line.split() for line in lines[table + 2:]]
    assert subjects == [['S2', '2', '0.500', '0.000'], ['S1', '2', '1.000', '1.000']]


def test_labelled_csv_prints_metrics_without_a_subject_table(heartbeat, tmp_path, capsys):
    root, _, _ = heartbeat                     # train.csv: labels 0..3, no subject column
    assert predict.main([str(root / 'model.onnx'), str(root / 'train.csv'),
                         '--out', str(tmp_path / 'p.csv')]) == 0
    printed = capsys.readouterr().out
    assert 'metrics on 40 labelled segment(s): F1' in printed
    assert '(macro over the classes)' in printed
    assert 'per subject' not in printed
    assert len([line for line in printed.splitlines() if line.startswith('  ')]) == 5   # 4x4 + head
