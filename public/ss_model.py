"""Stage-two model: a budget-native separable net (public/models/budget.py), scaled by width.

The default since issue 20 (docs/recipe.md has the measurement). train_final.py calls
`generate_config(channel_scaling_factor, fc_scaling_factor, input_size)` for every pair of
CHANNEL_SCALES x FC_SCALES and builds `AFNet(config)`; here `AFNet` is an alias of
BudgetNet (stage two looks the class up by the name AFNet; its logs name it BudgetNet).
Conv widths (4, 6, 8, 12, 16) x channel factor (a stride-4 stem, then depthwise-separable
blocks, each halving the length), global average pooling, and a head with 8 x fc factor
hidden units. No layer grows with the input length, so the whole budget goes to width:
at input 1250 the INT8 files run from 7.3 KB (c1-f1) to 25.7 KB (c5-f5), 19 of the 25
default candidates within 20 KB. The original AFNet scaling is examples/ss_model_afnet.py:
copy it over this file to restore it. To use another architecture, replace both names:
`generate_config` returns any dict your class understands, and the class (stage two builds
it by the name AFNet) takes input (N, C, L, 1) and returns logits (N, num_classes).
"""
from public.models.budget import BudgetNet, budget_config


def generate_config(channel_scaling_factor, fc_scaling_factor, input_size,
                    in_channels=1, num_classes=2):
    """Layer widths of the stage-two BudgetNet at the given scaling factors."""
    return budget_config(channel_scaling_factor, fc_scaling_factor, input_size,
                         in_channels=in_channels, num_classes=num_classes)


AFNet = BudgetNet       # the name stage two builds (public/search/stage_two.py)
