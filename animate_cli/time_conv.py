"""SVD's temporal convolutions as 2D convolutions.

The temporal layers of SVD's UNet and of its VAE decoder mix frames with nn.Conv3d whose kernel spans time
only: k x 1 x 1 (k = 3), padding only in time. Over a video [B, C, T, H, W] that is a 2D convolution over
[B, C, T, H*W] with a k x 1 kernel: the same products and sums, handed to cuDNN's 2D convolution kernels
(and to inductor's channels-last layout for 2D convolutions) instead of its 3D ones. The weight and bias
stay the module's own parameters under the same names, so state dicts and students are unaffected.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TimeConv(nn.Module):
    """A drop-in for an nn.Conv3d with a k x 1 x 1 kernel (stride 1, no dilation or groups, zero padding in time
    only), run as F.conv2d."""

    def __init__(self, conv: nn.Conv3d):
        super().__init__()
        if not can_replace(conv):
            raise ValueError(f"not a time-only convolution: {conv}")
        self.weight, self.bias = conv.weight, conv.bias  # the same Parameter objects
        self.padding = conv.padding[0]
        self.in_channels, self.out_channels = conv.in_channels, conv.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = F.conv2d(x.reshape(b, c, t, h * w), self.weight.squeeze(-1), self.bias, padding=(self.padding, 0))
        return y.view(b, self.out_channels, y.shape[2], h, w)

    def extra_repr(self) -> str:
        k = self.weight.shape[2]
        return f"{self.in_channels}, {self.out_channels}, kernel ({k}, 1, 1) as 2D, padding {self.padding}"


def can_replace(conv: nn.Module) -> bool:
    return (isinstance(conv, nn.Conv3d) and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str) and tuple(conv.padding[1:]) == (0, 0))


def apply_time_conv(module: nn.Module) -> int:
    """Replace every time-only Conv3d under `module` in place; returns how many."""
    targets = [(name, child) for name, child in module.named_modules() if can_replace(child)]
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, TimeConv(conv))
    return len(targets)
