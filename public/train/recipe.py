"""The training recipe's levers (all off = the original ATML's recipe):

    augment = Augmenter(seed=42, device=device)   # AUGMENT=True
    xb = augment(xb)                              # per batch, on the device, label-preserving
    add_normalization(model)                      # NORMALIZE='segment': inside the model
    weights = class_weights(y_train, classes)     # CLASS_WEIGHTS='balanced'

- Augmentations are vectorised tensor ops on the whole batch (no per-sample Python loop),
  drawn from a seeded generator: amplitude scaling, additive noise, baseline wander and a
  random circular time shift, each per sample and, for multi-lead data, per lead (the
  shift is per sample: the leads of one recording stay aligned).
- Normalisation is per segment and per lead (zero mean, unit standard deviation over time)
  and done by a forward pre-hook of the model itself, so the exported ONNX file takes the
  raw signal and needs no preprocessing, and the state dict's keys do not change.
- Balanced class weights: n_samples / (n_classes * count of each class), as scikit-learn's
  'balanced'; a class absent from the training labels gets weight 0.
"""
import torch

SAMPLE_RATE_HZ = 250.0


class Augmenter:
    """Label-preserving ECG augmentations of a batch x: (N, C, L) on any device."""

    def __init__(self, seed, device, scale=(0.8, 1.2), noise=0.05, wander=0.1,
                 wander_hz=(0.05, 0.5), shift=0.1):
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.scale, self.noise, self.wander = scale, noise, wander
        self.wander_hz, self.shift = wander_hz, shift

    def _uniform(self, shape, low, high, like):
        return low + (high - low) * torch.rand(shape, generator=self.generator,
                                               device=like.device, dtype=like.dtype)

    def __call__(self, x):
        n, c, length = x.shape
        std = x.std(dim=2, keepdim=True).clamp_min(1e-6)
        out = x * self._uniform((n, c, 1), *self.scale, x)
        out = out + self.noise * std * torch.randn(x.shape, generator=self.generator,
                                                   device=x.device, dtype=x.dtype)
        t = torch.arange(length, device=x.device, dtype=x.dtype) / SAMPLE_RATE_HZ
        freq = self._uniform((n, c, 1), *self.wander_hz, x)
        phase = self._uniform((n, c, 1), 0.0, 2 * torch.pi, x)
        out = out + self.wander * std * torch.sin(2 * torch.pi * freq * t + phase)
        max_shift = int(self.shift * length)
        if max_shift:
            offsets = torch.randint(-max_shift, max_shift + 1, (n, 1, 1),
                                    generator=self.generator, device=x.device)
            index = (torch.arange(length, device=x.device) - offsets) % length
            out = torch.gather(out, 2, index.expand(n, c, length))
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
