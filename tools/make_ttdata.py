"""Generate the small synthetic ECG demo dataset used by ATML examples and tests.

Everything written by this script is SYNTHETIC: the signals are built from sums
of Gaussian waves plus simulated noise.  No patient (or any real) recording is
stored in this repository; ``ttdata/`` exists only so that the pipeline can be
run end to end on a fresh checkout.

Layout (same as the real-data loaders expect)::

    OUT/train/S<subject>-<RHYTHM>-<index>.txt   16 subjects S100..S115, 50 each
    OUT/test/S<subject>-<RHYTHM>-<index>.txt     6 subjects S200..S205, 40 each

Each file holds one 5 s single-lead segment at 250 Hz (1250 samples, in mV),
one value per line with 4 decimals.  RHYTHM is ``N`` (normal sinus rhythm),
``AFIB`` (atrial fibrillation) or ``SBR`` (sinus bradycardia, ~5 %, a negative
class).  Train and test subjects are disjoint, so the test split measures
generalisation to unseen morphologies.

The task is deliberately not trivial: some AF segments are only mildly
irregular, some sinus segments contain premature beats or sinus arrhythmia,
P waves and f-waves are sometimes buried in noise.

Usage::

    python tools/make_ttdata.py [--out ttdata] [--seed 0]

The output directories are deleted and rewritten; the same seed always yields
byte-identical files.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

FS = 250  # Hz
SEG_SEC = 5.0
N_SAMPLES = int(FS * SEG_SEC)  # 1250
T = np.arange(N_SAMPLES) / FS

SPLITS = {
    # split: (subject ids, segments per subject)
    "train": (range(100, 116), 50),
    "test": (range(200, 206), 40),
}
SBR_FRACTION = 0.05

# Difficulty knobs (see module docstring).
AF_CV_RANGE = (0.15, 0.30)        # RR coefficient of variation in typical AF
AF_WEAK_FRACTION = 0.25           # AF segments with only mild irregularity
AF_WEAK_CV_RANGE = (0.08, 0.12)
NSR_CV_RANGE = (0.02, 0.04)       # normal beat-to-beat variability
NSR_ARRHYTHMIA_FRACTION = 0.15    # respiratory sinus arrhythmia
NSR_ECTOPIC_FRACTION = 0.15       # one or two premature beats
FWAVE_AMP_RANGE = (0.05, 0.10)    # mV, typical f-waves
FWAVE_BURIED_FRACTION = 0.15      # weak f-waves under boosted noise
FWAVE_BURIED_AMP_RANGE = (0.02, 0.04)
NSR_NOISY_FRACTION = 0.20         # sinus segments whose P waves sink into noise
EMG_FRACTION = 0.20


# --------------------------------------------------------------------------
# Subject-level parameters
# --------------------------------------------------------------------------
def _subject_profile(rng: np.random.Generator) -> dict:
    """Per-subject morphology and rate baseline, so subjects look different."""
    polarity = -1.0 if rng.random() < 0.12 else 1.0  # some leads see inverted QRS
    return {
        "hr": rng.uniform(60, 85),
        "af_hr_factor": rng.uniform(1.0, 1.35),  # AF ventricular rate is often faster
        "p_amp": rng.uniform(0.12, 0.25),
        "p_w": rng.uniform(0.018, 0.030),
        "pr": rng.uniform(0.14, 0.20),
        "q_amp": -rng.uniform(0.02, 0.15) * polarity,
        "r_amp": rng.uniform(1.0, 2.0) * polarity,
        "r_w": rng.uniform(0.008, 0.014),
        "s_amp": -rng.uniform(0.05, 0.45) * polarity,
        "t_amp": rng.uniform(0.15, 0.45) * (1 if rng.random() < 0.9 else -1),
        "t_w": rng.uniform(0.040, 0.070),
        "qt_k": rng.uniform(0.24, 0.30),  # T offset = qt_k * sqrt(RR) (Bazett-like)
        "noise": rng.uniform(0.005, 0.015),
        "wander": rng.uniform(0.02, 0.10),
        "af_fraction": rng.uniform(0.30, 0.70),
    }


def _segment_rhythms(rng: np.random.Generator, prof: dict, n: int) -> list[str]:
    """Rhythm label for each of a subject's ``n`` segments, in shuffled order."""
    # Stochastic rounding keeps SBR at ~5 % overall for any ``n``.
    n_sbr = int(n * SBR_FRACTION) + int(rng.random() < (n * SBR_FRACTION) % 1)
    n_af = int(round((n - n_sbr) * prof["af_fraction"]))
    labels = ["SBR"] * n_sbr + ["AFIB"] * n_af + ["N"] * (n - n_sbr - n_af)
    return [labels[i] for i in rng.permutation(n)]


