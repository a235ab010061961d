# The original stage-two scaling (AFNet widths x factors), public/ss_model.py before issue 20: copy it over public/ss_model.py to restore it.
"""Stage-two model: the architecture chosen from multi-result, parameterised by width.

train_final.py calls `generate_config(channel_scaling_factor, fc_scaling_factor,
input_size)` for every pair of CHANNEL_SCALES x FC_SCALES and builds `AFNet(config)`.
The original ATML scaling: AFNet with conv channels (1, 2, 4, 8, 8) x channel factor and
hidden FC width 5 x fc factor (channel 4, fc 2 is stage one's AFNet). To use another
architecture, replace both functions: `generate_config` returns any dict your class understands and
the class must accept input (N, C, L, 1) and return logits (N, num_classes).
"""
from public.models.blocks import AFNetBody, afnet_config


def generate_config(channel_scaling_factor, fc_scaling_factor, input_size,
                    in_channels=1, num_classes=2):
    """Layer widths of the stage-two AFNet at the given scaling factors."""
    channels = [base * channel_scaling_factor for base in (1, 2, 4, 8, 8)]
    return afnet_config(channels=channels, kernels=(6, 5, 4, 4, 4),
                        fc_hidden=5 * fc_scaling_factor, input_size=input_size,
                        in_channels=in_channels, num_classes=num_classes)


class AFNet(AFNetBody):
    """AFNet built from a generate_config() dict."""
