"""Multiply-accumulate counts with `torch.utils.flop_counter` (no hand-written counter)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    # PyTorch's counter knows the CUDA attention kernels; the CPU kernel has no entry, so count it with the
    # same formula (two batched matmuls).
    return sdpa_flop_count(query, key, value)


_CUSTOM = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops}  # noqa: SLF001 - the op's name


def count_macs(model: nn.Module, input_size: int | tuple[int, int] = 224, batch_size: int = 1) -> int:
    """Multiply-accumulates of one forward pass per image (FLOPs / 2), measured on a random input."""
    h, w = (input_size, input_size) if isinstance(input_size, int) else input_size
    in_chans = getattr(getattr(model, "cfg", None), "in_chans", 3)
    param = next(model.parameters())
    x = torch.randn(batch_size, in_chans, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
            model(x)
    finally:
        model.train(was_training)
    return counter.get_total_flops() // 2 // batch_size
