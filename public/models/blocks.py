"""Layers shared by the registered models and the stage-two model.

Models take the original ATML input layout (N, C, L, 1) and work internally on
(N, C, L) with Conv1d: the trailing unit axis only cost speed in the original's Conv2d(k x 1).
Layer sizes are derived from the input length with `conv_output_length`, never hard-coded.
"""
import torch
from torch import nn


def conv_output_length(length, kernel_size, stride=1, padding=0):
    """Length of a Conv1d/MaxPool1d output for an input of `length` samples."""
    return (length + 2 * padding - kernel_size) // stride + 1


def to_1d(x):
    """(N, C, L, 1) -> (N, C, L); other shapes are a clear error, not a silent broadcast."""
    if x.dim() != 4 or x.shape[-1] != 1:
        raise ValueError(f"model input must have shape (N, C, L, 1), got {tuple(x.shape)}")
    return x.squeeze(-1)


class SqueezeExcite(nn.Module):
    """Channel attention: global average -> FC (reduced) -> SiLU -> FC -> sigmoid -> scale."""

    def __init__(self, channels, reduction=4):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x):
        w = x.mean(dim=2)
        w = torch.sigmoid(self.fc2(self.act(self.fc1(w))))
        return x * w.unsqueeze(2)


class ConvSiLUBN(nn.Sequential):
    """The AFNet block: Conv1d (no padding) -> SiLU -> BatchNorm, as the original ordered it."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=2):
        super().__init__(nn.Conv1d(in_channels, out_channels, kernel_size, stride),
                         nn.SiLU(), nn.BatchNorm1d(out_channels))


class AFNetBody(nn.Module):
    """AFNet from a config: conv blocks, squeeze-excite after given blocks, dropout, 2-layer head.

    config keys: in_channels, channels (list), kernels (list), stride, se_after (block
    indices, 0-based), fc_in, fc_hidden, num_classes, dropout.
    """

    def __init__(self, config):
        super().__init__()
        layers, prev = [], config['in_channels']
        for i, (ch, k) in enumerate(zip(config['channels'], config['kernels'])):
            layers.append(ConvSiLUBN(prev, ch, k, config['stride']))
            if i in config['se_after']:
                layers.append(SqueezeExcite(ch, 4))
            prev = ch
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(config['dropout']),
                                  nn.Linear(config['fc_in'], config['fc_hidden']), nn.SiLU(),
                                  nn.Linear(config['fc_hidden'], config['num_classes']))

    def forward(self, x):
        return self.head(self.features(to_1d(x)))


def afnet_config(channels, kernels, fc_hidden, input_size, in_channels=1, num_classes=2,
                 stride=2, se_after=(2, 4), dropout=0.5):
    """A complete AFNetBody config; fc_in follows from input_size through the conv stack."""
    length = input_size
    for k in kernels:
        length = conv_output_length(length, k, stride)
        if length < 1:
            raise ValueError(f"input_size={input_size} is too short for kernels {list(kernels)} "
                             f"at stride {stride}: the conv stack leaves no samples")
    return dict(in_channels=in_channels, channels=list(channels), kernels=list(kernels),
                stride=stride, se_after=tuple(se_after), fc_in=channels[-1] * length,
                fc_hidden=fc_hidden, num_classes=num_classes, dropout=dropout)
