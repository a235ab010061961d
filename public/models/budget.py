"""A stage-two architecture made for a small file budget: width-scaled depthwise-separable
blocks with global average pooling (the default public/ss_model.py).

    config = budget_config(channel_scale=3, fc_scale=2, input_size=1250)
    model = BudgetNet(config)          # input (N, C, L, 1) -> logits (N, num_classes)

Layers: a stem convolution with stride 4 (one strided convolution, as the TDC-2022 winner
used: it quarters the length the later layers work on, which makes a training step about
1.7x faster than stride 2, bench/README.md), then depthwise-separable blocks (a depthwise
convolution over time per channel, then a 1x1 pointwise convolution mixing channels), each
with BatchNorm + ReLU and stride 2 (receptive field 489 samples at the defaults); global average pooling over time; a head of dropout,
Linear(last width -> hidden), ReLU, Linear(hidden -> classes).

Scaling: the conv widths are BASE_WIDTHS x channel factor (the stem has the first width,
so even factor 1 starts with 4 channels), the hidden width of the head is
BASE_HIDDEN x fc factor. Because of the global average pooling no layer's size depends on
the input length: the file size grows with the factors only (about quadratically with the
channel factor, through the 1x1 convolutions, linearly with the fc factor), not with the
signal length, as a width-scaled AFNet's flattened FC layer does.
"""
from torch import nn

from public.models.blocks import to_1d

BASE_WIDTHS = (4, 6, 8, 12, 16)    # stem, then one separable block per further width
BASE_HIDDEN = 8                     # head hidden units per fc factor
KERNEL = 9                          # stem and depthwise kernel (odd: 'same' padding k // 2)
STRIDE = 2                          # each separable block halves the length
STEM_STRIDE = 4                     # the stem quarters it


def budget_config(channel_scale, fc_scale, input_size, in_channels=1, num_classes=2,
                  kernel=KERNEL, dropout=0.2, stem_stride=STEM_STRIDE):
    """A complete BudgetNet config: widths BASE_WIDTHS x channel_scale, head hidden
    BASE_HIDDEN x fc_scale. The input must survive the stem and the stride-2 blocks."""
    if channel_scale < 1 or fc_scale < 1:
        raise ValueError(f"scaling factors must be >= 1, got channel {channel_scale}, "
                         f"fc {fc_scale}")
    shortest = stem_stride * STRIDE ** (len(BASE_WIDTHS) - 1)
    if input_size < shortest:
        raise ValueError(f"input_size={input_size} is too short: BudgetNet divides the length "
                         f"by {stem_stride} then halves it {len(BASE_WIDTHS) - 1} times "
                         f"(needs >= {shortest})")
    return dict(in_channels=in_channels, channels=[w * channel_scale for w in BASE_WIDTHS],
                kernel=kernel, stride=STRIDE, stem_stride=stem_stride,
                fc_hidden=BASE_HIDDEN * fc_scale,
                num_classes=num_classes, dropout=dropout, input_size=input_size)


def conv_bn_relu(c_in, c_out, k, stride=1, groups=1):
    """Conv1d ('same' padding, no bias) -> BatchNorm -> ReLU."""
    return [nn.Conv1d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm1d(c_out), nn.ReLU()]


def separable_block(c_in, c_out, k, stride):
    """Depthwise conv over time (stride) then pointwise 1x1 conv, each with BN + ReLU."""
    return nn.Sequential(*conv_bn_relu(c_in, c_in, k, stride, groups=c_in),
                         *conv_bn_relu(c_in, c_out, 1))


class BudgetNet(nn.Module):
    """Width-scaled separable net from a budget_config() dict: stem, separable blocks,
    global average pooling, 2-layer head."""

    def __init__(self, config):
        super().__init__()
        widths, k, stride = config['channels'], config['kernel'], config['stride']
        layers = conv_bn_relu(config['in_channels'], widths[0], k,
                              config.get('stem_stride', stride))
        for c_in, c_out in zip(widths, widths[1:]):
            layers.append(separable_block(c_in, c_out, k, stride))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(config['dropout']),
                                  nn.Linear(widths[-1], config['fc_hidden']), nn.ReLU(),
                                  nn.Linear(config['fc_hidden'], config['num_classes']))

    def forward(self, x):
        return self.head(self.features(to_1d(x)).mean(dim=2))