# --------------------------------------------------------------------------
# RR interval models
# --------------------------------------------------------------------------
def _n_beats(rr_mean: float) -> int:
    """Enough beats to cover the lead-in before t=0 plus the segment, even if
    every RR were half the mean (or the 0.25 s floor)."""
    return int(np.ceil((SEG_SEC + 1.5) / max(rr_mean * 0.5, 0.25))) + 2


def _sinus_rr(rng: np.random.Generator, hr: float, arrhythmia: bool) -> np.ndarray:
    """Regular RR: mean plus smooth AR(1) jitter, optional respiratory modulation."""
    rr_mean = 60.0 / hr
    n = _n_beats(rr_mean)
    cv = rng.uniform(*NSR_CV_RANGE)
    e = rng.standard_normal(n)
    ar = np.empty(n)
    ar[0] = e[0]
    # Smooth jitter (sinus rate drifts, it does not jump); 0.6/0.8 keep unit
    # variance so ``cv`` is the actual coefficient of variation.
    for i in range(1, n):
        ar[i] = 0.6 * ar[i - 1] + 0.8 * e[i]
    rr = rr_mean * (1.0 + cv * ar)
    if arrhythmia:
        # Respiratory sinus arrhythmia: periodic, not random, RR change.
        resp_period = rng.uniform(3.0, 5.0)
        depth = rng.uniform(0.06, 0.12)
        beat_t = np.cumsum(rr)
        rr = rr * (1.0 + depth * np.sin(2 * np.pi * beat_t / resp_period + rng.uniform(0, 2 * np.pi)))
    return rr


def _af_rr(rng: np.random.Generator, hr: float, weak: bool) -> np.ndarray:
    """Irregularly irregular RR: independent log-normal draws around the mean."""
    rr_mean = 60.0 / hr
    cv = rng.uniform(*(AF_WEAK_CV_RANGE if weak else AF_CV_RANGE))
    n = _n_beats(rr_mean)
    sigma = np.sqrt(np.log1p(cv**2))
    rr = rr_mean * rng.lognormal(-0.5 * sigma**2, sigma, n)
    return np.clip(rr, 0.28, 2.0)  # refractory period / no long pauses


