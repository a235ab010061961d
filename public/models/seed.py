"""The seed systems' model architectures, registered like any other ATML model.

    import public.models.seed                       # registers SEResNet1d and HeartbeatCNN
    model = get_model_class('SEResNet1d')(input_size=5000, in_channels=8, num_classes=2)

Importing this module adds them to the registry (after public/model.py's models); stage
one trains them when MODELS names them. Like every registered model they are built as
`Model(input_size, in_channels=1, num_classes=2)`, take (N, C, input_size, 1) and return
logits (N, num_classes) for cross-entropy; layer sizes follow from input_size.

- SEResNet1d (seed 002, 8-lead ECG of 5000 samples, normal vs arrhythmia): a 1-D ResNet
  whose basic blocks end in squeeze-excite. The seed used ResNet-34 depths (3, 4, 6, 3)
  and a sigmoid output; the default here is one block per stage at 16..128 channels
  (~0.25 M parameters) and logits; `blocks=(3, 4, 6, 3)` gives the seed's depth.
- HeartbeatCNN (seed 003, Tianchi heartbeats of 205 samples, 4 classes): four convs
  64-128-256-256 with BatchNorm and LeakyReLU(0.05), max pooling after convs 1, 2 and 4,
  dropout 0.2, an MLP head flatten -> 4096 -> 64 -> classes with BatchNorm. The flatten
  width is 256 * (input_size // 8), not the seed's hard-coded 256 * 25, so any input size
  works; the first FC layer dominates the size (27 M parameters at 205, 164 M at 1250:
  pass fc_hidden=64 for a small variant).
"""
from torch import nn

from public.models.blocks import SqueezeExcite, to_1d
from public.models.registry import register_model

__all__ = ['SEResNet1d', 'HeartbeatCNN']


class _SEBasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN, squeeze-excite on the residual, + shortcut, ReLU. A 1x1 conv
    shortcut (with BN) when the stride or the channel count changes."""

    def __init__(self, in_channels, out_channels, stride, kernel_size):
        super().__init__()
        pad = kernel_size // 2
        self.conv1 = nn.Conv1d(in_channels, out_channels, kernel_size, stride, pad, bias=False)
        self.bn1 = nn.BatchNorm1d(out_channels)
        self.conv2 = nn.Conv1d(out_channels, out_channels, kernel_size, 1, pad, bias=False)
        self.bn2 = nn.BatchNorm1d(out_channels)
        self.se = SqueezeExcite(out_channels, reduction=4)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm1d(out_channels))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.se(self.bn2(self.conv2(out)))
        return self.relu(out + self.shortcut(x))


@register_model
class SEResNet1d(nn.Module):
    """1-D SE-ResNet (seed 002): stem conv (kernel 7, stride 2) + BN + ReLU + max pool,
    stages of SE basic blocks (the first block of stages 2.. has stride 2), global average
    pool, linear -> classes. 'Same' padding and global pooling: any input_size works."""

    def __init__(self, input_size=5000, in_channels=1, num_classes=2,
                 channels=(16, 32, 64, 128), blocks=(1, 1, 1, 1), kernel_size=7):
        super().__init__()
        if len(channels) != len(blocks):
            raise ValueError(f"channels {tuple(channels)} and blocks {tuple(blocks)} must have "
                             f"one entry per stage")
        self.stem = nn.Sequential(nn.Conv1d(in_channels, channels[0], 7, 2, 3, bias=False),
                                  nn.BatchNorm1d(channels[0]), nn.ReLU(),
                                  nn.MaxPool1d(3, 2, 1))
        stages, prev = [], channels[0]
        for i, (width, count) in enumerate(zip(channels, blocks)):
            stride = 1 if i == 0 else 2
            units = []
            for j in range(count):
                units.append(_SEBasicBlock(prev, width, stride if j == 0 else 1, kernel_size))
                prev = width
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.stages(self.stem(to_1d(x)))
        return self.fc(x.mean(dim=2))


@register_model
class HeartbeatCNN(nn.Module):
    """The Tianchi heartbeat CNN (seed 003): conv 64-128-256-256 (kernels 7-5-3-3, 'same'
    padding) with BN + LeakyReLU(0.05), max pool /2 after convs 1, 2 and 4, dropout 0.2,
    then flatten -> fc_hidden -> fc_hidden2 -> classes with BN + LeakyReLU between."""

    def __init__(self, input_size=205, in_channels=1, num_classes=2, fc_hidden=4096,
                 fc_hidden2=64, dropout=0.2):
        super().__init__()
        length = input_size // 2 // 2 // 2       # three MaxPool1d(2); the convs keep length
        if length < 1:
            raise ValueError(f"input_size={input_size} is too short for HeartbeatCNN: its "
                             f"three /2 poolings need at least 8 samples")

        def conv(cin, cout, k):
            return [nn.Conv1d(cin, cout, k, 1, k // 2), nn.BatchNorm1d(cout), nn.LeakyReLU(0.05)]

        pool = nn.MaxPool1d(2)
        self.features = nn.Sequential(*conv(in_channels, 64, 7), pool, *conv(64, 128, 5), pool,
                                      *conv(128, 256, 3), *conv(256, 256, 3), pool,
                                      nn.Dropout(dropout))
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(256 * length, fc_hidden), nn.BatchNorm1d(fc_hidden), nn.LeakyReLU(0.05),
            nn.Linear(fc_hidden, fc_hidden2), nn.BatchNorm1d(fc_hidden2), nn.LeakyReLU(0.05),
            nn.Linear(fc_hidden2, num_classes))

    def forward(self, x):
        return self.head(self.features(to_1d(x)))
