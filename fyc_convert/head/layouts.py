"""Wrappers that let a fixed head stand where a classifier is not an nn.Linear on (..., N) features.

A 1×1 `Conv2d` (groups 1) on globally pooled (B, N, 1, 1) features is a Linear over the channel axis. `ConvHead`
holds a head that sees (..., N) features — first an nn.Linear with the conv's weights (the same function), then
the fixed head that replaces it — and moves the channels last around it. The exporter's marker replaces the
inner head (`<conv layer>.head`) and sees rank-4 (B, 1, 1, N) features.
"""

from __future__ import annotations

from torch import Tensor, nn

WRAPPED_HEAD = "head"  # attribute of ConvHead that holds the inner head: its dotted name is f"{layer}.head"


class ConvHead(nn.Module):
    """A classifier over the channel axis, as a 1×1 Conv2d computes it: (B, N, *spatial) -> (B, C, *spatial).

    Args:
        head: a module mapping (..., N) -> (..., C): nn.Linear, HadamardHead, OrthogonalHead.
    """

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: Tensor) -> Tensor:
        # (B, N, h, w) -> (B, h, w, N) -> head -> (B, h, w, C) -> (B, C, h, w). Non-negative dims: the TorchScript
        # exporter writes movedim(-1, 1) as a Transpose with perm [0, -1, 1, 2], which ONNX refuses.
        last = x.dim() - 1
        y = self.head(x.permute(0, *range(2, last + 1), 1))
        return y.permute(0, last, *range(1, last))


def is_pointwise_conv(module: nn.Module) -> bool:
    """A Conv2d that mixes channels only: 1×1 kernel, stride 1, no padding or dilation, groups 1."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1) and tuple(module.stride) == (1, 1)
            and module.groups == 1 and tuple(module.dilation) == (1, 1)
            and (module.padding in ("valid", "same") or tuple(module.padding) == (0, 0)))


def conv_as_linear(conv: nn.Conv2d) -> nn.Linear:
    """The nn.Linear computing what a pointwise Conv2d does at each position (weights (C, N, 1, 1) copied as (C, N))."""
    assert is_pointwise_conv(conv), "only a 1x1, stride-1, ungrouped Conv2d is a Linear over channels"
    weight = conv.weight.detach()
    linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None,
                       device=weight.device, dtype=weight.dtype)
    with_grad = conv.weight.requires_grad
    linear.weight.data.copy_(weight.reshape(conv.out_channels, conv.in_channels))
    linear.weight.requires_grad_(with_grad)
    if conv.bias is not None:
        linear.bias.data.copy_(conv.bias.detach())
        linear.bias.requires_grad_(conv.bias.requires_grad)
    linear.train(conv.training)
    return linear