# --------------------------------------------------------------------------
# Waveform synthesis
# --------------------------------------------------------------------------
def _beat_waves(prof: dict, rr: np.ndarray, rng: np.random.Generator,
                with_p: bool, ectopic: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-beat Gaussian components (P, Q, R, S, T): offsets, amplitudes, widths.

    ``ectopic`` marks premature ventricular beats: wide QRS, no P, opposite T.
    """
    nb = len(rr)
    # Small beat-to-beat amplitude modulation (respiration, electrode motion).
    amod = 1.0 + 0.05 * rng.standard_normal(nb)
    t_off = prof["qt_k"] * np.sqrt(np.clip(rr, 0.3, 2.0))
    off = np.stack([
        np.full(nb, -prof["pr"]), np.full(nb, -0.025), np.zeros(nb),
        np.full(nb, 0.028), t_off], axis=1)
    amp = np.stack([
        np.full(nb, prof["p_amp"] if with_p else 0.0), np.full(nb, prof["q_amp"]),
        np.full(nb, prof["r_amp"]), np.full(nb, prof["s_amp"]),
        np.full(nb, prof["t_amp"])], axis=1) * amod[:, None]
    wid = np.tile([prof["p_w"], 0.010, prof["r_w"], 0.011, prof["t_w"]], (nb, 1))
    if ectopic.any():
        amp[ectopic, 0] = 0.0
        amp[ectopic, 2] *= 1.3
        amp[ectopic, 4] = -np.sign(prof["r_amp"]) * abs(prof["t_amp"]) * 1.3
        wid[ectopic, 1:4] *= 2.5
    return off, amp, wid


def _render(beat_times: np.ndarray, off: np.ndarray, amp: np.ndarray, wid: np.ndarray) -> np.ndarray:
    """Sum of Gaussians on the sample grid, vectorised over beats x components."""
    centers = (beat_times[:, None] + off).ravel()
    a, w = amp.ravel(), wid.ravel()
    d = T[:, None] - centers[None, :]
    return (a * np.exp(-0.5 * (d / w) ** 2)).sum(axis=1)


def _fwaves(rng: np.random.Generator, amp: float) -> np.ndarray:
    """Fibrillatory baseline: 4-9 Hz quasi-sinusoid with wandering rate and amplitude."""
    f0 = rng.uniform(4.0, 9.0)
    freq = f0 * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.4) * T + rng.uniform(0, 6.3)))
    phase = 2 * np.pi * np.cumsum(freq) / FS + rng.uniform(0, 6.3)
    env = 1.0 + 0.4 * np.sin(2 * np.pi * rng.uniform(0.2, 0.8) * T + rng.uniform(0, 6.3))
    return amp * env * (np.sin(phase) + 0.3 * np.sin(2 * phase + rng.uniform(0, 6.3)))


def _noise(rng: np.random.Generator, prof: dict, noise_boost: float) -> np.ndarray:
    """Baseline wander + white noise + occasional EMG burst."""
    wander = np.zeros(N_SAMPLES)
    for _ in range(2):
        wander += prof["wander"] * rng.uniform(0.3, 1.0) * np.sin(
            2 * np.pi * rng.uniform(0.1, 0.5) * T + rng.uniform(0, 6.3))
    sig = wander + prof["noise"] * noise_boost * rng.standard_normal(N_SAMPLES)
    if rng.random() < EMG_FRACTION:
        # EMG: broadband high-frequency noise confined to a short window.
        centre, width = rng.uniform(0, SEG_SEC), rng.uniform(0.2, 1.0)
        env = np.exp(-0.5 * ((T - centre) / (width / 2)) ** 2)
        hf = np.diff(rng.standard_normal(N_SAMPLES + 1))  # differencing -> high-pass
        sig += rng.uniform(0.03, 0.15) * env * hf
    return sig


def _segment(rng: np.random.Generator, prof: dict, rhythm: str) -> np.ndarray:
    """One 5 s segment of the given rhythm, in mV."""
    noise_boost = 1.0
    fw = np.zeros(N_SAMPLES)
    if rhythm == "AFIB":
        hr = np.clip(prof["hr"] * prof["af_hr_factor"] + rng.normal(0, 8), 60, 150)
        rr = _af_rr(rng, hr, weak=rng.random() < AF_WEAK_FRACTION)
        with_p = False
        ectopic = np.zeros(len(rr), bool)
        if rng.random() < FWAVE_BURIED_FRACTION:
            fw_amp, noise_boost = rng.uniform(*FWAVE_BURIED_AMP_RANGE), rng.uniform(1.5, 2.5)
        else:
            fw_amp = rng.uniform(*FWAVE_AMP_RANGE)
        fw = _fwaves(rng, fw_amp)
    else:
        if rhythm == "SBR":
            hr = rng.uniform(45, 58)
        else:
            hr = np.clip(prof["hr"] + rng.normal(0, 6), 55, 100)
        rr = _sinus_rr(rng, hr, arrhythmia=rng.random() < NSR_ARRHYTHMIA_FRACTION)
        with_p = True
        ectopic = np.zeros(len(rr), bool)
        if rhythm == "N" and rng.random() < NSR_ECTOPIC_FRACTION:
            # Premature beat k+1: short coupling interval rr[k], then a
            # compensatory pause rr[k+1] so the underlying sinus rhythm resumes.
            for k in rng.choice(np.arange(2, len(rr) - 2), size=rng.integers(1, 3), replace=False):
                pre = rng.uniform(0.60, 0.80)
                rr[k + 1] += rr[k] * (1 - pre)
                rr[k] *= pre
                ectopic[k + 1] = rng.random() < 0.6  # PVC, else PAC (normal QRS)
        if rng.random() < NSR_NOISY_FRACTION:
            noise_boost = rng.uniform(1.5, 2.5)
    # Beat k ends RR interval k-1; start before t=0 so the segment opens mid-rhythm.
    beat_times = np.concatenate([[0.0], np.cumsum(rr)[:-1]]) - rng.uniform(0.3, 1.5)
    off, amp, wid = _beat_waves(prof, rr, rng, with_p, ectopic)
    ecg = _render(beat_times, off, amp, wid) + fw + _noise(rng, prof, noise_boost)
    return ecg * rng.uniform(0.8, 1.25)  # gain / electrode-contact variation


# --------------------------------------------------------------------------
# I/O
# --------------------------------------------------------------------------
def _write_segment(path: Path, x: np.ndarray) -> None:
    # Fixed "%.4f" formatting and forced "\n" endings (also on Windows) keep
    # reruns byte-identical.
    with open(path, "w", newline="\n") as f:
        f.write("\n".join(f"{v:.4f}" for v in x) + "\n")


def generate(out: Path, seed: int = 0) -> dict[str, dict[str, int]]:
    """Write OUT/train and OUT/test; return per-split rhythm counts."""
    counts: dict[str, dict[str, int]] = {}
    for split, (subjects, n_seg) in SPLITS.items():
        d = out / split
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        counts[split] = {"N": 0, "AFIB": 0, "SBR": 0}
        for subj in subjects:
            # Seed per subject so each subject is stable regardless of the others.
            rng = np.random.default_rng([seed, subj])
            prof = _subject_profile(rng)
            for idx, rhythm in enumerate(_segment_rhythms(rng, prof, n_seg)):
                _write_segment(d / f"S{subj}-{rhythm}-{idx}.txt", _segment(rng, prof, rhythm))
                counts[split][rhythm] += 1
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("ttdata"), help="output root (default: ttdata)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    args = ap.parse_args()
    t0 = time.perf_counter()
    counts = generate(args.out, args.seed)
    for split, c in counts.items():
        print(f"{split}: {sum(c.values())} files {c}")
    print(f"done in {time.perf_counter() - t0:.1f} s -> {args.out}")


if __name__ == "__main__":
    main()
