"""The BatchNorm of CvT's q/k/v projections: nn.BatchNorm2d plus what checkpointing, DDP on CPU and a fast CPU
backward need; and BatchNorm folded into the convolution before it (fast path `fold_batchnorm`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .checkpoint import recomputing
from .config import functorch_active, fx_tracing, is_enabled


class _DenseGradient(torch.autograd.Function):
    """Identity forward; backward hands on the gradient as a dense channels-last map.

    In the last stage q, k and v are concatenated after the cls token, so the gradient reaching each projection is
    a slice of a (B, 1 + T, C) tensor: strided by 1 + T tokens per image. CPU BatchNorm's backward has no fast
    path for that layout; one copy here serves the BatchNorm and the convolution behind it. Dense gradients pass
    unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class BatchNorm2d(nn.BatchNorm2d):
    """nn.BatchNorm2d (same parameters, buffers and eval function) with, in training mode:

    - `checkpointed` (set by `Stage.grad_checkpointing`): the recomputation of a checkpointed block leaves the
      running statistics alone, so checkpointing does not change the model;
    - `sync` (set by `CvT.set_sync_batchnorm`): under torch.distributed, statistics of all processes' batches on
      any backend (`sync_batch_norm`; nn.SyncBatchNorm runs on GPUs only);
    - fast path `dense_gradient` on CPU.
    """

    def __init__(self, num_features: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.sync = False
        # Only in a checkpointed block can a forward be a recomputation, so only then is the flag read.
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.batch_norm as nn.BatchNorm2d calls it (momentum a number, statistics tracked, as built), without its
        # Python check of the input's rank, which torch.fx could not trace.
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if not torch.jit.is_scripting():
            return self._forward_train(x)
        self.num_batches_tracked.add_(1)  # TorchScript: the plain training step
        momentum = 0.0 if self.momentum is None else self.momentum
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)

    @torch.jit.unused
    def _forward_train(self, x: torch.Tensor) -> torch.Tensor:
        again = self.checkpointed and recomputing()
        if not again:  # momentum 0 below keeps the running statistics as the first pass left them
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if again else self.momentum
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            x = sync_batch_norm(x, self, momentum)
        else:
            x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, True, momentum, self.eps)
        if (is_enabled("dense_gradient") and torch.is_grad_enabled() and not fx_tracing()
                and x.device.type == "cpu" and not functorch_active()):
            x = _DenseGradient.apply(x)
        return x


def sync_batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d, momentum: float) -> torch.Tensor:
    """Training-mode BatchNorm of `x` (B, C, H, W) with the statistics of the batch over all processes, so that
    N DDP processes normalise as one process with the whole batch would. PyTorch's SyncBatchNorm runs on GPUs
    only; this runs on any backend (gloo on CPU included), with the same maths: each process's mean, variance
    and count are exchanged and combined (Chan et al.), and gradients flow back through the exchange."""
    from torch.distributed.nn.functional import all_reduce

    c = x.shape[1]
    xf = x.float()  # statistics in float32 under autocast, as F.batch_norm keeps them
    var, mean = torch.var_mean(xf, dim=(0, 2, 3), correction=0)
    count = xf.new_full((1,), xf.numel() // c)
    world, rank = dist.get_world_size(), dist.get_rank()
    # An all-gather written as an all-reduce of rows that are zero except each process's own: autograd's
    # all_gather needs reduce-scatter or all-to-all, which gloo lacks; all_reduce's backward is an all_reduce.
    mine = torch.cat([mean, var, count])[None]
    rows = all_reduce(torch.cat([mine.new_zeros(rank, 2 * c + 1), mine, mine.new_zeros(world - rank - 1, 2 * c + 1)]))
    means, variances, counts = rows[:, :c], rows[:, c : 2 * c], rows[:, 2 * c :]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (counts * (variances + (means - mean) ** 2)).sum(0) / total
    if momentum and bn.running_mean is not None:
        with torch.no_grad():  # as F.batch_norm: the running variance is the unbiased one
            bn.running_mean.lerp_(mean.to(bn.running_mean.dtype), momentum)
            unbiased = var * total / (total - 1).clamp(min=1)
            bn.running_var.lerp_(unbiased.to(bn.running_var.dtype), momentum)
    scale = torch.rsqrt(var + bn.eps) * bn.weight
    out = (xf - mean.view(1, c, 1, 1)) * scale.view(1, c, 1, 1) + bn.bias.view(1, c, 1, 1)
    return out.to(x.dtype)


def folded_weight_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of one convolution equal to `conv` (without bias) followed by eval-mode `bn`."""
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)  # (C,)
    return conv.weight * scale.view(-1, 1, 1, 1), bn.bias - bn.running_mean * scale


def conv_bn_folded(conv: nn.Conv2d, bn: nn.BatchNorm2d, x: torch.Tensor) -> torch.Tensor:
    """`bn(conv(x))` in eval mode as one convolution."""
    weight, bias = folded_weight_bias(conv, bn)
    return F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
