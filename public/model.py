"""Stage-one candidate models. Register a model with @register_model next to its definition.

Every model is built as `Model(input_size, in_channels=1, num_classes=2)`, takes input
(N, in_channels, input_size, 1) and returns logits (N, num_classes). Layer sizes follow
from input_size. `model_classes` (the search order of train_multi.py) is derived from the
registry: the order of definition below.
"""
import torch
from torch import nn

from public.models.blocks import AFNetBody, SqueezeExcite, afnet_config, to_1d
from public.models.registry import model_classes as _registered

__all__ = ['AFNet', 'ShuffleNetV2', 'OptimizedAFNet', 'model_classes']

from public.models.registry import register_model


@register_model
class AFNet(AFNetBody):
    """The original ATML AFNet: 5 conv blocks (4-8-16-32-32, kernels 6-5-4-4-4, stride 2),
    squeeze-excite after blocks 3 and 5, dropout 0.5, FC -> 10 -> SiLU -> classes."""

    def __init__(self, input_size=1250, in_channels=1, num_classes=2):
        super().__init__(afnet_config(channels=(4, 8, 16, 32, 32), kernels=(6, 5, 4, 4, 4),
                                      fc_hidden=10, input_size=input_size,
                                      in_channels=in_channels, num_classes=num_classes))


def _channel_shuffle(x, groups=2):
    n, c, length = x.shape
    return x.view(n, groups, c // groups, length).transpose(1, 2).reshape(n, c, length)


class _ShuffleUnit(nn.Module):
    """ShuffleNet-V2 unit: stride 1 splits channels and transforms one half; stride 2
    transforms both (depthwise-separable) branches and doubles the resolution step."""

    def __init__(self, in_channels, out_channels, stride, kernel_size=5):
        super().__init__()
        self.stride = stride
        branch = out_channels // 2
        pad = kernel_size // 2
        if stride == 2:
            self.branch1 = nn.Sequential(
                nn.Conv1d(in_channels, in_channels, kernel_size, 2, pad, groups=in_channels, bias=False),
                nn.BatchNorm1d(in_channels),
                nn.Conv1d(in_channels, branch, 1, bias=False), nn.BatchNorm1d(branch), nn.ReLU())
            branch_in = in_channels
        else:
            self.branch1 = None
            branch_in = branch
        self.branch2 = nn.Sequential(
            nn.Conv1d(branch_in, branch, 1, bias=False), nn.BatchNorm1d(branch), nn.ReLU(),
            nn.Conv1d(branch, branch, kernel_size, stride, pad, groups=branch, bias=False),
            nn.BatchNorm1d(branch),
            nn.Conv1d(branch, branch, 1, bias=False), nn.BatchNorm1d(branch), nn.ReLU())

    def forward(self, x):
        if self.branch1 is None:
            keep, transform = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(transform)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return _channel_shuffle(out)


@register_model
class ShuffleNetV2(nn.Module):
    """A small 1-D ShuffleNet-V2: stem conv (16 ch, stride 2) + max pool, stages at 32/64/128
    channels with 2/2/1 units, squeeze-excite, global average pool, linear -> classes."""

    def __init__(self, input_size=1250, in_channels=1, num_classes=2,
                 stage_channels=(32, 64, 128), stage_units=(2, 2, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv1d(in_channels, 16, 7, 2, 3, bias=False),
                                  nn.BatchNorm1d(16), nn.ReLU(), nn.MaxPool1d(3, 2, 1))
        units, prev = [], 16
        for channels, count in zip(stage_channels, stage_units):
            units.append(_ShuffleUnit(prev, channels, stride=2))
            units += [_ShuffleUnit(channels, channels, stride=1) for _ in range(count - 1)]
            prev = channels
        self.stages = nn.Sequential(*units)
        self.se = SqueezeExcite(prev, 4)
        self.fc = nn.Linear(prev, num_classes)

    def forward(self, x):
        x = self.se(self.stages(self.stem(to_1d(x))))
        return self.fc(x.mean(dim=2))


@register_model
class OptimizedAFNet(nn.Module):
    """A compact AFNet: 3 conv blocks (8-16-32, kernels 7-5-3, stride 2, BatchNorm,
    LeakyReLU 0.1), global average pool, dropout 0.5, FC 32 -> 16 -> classes."""

    def __init__(self, input_size=1250, in_channels=1, num_classes=2):
        super().__init__()
        blocks, prev = [], in_channels
        for channels, k in zip((8, 16, 32), (7, 5, 3)):
            blocks += [nn.Conv1d(prev, channels, k, 2, k // 2), nn.BatchNorm1d(channels),
                       nn.LeakyReLU(0.1)]
            prev = channels
        self.features = nn.Sequential(*blocks)
        self.head = nn.Sequential(nn.Dropout(0.5), nn.Linear(32, 16), nn.LeakyReLU(0.1),
                                  nn.Linear(16, num_classes))

    def forward(self, x):
        return self.head(self.features(to_1d(x)).mean(dim=2))


# The search order of train_multi.py: every registered model, in definition order.
model_classes = _registered()
