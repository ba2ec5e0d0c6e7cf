"""Convolutional Vision Transformer (Wu et al., "CvT: Introducing Convolutions to Vision Transformers", ICCV 2021).

Read top to bottom: primitives -> convolutional token embedding -> convolutional attention -> block -> stage ->
the model (classifier and backbone in one class). Behaviour follows the authors' `lib/models/cls_cvt.py`,
quirks included (each is marked "authors:"), so their released weights give their published accuracy.

Each module's forward here is the reference computation. The CPU fast paths (oneDNN GEMMs, fused inference,
activation recomputation, ...) live in `cvt.layers`, each behind the public switch `cvt.layers.fast_paths`; a
forward hands over to one in a single marked line where it applies.

Layouts: images and feature maps are NCHW `(B, C, H, W)`; token sequences are `(B, T, C)` with `T = H * W`
(plus one cls token in front in the last stage).
"""


import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import DropPath, trunc_normal_
from timm.models._features import FeatureInfo, feature_take_indices
from torch import nn

from .config import CvTConfig
from .layers import BatchNorm2d, Linear, QuickGELU, checkpoint_block, fused, is_enabled
from .layers.config import as_built, fx_tracing
from .layers.norm import conv_bn_folded


# ---------------------------------------------------------------------------------------------------------------
# Primitives
# ---------------------------------------------------------------------------------------------------------------
class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (authors: their subclass upcasts so fp16/bf16 runs stay stable)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (torch.fx cannot read a traced dtype, nor TorchScript this block: their graphs hold the fp32 case, which
        # autocast upcasts to anyway)
        if not torch.jit.is_scripting():
            if not fx_tracing() and x.dtype != torch.float32:
                # Autocast would run layer_norm in fp32 anyway on CUDA, but not on every device: do it explicitly.
                with torch.autocast(device_type=x.device.type, enabled=False):
                    out = F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                                       self.eps)
                return out.to(x.dtype)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def _make_act(name: str) -> nn.Module:
    # authors: QuickGELU, x * sigmoid(1.702 x); transformers' port uses exact GELU
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


