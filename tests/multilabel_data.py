"""A synthetic PTB-XL-like multi-label data set (seed 004) whose labels can be learnt.

    from multilabel_data import PTBXL_CLASSES, write_ptbxl_like_npz
    path = write_ptbxl_like_npz(tmp_path / 'ptbxl.npz', n=200, seed=0)
    # settings: DATA_DIR=str(path), LABEL_MODE='multilabel', CLASSES=PTBXL_CLASSES,
    #           INPUT_SIZE=1000, VAL_FOLDS=(9, 10) (or split by subject)

The file holds what a PTB-XL export at 100 Hz holds: x (N, 12, 1000) float32 (12 leads,
10 s), y (N, 5) 0/1 for the diagnostic superclasses PTBXL_CLASSES, subject (N,) patient
ids (1-3 records per patient) and fold (N,) strat_fold-style folds 1..10 (all records of a
patient in one fold; every fold present when there are at least 10 patients, about n >= 20).

Every record is a noisy beat train (a QRS spike and a T wave per beat, 60-100 bpm, per-lead
gains, baseline wander). Each label adds its own waveform to its own leads: a sinusoid of
its own frequency (FEATURES), random phase and amplitude 0.4-0.6, well above the noise. So
each label is visible in the signal, independently of the others, and a small convnet
trained for a couple of epochs scores clearly above chance (tests/test_multilabel.py
checks a macro AUC > 0.8 after two epochs on 240 records).

The label mix follows PTB-XL's: NORM in about 40 % of records and then alone; otherwise any
combination of MI, STTC, CD and HYP; about 2 % of records have no label (all zeros).
"""
import numpy as np

PTBXL_CLASSES = ('NORM', 'MI', 'STTC', 'CD', 'HYP')
LEADS, LENGTH = 12, 1000            # PTB-XL at 100 Hz: 12 leads x 10 s
# label -> (leads its waveform is added to, cycles of its sinusoid per 1000 samples)
FEATURES = {
    'NORM': ((0, 1, 2), 6),          # I, II, III
    'MI': ((6, 7, 8), 17),           # V1-V3
    'STTC': ((3, 4, 5), 31),         # aVR, aVL, aVF
    'CD': ((9, 10, 11), 47),         # V4-V6
    'HYP': ((1, 7, 10), 71),         # II, V2, V5: shares leads, told apart by its frequency
}
_OTHER_PROBABILITY = (0.4, 0.4, 0.35, 0.25)   # MI, STTC, CD, HYP in a record that is not NORM


def ptbxl_like_labels(n, rng):
    """(n, 5) int64 0/1 labels with PTB-XL's mix (see the module docstring)."""
    y = np.zeros((n, len(PTBXL_CLASSES)), dtype=np.int64)
    for i in range(n):
        if rng.random() < 0.4:
            y[i, 0] = 1
            continue
        y[i, 1:] = rng.random(4) < _OTHER_PROBABILITY
        if not y[i].any() and rng.random() < 0.9:
            y[i, 1 + rng.integers(4)] = 1
    return y


def _beats(rng):
    """(LEADS, LENGTH) background: QRS spikes and T waves at 60-100 bpm, per-lead gains,
    baseline wander and noise."""
    t = np.arange(LENGTH, dtype=np.float64)
    period = 100 * 60 / rng.uniform(60, 100)          # samples per beat at 100 Hz
    beat = np.zeros(LENGTH)
    for start in np.arange(rng.uniform(0, period), LENGTH, period):
        beat += np.exp(-0.5 * ((t - start) / 1.5) ** 2)              # QRS
        beat += 0.3 * np.exp(-0.5 * ((t - start - 25) / 6.0) ** 2)   # T wave
    gains = rng.uniform(0.5, 1.5, LEADS) * rng.choice([-1, 1], LEADS)
    wander = 0.2 * np.sin(2 * np.pi * t / LENGTH * rng.uniform(0.2, 1) + rng.uniform(0, 6.3))
    return gains[:, None] * beat + wander + rng.normal(0, 0.1, (LEADS, LENGTH))


def ptbxl_like_signals(y, rng):
    """(n, 12, 1000) float32 records: background beats plus each label's waveform."""
    t = np.arange(LENGTH, dtype=np.float64)
    x = np.empty((len(y), LEADS, LENGTH), dtype=np.float32)
    for i, labels in enumerate(y):
        record = _beats(rng)
        for name, on in zip(PTBXL_CLASSES, labels):
            if on:
                leads, cycles = FEATURES[name]
                wave = np.sin(2 * np.pi * cycles * t / LENGTH + rng.uniform(0, 2 * np.pi))
                record[list(leads)] += rng.uniform(0.4, 0.6) * wave
        x[i] = record
    return x


def patients_and_folds(n, rng):
    """(subject (n,), fold (n,)): 1-3 consecutive records per patient, the patients dealt
    round-robin over folds 1..10 in random order (PTB-XL's strat_fold keeps a patient in
    one fold)."""
    counts = []
    while sum(counts) < n:
        counts.append(int(rng.integers(1, 4)))
    patient = np.repeat(np.arange(len(counts)), counts)[:n]
    fold_of_patient = rng.permutation(len(counts)) % 10 + 1
    return 10000 + patient, fold_of_patient[patient]


def write_ptbxl_like_npz(path, n=200, seed=0):
    """Write the synthetic data set of the module docstring to path (.npz); return path."""
    rng = np.random.default_rng(seed)
    y = ptbxl_like_labels(n, rng)
    x = ptbxl_like_signals(y, rng)
    subject, fold = patients_and_folds(n, rng)
    np.savez(path, x=x, y=y, subject=subject, fold=fold)
    return path
