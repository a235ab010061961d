"""Architectures designed for a small file budget (<= 20 KB of ONNX), chosen by name:
`MODELS = ('SepNet',)` in params.py (they are not in public/model.py's default search).

SepNet: a strided stem, then depthwise-separable blocks (a depthwise convolution over time
per channel, then a 1x1 pointwise convolution mixing channels), each halving the length;
global average pooling and one linear layer. A separable block costs c*k + c*c' weights
instead of c*c'*k, so the budget goes to more channels and a wider receptive field than
a width-scaled AFNet of the same file size.
"""
from torch import nn

from public.models.blocks import to_1d
from public.models.registry import register_model


def _separable(c_in, c_out, k, stride):
    return nn.Sequential(
        nn.Conv1d(c_in, c_in, k, stride, k // 2, groups=c_in, bias=False), nn.BatchNorm1d(c_in),
        nn.ReLU(), nn.Conv1d(c_in, c_out, 1, bias=False), nn.BatchNorm1d(c_out), nn.ReLU())


@register_model
class SepNet(nn.Module):
    """Stem conv 12 (k 9, stride 2), separable blocks 12-16-24-32-40 (k 9, stride 2),
    global average pool, dropout 0.2, linear to classes: 19.4 KB of ONNX (3,986 weights)."""

    WIDTHS = (12, 16, 24, 32, 40)

    def __init__(self, input_size=1250, in_channels=1, num_classes=2, kernel=9):
        super().__init__()
        if input_size < 2 ** len(self.WIDTHS):
            raise ValueError(f"SepNet needs input_size >= {2 ** len(self.WIDTHS)}, got {input_size}")
        layers = [nn.Conv1d(in_channels, self.WIDTHS[0], kernel, 2, kernel // 2, bias=False),
                  nn.BatchNorm1d(self.WIDTHS[0]), nn.ReLU()]
        for c_in, c_out in zip(self.WIDTHS, self.WIDTHS[1:]):
            layers.append(_separable(c_in, c_out, kernel, 2))
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.WIDTHS[-1], num_classes))

    def forward(self, x):
        return self.head(self.features(to_1d(x)).mean(dim=2))
