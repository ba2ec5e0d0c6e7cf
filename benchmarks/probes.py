"""What the comparison (benchmarks/comparison.py) measures on a trained model: shift consistency, attention
distance, accuracy at other input sizes, and the stage-1 key/value stride. Plain functions of a model and uint8
images; `comparison.py` runs them over the run folders and writes the JSON.

Every model is called on images normalised as it was trained (its run's preprocess.json), in eval mode.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cvt.layers import fast_paths
from cvt.model import Attention as CvTAttention
from cvt.model import ConvProjection

# ---------------------------------------------------------------------------------------------------------------
# Loading a trained contestant
# ---------------------------------------------------------------------------------------------------------------


def load_run(folder: Path, any_size: bool = False) -> tuple[nn.Module, tuple[float, ...], tuple[float, ...]]:
    """A run's final model in eval mode with its normalisation (mean, std). `any_size`: a timm ViT is rebuilt
    with `dynamic_img_size=True` (its position embedding interpolated to the token grid, timm's way) so it takes
    inputs of other sides; the other models take any side as built."""
    from cvt.commands import load_classifier
    from cvt.tasks.classification import build_timm_classifier

    pre = json.loads((folder / "preprocess.json").read_text())
    model = load_classifier(str(folder), torch.device("cpu"), "probe")
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text()) if config_path.exists() else {}
    if any_size and str(config.get("timm_model", "")).startswith("vit_"):
        rebuilt = build_timm_classifier(config["timm_model"], num_classes=config["num_classes"],
                                        in_chans=config["in_chans"], dynamic_img_size=True, **config["model_args"])
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt.eval()
    return model, tuple(pre["mean"]), tuple(pre["std"])


def normalise(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 (B, 1, H, W) -> float, as `cvt.data.BatchTransform` does at evaluation."""
    x = images.float().div(255)
    return (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)


@torch.inference_mode()
def predict(model: nn.Module, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    return torch.cat([model(x[i : i + batch]).argmax(-1) for i in range(0, len(x), batch)])


def resize(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images resized to `side` as training resizes (bicubic, antialiased, clamped), still uint8."""
    x = F.interpolate(images.float(), size=(side, side), mode="bicubic", antialias=True, align_corners=None)
    return x.round().clamp_(0, 255).to(torch.uint8)


def pad_to(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 images centred on a `side` px canvas of background (0), or centre-cropped to it."""
    h = images.shape[-1]
    if side < h:
        a = (h - side) // 2
        return images[..., a : a + side, a : a + side]
    a = (side - h) // 2
    return F.pad(images, (a, side - h - a, a, side - h - a))


# ---------------------------------------------------------------------------------------------------------------
# Shift consistency (Zhang, ICML 2019)
# ---------------------------------------------------------------------------------------------------------------
@torch.inference_mode()
def shift_consistency(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean, std, canvas: int = 36,
                      window: bool = False) -> dict[str, Any]:
    """Each image moved over every offset of a `canvas` px background (0..canvas-side in each axis). The model
    sees the whole canvas, or with `window` the image's own side cut from the canvas centred on the image, so the
    item moves by up to (canvas-side)/2 px inside the frame the model was trained on (Zhang's crops), its border
    cut where it leaves. Returns the accuracy at each offset, how often the prediction is the same for
    horizontally and for vertically adjacent offsets (1 px apart), and Zhang's consistency: the chance that two
    distinct offsets drawn at random give the same top-1 class."""
    n, side = len(images), images.shape[-1]
    span = canvas - side + 1
    margin = (canvas - side) // 2
    preds = torch.empty(span, span, n, dtype=torch.long)
    for oy in range(span):
        for ox in range(span):
            placed = F.pad(images, (ox, canvas - side - ox, oy, canvas - side - oy))  # (N, 1, canvas, canvas)
            if window:
                placed = placed[..., margin : margin + side, margin : margin + side]
            preds[oy, ox] = predict(model, normalise(placed, mean, std))
    correct = (preds == labels).float()  # (span, span, n)
    same_x = (preds[:, 1:] == preds[:, :-1]).float().mean().item()  # 1 px apart horizontally
    same_y = (preds[1:] == preds[:-1]).float().mean().item()
    flat = preds.reshape(span * span, n)
    counts = F.one_hot(flat, int(flat.max()) + 1).sum(0).float()  # (n, classes): offsets predicting each class
    k = span * span
    pairs_same = (counts * (counts - 1)).sum(-1) / (k * (k - 1))  # per image: P(two distinct offsets agree)
    return dict(
        canvas=canvas, model_input=side if window else canvas, offsets_per_axis=span, images=n,
        accuracy_by_offset=[[round(100 * v, 2) for v in row] for row in correct.mean(-1).tolist()],
        accuracy_mean=round(100 * correct.mean().item(), 2),
        accuracy_min=round(100 * correct.mean(-1).min().item(), 2),
        accuracy_max=round(100 * correct.mean(-1).max().item(), 2),
        adjacent_same_x=round(100 * same_x, 2), adjacent_same_y=round(100 * same_y, 2),
        consistency=round(100 * pairs_same.mean().item(), 2),
    )


# ---------------------------------------------------------------------------------------------------------------
# Mean attention distance (ConViT's measure)
# ---------------------------------------------------------------------------------------------------------------
def _grid_centres(h: int, w: int, step: float, offset: float) -> torch.Tensor:
    """(h*w, 2) pixel centres of a token grid: token (i, j) at (offset + i * step, offset + j * step)."""
    ii, jj = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack((ii.flatten(), jj.flatten()), -1).float() * step + offset


def _distance(p: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor) -> tuple[list[float], float]:
    """Attention-weighted mean query-key distance per head, and the same under uniform attention, from
    probabilities p (B, heads, Tq, Tk) over spatial tokens only (renormalised)."""
    p = p / p.sum(-1, keepdim=True)
    d = torch.cdist(q_pos, k_pos)  # (Tq, Tk)
    per_head = (p * d).sum(-1).mean((0, 2))  # (heads,)
    return [round(v, 3) for v in per_head.tolist()], round(d.mean().item(), 3)


@torch.inference_mode()
def cvt_attention_distance(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per attention layer of a CvT (convolutional or linear projections): stage, block, the layer's query and key
    grids, and each head's mean attention distance in input pixels (cls token left out, as query and key)."""
    inputs: list[tuple[nn.Module, tuple]] = []
    handles = [m.register_forward_pre_hook(lambda m, a: inputs.append((m, a)))
               for m in model.modules() if isinstance(m, CvTAttention)]
    try:
        with fast_paths(fused_inference=False):  # the fused block calls `attend`, past the module's hooks
            model(x)
    finally:
        for h in handles:
            h.remove()
    reductions = model.cfg.reductions  # input pixels per token, stage by stage
    rows, block_in_stage, last_grid = [], 0, None
    stage = -1
    for attn, (tokens, h, w, has_cls) in inputs:
        if (h, w) != last_grid:
            stage, block_in_stage, last_grid = stage + 1, 0, (h, w)
        spatial = tokens[:, 1:] if has_cls else tokens
        feat = spatial.transpose(1, 2).unflatten(2, (h, w))  # (B, C, H, W)
        q, k = attn.conv_proj_q(feat), attn.conv_proj_k(feat)  # (B, Tq, C), (B, Tk, C): spatial tokens only
        nh = attn.num_heads
        q = attn.proj_q(q).unflatten(-1, (nh, -1)).transpose(1, 2)  # (B, nh, Tq, hd)
        k = attn.proj_k(k).unflatten(-1, (nh, -1)).transpose(1, 2)
        if has_cls:  # the cls key takes its share of the softmax; its column is then dropped
            cls_k = attn.proj_k(tokens[:, :1]).unflatten(-1, (nh, -1)).transpose(1, 2)
            k = torch.cat((cls_k, k), 2)
        p = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)
        if has_cls:
            p = p[..., 1:]
        stride = reductions[stage]
        s_kv = attn.conv_proj_k.conv.stride[0] if isinstance(attn.conv_proj_k, ConvProjection) else 1
        hk, wk = math.ceil(h / s_kv), math.ceil(w / s_kv)
        # a kernel-3, padding-1 convolution of stride s centres its output i on input i * s, so token i of a stage
        # sits at pixel i * reduction (plus one offset for all, which distances do not see), and key i on token
        # i * s_kv
        q_pos = _grid_centres(h, w, stride, 0)
        k_pos = _grid_centres(hk, wk, stride * s_kv, 0)
        heads, uniform = _distance(p, q_pos, k_pos)
        rows.append(dict(stage=stage + 1, block=block_in_stage + 1, query_grid=[h, w], key_grid=[hk, wk],
                         heads=heads, uniform=uniform))
        block_in_stage += 1
    return rows


@torch.inference_mode()
def vit_attention_distance(model: nn.Module, x: torch.Tensor) -> list[dict[str, Any]]:
    """Per block of a timm VisionTransformer: each head's mean attention distance in input pixels (prefix tokens
    left out, as query and key)."""
    inputs: list[tuple[nn.Module, torch.Tensor]] = []
    attns = [b.attn for b in model.blocks]
    handles = [a.register_forward_pre_hook(lambda m, a: inputs.append((m, a[0]))) for a in attns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    prefix = model.num_prefix_tokens
    gh, gw = model.patch_embed.dynamic_feat_size(x.shape[-2:]) if hasattr(model.patch_embed, "dynamic_feat_size") \
        else model.patch_embed.grid_size
    patch = model.patch_embed.patch_size[0]
    pos = _grid_centres(gh, gw, patch, patch / 2)
    rows = []
    for i, (attn, tokens) in enumerate(inputs):
        b, t, c = tokens.shape
        qkv = attn.qkv(tokens).reshape(b, t, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hd)
        q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
        p = (q @ k.transpose(-2, -1) * attn.scale).softmax(-1)[..., prefix:, prefix:]
        heads, uniform = _distance(p, pos, pos)
        rows.append(dict(block=i + 1, query_grid=[gh, gw], key_grid=[gh, gw], heads=heads, uniform=uniform))
    return rows


# ---------------------------------------------------------------------------------------------------------------
# Which attention kernel a forward runs
# ---------------------------------------------------------------------------------------------------------------
ATTENTION_OP_WORDS = ("scaled_dot_product", "flash", "efficient_attention", "cudnn_attention", "fmha")


@torch.inference_mode()
def attention_ops(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """The attention operators (aten ops, and on a GPU their kernels) one forward of `model` on `x` runs, with how
    often: `aten::_scaled_dot_product_flash_attention_for_cpu` on a CPU, the flash / memory-efficient / cuDNN
    kernel SDPA picked on a GPU. Empty for a model that calls none (a ResNet)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=activities) as prof:
        model(x)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
    counts: dict[str, int] = {}
    for event in prof.events():
        if any(w in event.name.lower() for w in ATTENTION_OP_WORDS):
            counts[event.name] = counts.get(event.name, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------------------------
# A CvT's stage-1 key/value stride, changed without new weights
# ---------------------------------------------------------------------------------------------------------------
def set_stage_kv_stride(model: nn.Module, stage: int, stride: int) -> None:
    """The k and v projections of every block of `stage` (0-based) subsample by `stride`: the depthwise
    convolutions keep their weights (kernel 3, padding 1) and take a larger step, so there are stride^2 times fewer
    keys than at stride 1."""
    for block in model.stages[stage].blocks:
        for proj in (block.attn.conv_proj_k, block.attn.conv_proj_v):
            proj.conv.stride = (stride, stride)
