"""The real-data split the benchmarks share: the shared 53-subject ECG segments, 13 test
subjects held out, the other 40 split into training and validation subjects by seed.

    data, split = subject_split(npz_path, seed=42)        # PreparedData, index arrays
"""
import os
from dataclasses import dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NPZ = os.path.join(ROOT, '..', 'shared', 'data', 'ecg_af_segments.npz')
TEST_SUBJECTS = ('S51', 'S52', 'S53', 'S55', 'S56', 'S57', 'S58', 'S59', 'S60', 'S61', 'S63',
                 'S65', 'S66')


@dataclass
class Split:
    train: np.ndarray          # segment indices
    val: np.ndarray
    test: np.ndarray
    subjects: np.ndarray       # subject of every segment
    y: np.ndarray              # 1 = AF (rhythm 'AFIB')

    def describe(self):
        """'train 11821 segments / 32 subjects, validation 2666 / 8, test 5513 / 13 (AF ...)'"""
        n = {k: (len(i), len(np.unique(self.subjects[i])), self.y[i].mean())
             for k, i in (('train', self.train), ('val', self.val), ('test', self.test))}
        return (f"train {n['train'][0]} segments / {n['train'][1]} subjects, validation "
                f"{n['val'][0]} / {n['val'][1]}, test {n['test'][0]} / {n['test'][1]} (AF "
                f"{n['train'][2]:.0%} / {n['val'][2]:.0%} / {n['test'][2]:.0%})")


def subject_split(path=NPZ, seed=42, subsample=0, onnx_sample=16):
    """(PreparedData on the CPU, Split): 20 % of the 40 non-test subjects validate (seeded
    subject split, as ATML splits); subsample > 0 keeps that many training segments."""
    import torch
    from public.dataset import split_by_subject
    from public.data.prepare import TrialData
    from public.data.prepare import PreparedData
    d = np.load(path)
    x = d['x'].astype(np.float32)[:, None, :]
    y = (d['rhythm'] == 'AFIB').astype(np.int64)
    subjects = d['subject']
    held = np.isin(subjects, TEST_SUBJECTS)
    rest = np.flatnonzero(~held)
    tr, va = split_by_subject(subjects[rest], y[rest], 0.2, seed)
    tr, va, te = rest[tr], rest[va], np.flatnonzero(held)
    if subsample and subsample < len(tr):
        tr = np.sort(np.random.default_rng(seed).permutation(tr)[:subsample])
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    data = PreparedData(trial=TrialData(xt[tr], yt[tr], xt[va], yt[va]),
                        x_test=xt[te], y_test=y[te], onnx_sample=x[va[:onnx_sample]],
                        in_channels=1, input_size=1250, num_classes=2,
                        device=torch.device('cpu'), summary='', test_subjects=subjects[te],
                        val_subjects=subjects[va])
    return data, Split(tr, va, te, subjects, y)


def make_log(path=''):
    """log(line): print it, and append it to `path` too when one is given."""
    out = open(path, 'w') if path else None

    def log(line):
        print(line, flush=True)
        if out:
            out.write(line + '\n')
            out.flush()
    return log


def _cpuinfo(field):
    try:
        with open('/proc/cpuinfo') as f:
            return next((line.split(':', 1)[1].strip() for line in f
                         if line.split(':', 1)[0].strip() == field), '')
    except OSError:
        return ''


def cpu_name():
    import platform
    return _cpuinfo('model name') or platform.machine()


def cpu_vnni():
    """'avx512_vnni' / 'avx_vnni' when this x86 CPU has VNNI (onnxruntime's u8s8 kernels
    then sum exactly), '' otherwise (README, "INT8 on CPUs without VNNI")."""
    flags = _cpuinfo('flags').split()
    return next((v for v in ('avx512_vnni', 'avx_vnni') if v in flags), '')
