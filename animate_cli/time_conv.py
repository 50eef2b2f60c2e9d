"""SVD's temporal convolutions in other forms (the preset field time_conv).

The temporal layers of SVD's UNet and of its VAE decoder mix frames with nn.Conv3d whose kernel spans time
only: k x 1 x 1 (k = 3), padding only in time. Two other forms of the same sums:
  "conv2d":        over a video [B, C, T, H, W] it is a 2D convolution over [B, C, T, H*W] with a k x 1 kernel,
                   handed to cuDNN's 2D kernels (and inductor's channels-last layout for 2D convolutions);
  "channels_last": the Conv3d itself, its weight and its input in channels-last-3d (NDHWC) memory, the layout
                   cuDNN's 3D kernels work in, so it need not transpose around each call.
The weight and bias stay the module's own parameters under the same names, so state dicts and students are
unaffected.
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


def time_only_convs(module: nn.Module) -> list[tuple[str, nn.Conv3d]]:
    return [(name, child) for name, child in module.named_modules() if can_replace(child)]


def apply_time_conv(module: nn.Module) -> int:
    """Replace every time-only Conv3d under `module` in place; returns how many."""
    targets = time_only_convs(module)
    for name, conv in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, TimeConv(conv))
    return len(targets)


def to_channels_last(conv: nn.Conv3d) -> None:
    """The Conv3d in channels-last-3d: its weight once, its input at every call (a forward pre-hook)."""
    conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last_3d)
    conv.register_forward_pre_hook(channels_last_input)


def channels_last_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(memory_format=torch.channels_last_3d), *args[1:])


def apply_channels_last(module: nn.Module) -> int:
    """Every time-only Conv3d under `module` to channels-last-3d, in place; returns how many."""
    targets = time_only_convs(module)
    for _, conv in targets:
        to_channels_last(conv)
    return len(targets)
