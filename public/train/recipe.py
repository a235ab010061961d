"""The training recipe's levers (all off = the original ATML's recipe):

    augment = Augmenter(42, device, AUGMENT)      # AUGMENT: True or a tuple of names
    xb = augment(xb)                              # per batch, on the device, label-preserving
    add_normalization(model)                      # NORMALIZE='segment': inside the model
    weights = class_weights(y_train, classes)     # CLASS_WEIGHTS='balanced'

- Augmentations are vectorised tensor ops on the whole batch (no per-sample Python loop),
  drawn from a seeded generator: amplitude scaling, additive noise, baseline wander and a
  random circular time shift, each per sample and, for multi-lead data, per lead (the
  shift is per sample: the leads of one recording stay aligned). AUGMENT may also name
  them, with levels, and add polarity inversion ('flip': a whole segment, all leads, times
  -1 with probability 0.5): Augmenter(seed, device, ('scale', 'noise=0.15', 'flip'));
  they are applied (and drawn) in the fixed order scale, noise, wander, shift, flip, so
  the four of True, named, draw exactly what True draws (public.core.settings.AUGMENTATIONS).
- Normalisation is per segment and per lead (zero mean, unit standard deviation over time)
  and done by a forward pre-hook of the model itself, so the exported ONNX file takes the
  raw signal and needs no preprocessing, and the state dict's keys do not change.
- Balanced class weights: n_samples / (n_classes * count of each class), as scikit-learn's
  'balanced'; a class absent from the training labels gets weight 0.
"""
import torch

from public.core.settings import SETTINGS, augment_levels

SAMPLE_RATE_HZ = 250.0


class Augmenter:
    """Label-preserving ECG augmentations of a batch x: (N, C, L) on any device.

    `augment` is AUGMENT's value: True (scale, noise, wander and shift at the levels of the
    keyword arguments, today's recipe), False (none: x comes back as it is) or a tuple of
    names, each optionally 'name=level' (a level overrides the keyword argument's)."""

    def __init__(self, seed, device, augment=True, scale=(0.8, 1.2), noise=0.05, wander=0.1,
                 wander_hz=(0.05, 0.5), shift=0.1, flip=0.5):
        levels = augment_levels(augment)
        if levels is None:
            raise ValueError(f"AUGMENT must be {SETTINGS['AUGMENT'].rule}, "
                             f"got AUGMENT={augment!r}")
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.ops = tuple(levels)
        given = {n: v for n, v in levels.items() if v is not None}
        self.scale = (1.0 - given['scale'], 1.0 + given['scale']) if 'scale' in given else scale
        self.noise = given.get('noise', noise)
        self.wander = given.get('wander', wander)
        self.shift = given.get('shift', shift)
        self.flip = given.get('flip', flip)
        self.wander_hz = wander_hz

    def _uniform(self, shape, low, high, like):
        return low + (high - low) * torch.rand(shape, generator=self.generator,
                                               device=like.device, dtype=like.dtype)

    def __call__(self, x):
        n, c, length = x.shape
        std = x.std(dim=2, keepdim=True).clamp_min(1e-6)
        out = x
        if 'scale' in self.ops:
            out = out * self._uniform((n, c, 1), *self.scale, x)
        if 'noise' in self.ops:
            out = out + self.noise * std * torch.randn(x.shape, generator=self.generator,
                                                       device=x.device, dtype=x.dtype)
        if 'wander' in self.ops:
            t = torch.arange(length, device=x.device, dtype=x.dtype) / SAMPLE_RATE_HZ
            freq = self._uniform((n, c, 1), *self.wander_hz, x)
            phase = self._uniform((n, c, 1), 0.0, 2 * torch.pi, x)
            out = out + self.wander * std * torch.sin(2 * torch.pi * freq * t + phase)
        max_shift = int(self.shift * length) if 'shift' in self.ops else 0
        if max_shift:
            offsets = torch.randint(-max_shift, max_shift + 1, (n, 1, 1),
                                    generator=self.generator, device=x.device)
            index = (torch.arange(length, device=x.device) - offsets) % length
            out = torch.gather(out, 2, index.expand(n, c, length))
        if 'flip' in self.ops:       # one sign per segment: the leads flip together
            flipped = self._uniform((n, 1, 1), 0.0, 1.0, x) < self.flip
            out = out * (1.0 - 2.0 * flipped.to(x.dtype))
        return out


def _standardize(module, args):
    x = args[0]
    mean = x.mean(dim=2, keepdim=True)
    std = x.std(dim=2, keepdim=True)
    return ((x - mean) / (std + 1e-5),) + tuple(args[1:])


def add_normalization(model):
    """Make `model` standardise each segment and lead itself (input (N, C, L, 1))."""
    model.register_forward_pre_hook(_standardize)
    model.atml_normalize = 'segment'
    return model


def class_weights(y, num_classes):
    """'balanced' loss weights from the training labels (a float tensor on y's device)."""
    counts = torch.bincount(y, minlength=num_classes).to(torch.float32)
    weights = torch.where(counts > 0, len(y) / (num_classes * counts.clamp_min(1)),
                          torch.zeros_like(counts))
    return weights