# ---------------------------------------------------------------------------------------------------------------
# Convolutional token embedding
# ---------------------------------------------------------------------------------------------------------------
class ConvEmbed(nn.Module):
    """Strided Conv2d (with bias) + LayerNorm over channels: the start of every stage."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int, padding: int, eps: float):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=stride, padding=padding)
        self.norm = LayerNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)  # (B, C, H, W)
        h, w = x.shape[-2], x.shape[-1]  # (not unpacked from a slice: torch.fx cannot iterate a traced shape)
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, C)
        return self.norm(x), h, w


# ---------------------------------------------------------------------------------------------------------------
# Convolutional attention
# ---------------------------------------------------------------------------------------------------------------
class ConvProjection(nn.Module):
    """Depthwise Conv2d (no bias) + BatchNorm2d: the "dw_bn" projection of q, k or v, map in, tokens out."""

    def __init__(self, dim: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size, stride=stride, padding=kernel_size // 2, groups=dim, bias=False)
        self.bn = BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            if not self.training and is_enabled("fold_batchnorm") and as_built(self.bn, BatchNorm2d):
                x = conv_bn_folded(self.conv, self.bn, x)  # fast path: one pass instead of two
                return x.flatten(2).transpose(1, 2)
        x = self.bn(self.conv(x))  # (B, C, H', W')
        return x.flatten(2).transpose(1, 2)  # (B, C, H', W') -> (B, H'*W', C)


class Attention(nn.Module):
    """Multi-head attention whose q/k/v come from depthwise-convolved token maps (k, v subsampled by stride_kv)."""

    def __init__(self, dim: int, num_heads: int, cfg: CvTConfig, attn_drop: float, proj_drop: float):
        super().__init__()
        self.num_heads = num_heads
        # authors: the scale is the whole width's dim ** -0.5, not head_dim ** -0.5; the weights depend on it.
        self.scale = dim**-0.5
        self.attn_drop = attn_drop
        self.conv_proj_q = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_q)
        self.conv_proj_k = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_kv)
        self.conv_proj_v = ConvProjection(dim, cfg.kernel_qkv, cfg.stride_kv)
        self.proj_q = Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj_k = Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj_v = Linear(dim, dim, bias=cfg.qkv_bias)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        return self.proj_drop(self.proj(self.attend(x, h, w, has_cls)))

    def attend(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        """Attention up to, not including, the output projection: (B, T, C) -> (B, T, C)."""
        spatial = x[:, 1:] if has_cls else x  # (B, H*W, C)
        if has_cls:
            # Without the cls row the map is strided by 1 + H*W tokens per image, which the convolutions would
            # each copy into a dense layout; one copy here serves all three.
            spatial = spatial.contiguous()
        # (B, H*W, C) -> (B, C, H, W) as a view: the map is channels-last in memory, which the depthwise
        # convolutions take without a copy. q, k and v all read this one map.
        feat = spatial.transpose(1, 2).unflatten(2, (h, w))
        q = self.conv_proj_q(feat)  # (B, Tq, C)
        k = self.conv_proj_k(feat)  # (B, Tkv, C), Tkv = ceil(H/s) * ceil(W/s)
        v = self.conv_proj_v(feat)
        if has_cls:
            # authors: the cls token skips the convolution and joins q, k and v unchanged.
            cls = x[:, :1]
            q, k, v = torch.cat((cls, q), dim=1), torch.cat((cls, k), dim=1), torch.cat((cls, v), dim=1)
        nh = self.num_heads
        q = self.proj_q(q).unflatten(-1, (nh, -1)).transpose(1, 2)  # (B, nh, Tq, hd)
        k = self.proj_k(k).unflatten(-1, (nh, -1)).transpose(1, 2)  # (B, nh, Tkv, hd)
        v = self.proj_v(v).unflatten(-1, (nh, -1)).transpose(1, 2)
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_drop if self.training else 0.0, scale=self.scale
        )  # (B, nh, Tq, hd)
        return x.transpose(1, 2).flatten(2)  # (B, Tq, C), a view: the kernel writes (B, Tq, nh, hd) memory


# ---------------------------------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------------------------------
class Mlp(nn.Module):
    """fc1 -> activation -> dropout -> fc2 -> dropout, the hidden width mlp_ratio times the block's."""

    def __init__(self, dim: int, hidden: int, act: str, drop: float):
        super().__init__()
        self.fc1 = Linear(dim, hidden)
        self.act = _make_act(act)
        self.fc2 = Linear(hidden, dim)
        self.drop = nn.Dropout(drop)
        # In a checkpointed block (set by `Stage.grad_checkpointing`) the fused forward does not recompute its
        # activation a second time.
        self.checkpointed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            kernel = fused.mlp_kernel(self)
            if kernel is not None:
                return fused.mlp_forward(self, kernel, x)  # fast path: the same function
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + drop_path(attn(norm1 x)), then x + drop_path(mlp(norm2 x))."""

    def __init__(self, dim: int, num_heads: int, drop_path: float, cfg: CvTConfig):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(dim, num_heads, cfg, cfg.attn_drop_rate, cfg.drop_rate)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(dim, int(dim * cfg.mlp_ratio), cfg.act, cfg.drop_rate)

    def forward(self, x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
        if not torch.jit.is_scripting():
            kernel = fused.block_inference_kernel(self, x)
            if kernel is not None:
                return fused.block_inference(self, kernel, x, h, w, has_cls)  # fast path: the same function
        x = x + self.drop_path(self.attn(self.norm1(x), h, w, has_cls))
        return x + self.drop_path(self.mlp(self.norm2(x)))


# ---------------------------------------------------------------------------------------------------------------
# Stage
# ---------------------------------------------------------------------------------------------------------------
class Stage(nn.Module):
    """Token embedding, an optional cls token, then `depth` blocks. Map in, tokens out."""

    def __init__(self, index: int, in_chans: int, cfg: CvTConfig):
        super().__init__()
        dim = cfg.embed_dims[index]
        self.patch_embed = ConvEmbed(
            in_chans, dim, cfg.patch_sizes[index], cfg.patch_strides[index], cfg.patch_paddings[index],
            cfg.layer_norm_eps,
        )
        last = index == cfg.num_stages - 1
        # authors: the cls token exists in the last stage only
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if cfg.cls_token and last else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        # authors: stochastic depth rises linearly within each stage, from 0 to the stage's rate
        rates = torch.linspace(0, cfg.drop_path_rate[index], cfg.depths[index], device="cpu").tolist()
        self.blocks = nn.ModuleList(Block(dim, cfg.num_heads[index], r, cfg) for r in rates)
        self.grad_checkpointing = False

    @property
    def grad_checkpointing(self) -> bool:
        return self._grad_checkpointing

    @grad_checkpointing.setter
    def grad_checkpointing(self, enable: bool) -> None:
        self._grad_checkpointing = enable
        for m in self.blocks.modules():  # the layers that ask whether a forward is a recomputation
            if isinstance(m, (BatchNorm2d, Mlp)):
                m.checkpointed = enable

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x, h, w = self.patch_embed(x)  # (B, H*W, C)
        cls_token = self.cls_token
        has_cls = cls_token is not None
        if cls_token is not None:
            x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)  # (B, 1 + H*W, C)
        x = self.pos_drop(x)
        if not torch.jit.is_scripting():
            if self._grad_checkpointing and torch.is_grad_enabled() and not fx_tracing():
                for block in self.blocks:
                    x = checkpoint_block(block, x, h, w, has_cls)
                return x, h, w
        for block in self.blocks:
            x = block(x, h, w, has_cls)
        return x, h, w


def _tokens_to_map(x: torch.Tensor, h: int, w: int, has_cls: bool) -> torch.Tensor:
    if has_cls:
        x = x[:, 1:]
    return x.transpose(1, 2).unflatten(2, (h, w))  # (B, H*W, C) -> (B, C, H, W)


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------
class CvT(nn.Module):
    """A CvT classifier, or a backbone returning NCHW feature maps (`features_only=True`).

    The interface is timm's: `forward_features`, `forward_head`, `reset_classifier`, `set_grad_checkpointing`,
    `feature_info`, `forward_intermediates`, `prune_intermediate_layers`. Parameter names follow the authors'
    checkpoints, with `stage{i}.` written `stages.{i}.` (see `cvt.weights`).
    """

    def __init__(self, cfg: CvTConfig, features_only: bool = False, out_indices: Sequence[int] = (0, 1, 2)):
        super().__init__()
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans  # timm reads it (its model traits) to adapt a checkpoint's first convolution
        self.class_names: list[str] | None = None  # set when weights come with names (cvt, Hugging Face formats)
        # True when weights were loaded but not the classifier's (the file had none, or another class count): its
        # head is untrained, so eval and predict refuse such a model.
        self.fresh_classifier = False
        self.num_features = self.head_hidden_size = cfg.num_features
        stages, in_chans = [], cfg.in_chans
        for i in range(cfg.num_stages):
            stages.append(Stage(i, in_chans, cfg))
            in_chans = cfg.embed_dims[i]
        self.stages = nn.ModuleList(stages)
        self.maps = nn.ModuleList(TokenMap(s.cls_token is not None) for s in stages)
        self.norm = LayerNorm(cfg.num_features, eps=cfg.layer_norm_eps)
        self.head = nn.Linear(cfg.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        # timm's feature metadata, one dict a stage; `module` names the map (not the stage, whose output is tokens)
        # for forward hooks and FX feature extraction.
        self.feature_info: list[dict] | FeatureInfo = [
            dict(num_chs=d, reduction=r, module=f"maps.{i}", index=i)
            for i, (d, r) in enumerate(zip(cfg.embed_dims, cfg.reductions, strict=True))
        ]
        self.features_only = False
        self.out_indices: tuple[int, ...] = tuple(range(cfg.num_stages))
        self.apply(self._init_weights)
        for stage in self.stages:
            if stage.cls_token is not None:
                trunc_normal_(stage.cls_token, std=0.02)
        if features_only:
            self.as_backbone(out_indices)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # authors: Linear trunc_normal(0.02) with zero bias; norms 1/0; convolutions keep PyTorch's default.
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm interface ------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        # the cls token, and a position embedding where one was added (cvt.models.ablations), as timm's ViT
        return {n for n, _ in self.named_parameters() if n.endswith((".cls_token", ".pos_embed"))}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def set_sync_batchnorm(self, enable: bool = True) -> None:
        """Under torch.distributed, train the BatchNorms of the q/k/v projections on the statistics of all
        processes' batches (`cvt.layers.sync_batch_norm`, on any backend) instead of each process's share. No
        effect in one process or in eval mode."""
        for m in self.modules():
            if isinstance(m, BatchNorm2d):
                m.sync = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh head for `num_classes` classes (0: no head, `forward` returns pooled features)."""
        self.num_classes = num_classes
        self.class_names = None
        self.cfg = self.cfg.replace(num_classes=num_classes)
        device = next(self.parameters()).device  # (the final norm may be pruned away)
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()
        self._init_weights(self.head)

    def as_backbone(self, out_indices: Sequence[int] = (0, 1, 2)) -> "CvT":
        """Turn this model into a backbone returning the maps of `out_indices`; drops the head, the final norm
        and the stages after the last index (they would be unused parameters, which DDP rejects).

        `feature_info` becomes timm's `FeatureInfo` over the returned maps only: `.channels()`, `.reduction()`,
        `.module_name()`, and iterating it gives one dict per map (as timm's `features_only` wrappers report)."""
        n = len(self.stages)
        idx = tuple(int(i) % n if -n <= int(i) < n else n for i in out_indices)
        if not idx or any(i >= n for i in idx) or len(set(idx)) != len(idx):
            raise ValueError(f"out_indices {tuple(out_indices)} must name distinct stages among 0..{n - 1}")
        self.out_indices = tuple(sorted(idx))
        self.stages = self.stages[: max(idx) + 1]
        self.maps = self.maps[: max(idx) + 1]
        self.norm = nn.Identity()
        self.head = nn.Identity()
        self.num_classes = 0
        self.features_only = True
        maps = [dict(self.feature_info[i]) for i in self.out_indices]
        self.feature_info = FeatureInfo(maps, out_indices=tuple(range(len(maps))))
        return self

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """timm's contract: drop what the intermediates `indices` (last n if an int) do not need: the stages after
        the last of them, the final norm when asked or when its stage is gone, the head when asked or when its
        features are gone. Returns the absolute indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[: max_index + 1]
        self.maps = self.maps[: max_index + 1]
        if prune_norm or prune_end:
            self.norm = nn.Identity()  # sized for, and applied to, the last stage only
        if prune_end:
            self.num_features = self.head_hidden_size = self.cfg.embed_dims[max_index]
        if prune_head or prune_end:
            self.reset_classifier(0)
        return take_indices

    def _check_input(self, x: torch.Tensor) -> None:
        # While FX traces, shapes are proxies that cannot decide an `if`: the checks stand aside (the traced graph
        # runs on whatever it is given, as the model would after them). TorchScript never compiles this (callers).
        if fx_tracing():
            return
        if x.ndim != 4:
            raise ValueError(
                f"CvT expects images as a (batch, channels, height, width) tensor, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.cfg.in_chans:
            raise ValueError(
                f"CvT was built for {self.cfg.in_chans}-channel images, got {x.shape[1]} channels "
                f"(shape {tuple(x.shape)})"
            )
        min_size = self.min_input_size()
        if x.shape[-2] < min_size or x.shape[-1] < min_size:
            raise ValueError(
                f"input {x.shape[-2]}x{x.shape[-1]} is too small: this CvT needs at least {min_size}x{min_size} pixels"
            )

    def min_input_size(self) -> int:
        """Smallest side for which every stage's token embedding still yields at least one token."""
        return min_input_side(self.cfg)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | tuple[int, ...] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's contract: the maps of the stages in `indices` (all if None, the last n if an int, negative from
        the end), `(B, C_i, H/r_i, W/r_i)` ("NCHW") or `(B, H/r_i, W/r_i, C_i)` ("NHWC"), and unless
        `intermediates_only` the final tokens as `forward_features` gives them.

        norm: the last stage's map is taken after the final LayerNorm. stop_early: no stage after the last one
        asked for runs (the returned tokens are then that stage's, without the norm)."""
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        if not torch.jit.is_scripting():
            self._check_input(x)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        last = len(self.stages) - 1
        stages = self.stages if torch.jit.is_scripting() or not stop_early else self.stages[: max_index + 1]
        intermediates = []
        tokens, i = x, -1
        for i, (stage, to_map) in enumerate(zip(stages, self.maps)):
            tokens, h, w = stage(x)  # (B, [1 +] H*W, C)
            x = to_map(tokens, h, w)  # (B, C, H, W), a view: what the next stage embeds
            if i in take_indices:
                fmap = to_map(self.norm(tokens), h, w) if norm and i == last else x
                if output_fmt == "NHWC":
                    fmap = fmap.permute(0, 2, 3, 1)
                intermediates.append(fmap.contiguous())
        if intermediates_only:
            return intermediates
        return (self.norm(tokens) if i == last else tokens), intermediates

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised last-stage tokens `(B, [1 +] H*W, C)`, the cls token first when the model has one."""
        if not torch.jit.is_scripting():
            self._check_input(x)
        tokens = x
        for stage, to_map in zip(self.stages, self.maps):
            tokens, h, w = stage(x)  # (B, [1 +] H*W, C)
            # Every stage's map, the last one's too (unused here, a view): FX feature extraction and forward hooks
            # find a stage's map as the output of `maps.{i}`.
            x = to_map(tokens, h, w)  # (B, C, H, W): the next stage embeds a map
        # LayerNorm is per token, so norming all tokens then taking the cls token equals the authors' order.
        return self.norm(tokens)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # authors: the cls token is the image's representation; without one, the mean of the tokens.
        # (Their torch.squeeze also dropped the batch dimension at batch size 1; indexing keeps it.)
        x = x[:, 0] if self.stages[-1].cls_token is not None else x.mean(dim=1)  # (B, C)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if self.features_only:
            if not torch.jit.is_scripting():
                return self.forward_intermediates(x, self.out_indices, intermediates_only=True)
            raise RuntimeError("a features_only CvT cannot be scripted: trace it (torch.jit.trace, torch.fx)")
        return self.forward_head(self.forward_features(x))


class TokenMap(nn.Module):
    """A stage's tokens as its feature map, the cls token dropped: (B, [1 +] H*W, C) -> (B, C, H, W), a view.

    A module without parameters so that each stage's map has a name, `maps.{i}` in `CvT.feature_info`, that forward
    hooks and FX feature extraction (timm's `feature_cls="fx"`, torchvision's `create_feature_extractor`) can ask
    for; the stages themselves return tokens."""

    def __init__(self, has_cls: bool):
        super().__init__()
        self.has_cls = has_cls

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if self.has_cls:
            x = x[:, 1:]
        return x.transpose(1, 2).unflatten(2, (h, w))  # (B, H*W, C) -> (B, C, H, W)


def min_input_side(cfg: CvTConfig) -> int:
    """Smallest image side for which every stage's token embedding still yields at least one token."""
    size = 1
    for k, s, p in reversed(list(zip(cfg.patch_sizes, cfg.patch_strides, cfg.patch_paddings))):
        size = max(1, (size - 1) * s + k - 2 * p)  # inverse of floor((L + 2p - k) / s) + 1 >= size
    return size


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def output_size(cfg: CvTConfig, height: int, width: int) -> list[tuple[int, int]]:
    """Spatial size of each stage's map for an input of `height` x `width`."""
    sizes = []
    for k, s, p in zip(cfg.patch_sizes, cfg.patch_strides, cfg.patch_paddings):
        height = math.floor((height + 2 * p - k) / s) + 1
        width = math.floor((width + 2 * p - k) / s) + 1
        sizes.append((height, width))
    return sizes
