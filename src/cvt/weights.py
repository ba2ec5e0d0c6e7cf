"""Reading, converting and writing CvT weights in the three formats people have.

- "authors": microsoft/CvT checkpoints (`CvT-13-224x224-IN-1k.pth`): keys `stage{i}.…`, maybe wrapped in
  `{"state_dict": …}` / `{"model": …}` or prefixed `module.` by DDP.
- "hf": a directory saved by transformers' `CvtForImageClassification.save_pretrained` (`config.json` +
  `model.safetensors` or `pytorch_model.bin`), keys `cvt.encoder.stages.{i}.…`.
- "cvt": this project's `model.safetensors` whose metadata carries the config and the class names (a
  `config.json` beside it says the same).

Every conversion goes through our key names; the rename tables below are the whole mapping, each direction a few
regexes, safe to run twice. Pickled files are read with `torch.load(weights_only=True)` only: a pickle that
would run code is refused, never executed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ACTIVATIONS, CvTConfig
from .utils import atomic_write

FORMATS = ("cvt", "hf", "authors")
STATE_FORMAT = "cvt-training-state"  # the "format" entry of a run's checkpoint.pt (written by engine.py)


class CheckpointError(ValueError):
    """A checkpoint could not be read or does not fit the model; the message says which and why."""


# ---------------------------------------------------------------------------------------------------------------
# Key mappings (ours <-> theirs)
# ---------------------------------------------------------------------------------------------------------------
_BLOCK = "cvt.encoder.stages.{i}.layers.{j}."
_ATTN = _BLOCK + "attention.attention."
_QKV = (("q", "query"), ("k", "key"), ("v", "value"))
# (our key prefix, Hugging Face's key prefix); {i} is the stage, {j} the block. This table is the whole mapping.
_HF_NAMES = [
    ("stages.{i}.patch_embed.proj.", "cvt.encoder.stages.{i}.embedding.convolution_embeddings.projection."),
    ("stages.{i}.patch_embed.norm.", "cvt.encoder.stages.{i}.embedding.convolution_embeddings.normalization."),
    ("stages.{i}.cls_token", "cvt.encoder.stages.{i}.cls_token"),
    ("stages.{i}.blocks.{j}.norm1.", _BLOCK + "layernorm_before."),
    ("stages.{i}.blocks.{j}.norm2.", _BLOCK + "layernorm_after."),
    *[
        (
            f"stages.{{i}}.blocks.{{j}}.attn.conv_proj_{s}.{ours}.",
            _ATTN + f"convolution_projection_{name}.convolution_projection.{theirs}.",
        )
        for s, name in _QKV
        for ours, theirs in (("conv", "convolution"), ("bn", "normalization"))
    ],
    *[(f"stages.{{i}}.blocks.{{j}}.attn.proj_{s}.", _ATTN + f"projection_{name}.") for s, name in _QKV],
    ("stages.{i}.blocks.{j}.attn.proj.", _BLOCK + "attention.output.dense."),
    ("stages.{i}.blocks.{j}.mlp.fc1.", _BLOCK + "intermediate.dense."),
    ("stages.{i}.blocks.{j}.mlp.fc2.", _BLOCK + "output.dense."),
    ("norm.", "layernorm."),
    ("head.", "classifier."),
]
_AUTHORS_NAMES = [("stages.{i}.", "stage{i}.")]


def _rules(table: list[tuple[str, str]], reverse: bool = False) -> list[tuple[re.Pattern, str]]:
    """Prefix templates -> (compiled regex, format template) pairs, in either direction."""
    rules = []
    for src, dst in table:
        if reverse:
            src, dst = dst, src
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{j\}", r"(?P<j>\d+)")
        rules.append((re.compile("^" + pattern), dst))
    return rules


_OURS_TO_HF, _HF_TO_OURS = _rules(_HF_NAMES), _rules(_HF_NAMES, reverse=True)
_OURS_TO_AUTHORS, _AUTHORS_TO_OURS = _rules(_AUTHORS_NAMES), _rules(_AUTHORS_NAMES, reverse=True)


def _rename(state_dict: dict[str, torch.Tensor], rules: list[tuple[re.Pattern, str]]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state_dict.items():
        for pattern, template in rules:
            m = pattern.match(key)
            if m:
                key = template.format(**m.groupdict()) + key[m.end():]
                break
        out[key] = value
    return out


def detect_format(state_dict: dict[str, Any]) -> str:
    keys = list(state_dict)
    if any(k.startswith("cvt.encoder.") for k in keys):
        return "hf"
    if any(re.match(r"stage\d+\.", k) for k in keys):
        return "authors"
    if any(k.startswith("stages.") for k in keys):
        return "cvt"
    raise CheckpointError(
        "not a CvT state dict: expected keys like 'stage0.patch_embed.proj.weight' (authors), "
        f"'cvt.encoder.stages.0…' (Hugging Face) or 'stages.0…' (cvt); found e.g. {keys[:3]}"
    )


def _strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    # DDP ("module."), torch.compile ("_orig_mod.") and CvtModel without its classifier ("encoder." -> "cvt.encoder.")
    out = {}
    for k, v in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        if k.startswith("encoder.stages."):
            k = "cvt." + k
        out[k] = v
    return out


def to_ours(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported key layout -> ours. Idempotent."""
    state_dict = _strip_prefixes(state_dict)
    fmt = detect_format(state_dict)
    if fmt == "hf":
        return _rename(state_dict, _HF_TO_OURS)
    if fmt == "authors":
        return _rename(state_dict, _AUTHORS_TO_OURS)
    return dict(state_dict)


def from_ours(state_dict: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our key layout -> `fmt` ("cvt", "hf" or "authors")."""
    if fmt == "hf":
        return _rename(state_dict, _OURS_TO_HF)
    if fmt == "authors":
        return _rename(state_dict, _OURS_TO_AUTHORS)
    if fmt == "cvt":
        return dict(state_dict)
    raise ValueError(f"unknown weight format {fmt!r}; choose one of {', '.join(FORMATS)}")


# ---------------------------------------------------------------------------------------------------------------
# Configs (Hugging Face's CvtConfig <-> ours)
# ---------------------------------------------------------------------------------------------------------------
def config_from_hf(hf: dict[str, Any]) -> CvTConfig:
    n = len(hf["embed_dim"])

    def scalar(name: str, default: Any) -> Any:
        v = hf.get(name, default)
        return max(v) if isinstance(v, list) else v

    cls = hf.get("cls_token", [False] * (n - 1) + [True])
    if any(cls[:-1]):
        raise CheckpointError("this Hugging Face CvT puts a cls token before the last stage, which CvT never does")
    for name, expected in (("stride_q", 1), ("kernel_qkv", 3), ("padding_q", 1), ("padding_kv", 1)):
        values = set(hf.get(name, [expected] * n))
        if name.startswith("padding"):
            expected = scalar("kernel_qkv", 3) // 2
        if len(values) != 1 or (name != "kernel_qkv" and values != {expected}):
            raise CheckpointError(
                f"this Hugging Face CvT has {name}={sorted(values)}, which this library does not build"
            )
    if set(hf.get("qkv_projection_method", ["dw_bn"])) != {"dw_bn"}:
        raise CheckpointError("only the 'dw_bn' convolutional projection (every released CvT) is supported")
    num_labels = len(hf["id2label"]) if "id2label" in hf else hf.get("num_labels", 1000)
    cfg = CvTConfig(
        embed_dims=hf["embed_dim"],
        num_heads=hf["num_heads"],
        depths=hf["depth"],
        patch_sizes=hf.get("patch_sizes", [7, 3, 3]),
        patch_strides=hf.get("patch_stride", [4, 2, 2]),
        patch_paddings=hf.get("patch_padding", [2, 1, 1]),
        mlp_ratio=float(scalar("mlp_ratio", 4.0)),
        qkv_bias=bool(scalar("qkv_bias", True)),
        kernel_qkv=int(scalar("kernel_qkv", 3)),
        stride_kv=int(scalar("stride_kv", 2)),
        stride_q=1,
        cls_token=bool(cls[-1]),
        drop_rate=float(scalar("drop_rate", 0.0)),
        attn_drop_rate=float(scalar("attention_drop_rate", 0.0)),
        drop_path_rate=tuple(float(r) for r in hf.get("drop_path_rate", [0.0] * (n - 1) + [0.1])),
        in_chans=hf.get("num_channels", 3),
        num_classes=num_labels,
        act=hf["hidden_act"] if "act" not in hf_unrecorded(hf) else "quick_gelu",
    )
    if hf.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
        warnings.warn(f"hidden_act {hf['hidden_act']!r} in a Hugging Face config is not one cvt builds "
                      f"({', '.join(ACTIVATIONS)}); ignored, as transformers' CvT ignores it", stacklevel=2)
    return cfg


def hf_unrecorded(hf: dict[str, Any]) -> tuple[str, ...]:
    """Our settings a Hugging Face config.json does not record, which `config_from_hf` fills with defaults.

    transformers' CvT ignores hidden_act (it always runs exact GELU) and layer_norm_eps (its LayerNorms keep
    torch's 1e-5); cvt writes hidden_act so that a GELU model survives the round trip. Without it, or with a value
    this library does not build: QuickGELU, what every released checkpoint was trained with."""
    return ("layer_norm_eps",) + (("act",) if hf.get("hidden_act") not in ACTIVATIONS else ())


def config_to_hf(cfg: CvTConfig, class_names: list[str] | None = None) -> dict[str, Any]:
    n = cfg.num_stages
    names = class_names or [f"LABEL_{i}" for i in range(cfg.num_classes)]
    return {
        "architectures": ["CvtForImageClassification"],
        "model_type": "cvt",
        "num_channels": cfg.in_chans,
        "patch_sizes": list(cfg.patch_sizes),
        "patch_stride": list(cfg.patch_strides),
        "patch_padding": list(cfg.patch_paddings),
        "embed_dim": list(cfg.embed_dims),
        "num_heads": list(cfg.num_heads),
        "depth": list(cfg.depths),
        "mlp_ratio": [cfg.mlp_ratio] * n,
        "attention_drop_rate": [cfg.attn_drop_rate] * n,
        "drop_rate": [cfg.drop_rate] * n,
        "drop_path_rate": list(cfg.drop_path_rate),
        "qkv_bias": [cfg.qkv_bias] * n,
        "cls_token": [False] * (n - 1) + [cfg.cls_token],
        "qkv_projection_method": ["dw_bn"] * n,
        "kernel_qkv": [cfg.kernel_qkv] * n,
        "padding_kv": [cfg.kernel_qkv // 2] * n,
        "stride_kv": [cfg.stride_kv] * n,
        "padding_q": [cfg.kernel_qkv // 2] * n,
        "stride_q": [cfg.stride_q] * n,
        "hidden_act": cfg.act,
        "initializer_range": 0.02,
        "layer_norm_eps": 1e-12,
        "id2label": {str(i): name for i, name in enumerate(names)},
        "label2id": {name: i for i, name in enumerate(names)},
    }


# ---------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Checkpoint:
    """Weights in our key layout, plus what the file said about the model (None where it says nothing)."""

    state_dict: dict[str, torch.Tensor]
    source_format: str
    path: str
    config: CvTConfig | None = None
    class_names: list[str] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    unrecorded: tuple[str, ...] = ()  # config fields the file does not say, filled with defaults in `config`


def _hub_hint(spec: Any) -> str:
    return (
        f"pretrained={spec if spec is True else str(spec)!r}: weights are never downloaded; "
        "pass a local file or folder instead: the authors' "
        "'CvT-13-224x224-IN-1k.pth', a folder saved by transformers' save_pretrained (config.json + "
        "model.safetensors), or a cvt 'model.safetensors'"
    )


def _torch_load(path: Path) -> Any:
    import argparse

    try:
        # timm's train.py stores its command line as an argparse.Namespace: plain data, allowed by name (the
        # context manager from torch 2.5; 2.4 has only the process-wide allow list).
        allow = getattr(torch.serialization, "safe_globals", None)
        if allow is None:
            torch.serialization.add_safe_globals([argparse.Namespace])
            allow = contextlib.nullcontext
        with allow([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure becomes one clear line
        text = str(e)
        if "weights_only" in text or "Unsupported global" in text or "Unpickler" in type(e).__name__:
            found = re.search(r"GLOBAL ([\w.]+)", text)
            what = f"it names {found.group(1)}" if found else type(e).__name__
            raise CheckpointError(
                f"refused to load {path}: it is a pickle that would import or run code ({what}); only plain "
                "tensors are loaded. If you trust the file, save its weights alone: torch.save(torch.load(path, "
                "weights_only=False)['state_dict'], 'weights.pth')"
            ) from None
        raise CheckpointError(
            f"could not read {path}: truncated or not a PyTorch checkpoint ({type(e).__name__})"
        ) from None


def _safetensors_load(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"could not read {path}: truncated or not a safetensors file ({e})") from None


# Where training checkpoints keep the weights, first choice first: the EMA of the weights where there is one (what
# cvt saves as a run's model.safetensors; timm's validate.py evaluates it with --use-ema), else the raw weights.
_WEIGHT_KEYS = ("state_dict_ema", "model_ema", "ema", "state_dict", "model", "module")


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict inside a loaded object, and the rest of a training checkpoint's dict."""
    if isinstance(obj, dict):
        for key in _WEIGHT_KEYS:
            found = obj.get(key)
            if isinstance(found, dict) and found and (key in ("state_dict", "model", "module") or all(
                    isinstance(v, torch.Tensor) for v in found.values())):
                rest = {k: v for k, v in obj.items() if k != key}
                return obj[key], rest
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj, {}
    raise CheckpointError(f"{path} holds no state dict (expected tensors, or a dict with 'state_dict' or 'model')")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"could not read {path}: {e}") from None


@contextlib.contextmanager
def _reading(path: Path):
    """Any failure to make sense of a hand-edited or foreign config becomes one CheckpointError naming the file
    and what is wrong, not where in our code it broke."""
    try:
        yield
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the entry {e}") from None
    except (TypeError, AttributeError) as e:
        raise CheckpointError(f"{path} has a malformed config ({e})") from None
    except ValueError as e:  # CvTConfig's validation, CheckpointError, JSON
        raise CheckpointError(f"{path}: {e}") from None


def _config_from_json(d: Any, path: Path) -> tuple[CvTConfig, list[str] | None, tuple[str, ...]]:
    """The config, class names and unrecorded fields of a config.json, Hugging Face's or ours; `path` names it in
    errors."""
    hf = isinstance(d, dict) and d.get("model_type") == "cvt"
    if not hf and not (isinstance(d, dict) and d.get("format") == "cvt" and "config" in d):
        raise CheckpointError(f"{path} is not a CvT config (neither Hugging Face's model_type 'cvt' nor cvt's own)")
    with _reading(path):
        if hf:
            names = [d["id2label"][str(i)] for i in range(len(d["id2label"]))] if "id2label" in d else None
            return config_from_hf(d), names, hf_unrecorded(d)
        return CvTConfig.from_dict(d["config"]), d.get("class_names"), ()


def _looks_like_a_hub_name(spec: str | os.PathLike) -> bool:
    """`owner/name` that is not here: a Hub id, unless it reads as a mistyped local path (a weights file's
    extension, or a folder that exists here, like runs/)."""
    text = str(spec)
    if os.path.exists(text) or not re.fullmatch(r"[\w.-]+/[\w.-]+", text):
        return False
    suffix = Path(text).suffix
    return suffix not in (".safetensors", ".pth", ".pt", ".bin", ".json") and not os.path.isdir(text.split("/")[0])


def weights_in_folder(path: Path) -> Path:
    """The weights file of a folder saved by transformers' `save_pretrained` (safetensors first)."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).exists():
            return path / name
    raise CheckpointError(f"{path} is a folder without model.safetensors or pytorch_model.bin")


def read_checkpoint(spec: str | os.PathLike) -> Checkpoint:
    """Read any supported checkpoint from a local file or folder into our key layout."""
    if spec is True or _looks_like_a_hub_name(spec):
        raise CheckpointError(_hub_hint(spec))
    path = Path(spec).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    config = class_names = None
    extra: dict[str, Any] = {}
    unrecorded: tuple[str, ...] = ()
    if path.is_dir():
        cfg_path = path / "config.json"
        weights = weights_in_folder(path)
        if cfg_path.exists():
            config, class_names, unrecorded = _config_from_json(_read_json(cfg_path), cfg_path)
        path = weights
    elif (path.parent / "config.json").exists() and path.suffix == ".safetensors":
        try:
            config, class_names, unrecorded = _config_from_json(
                _read_json(path.parent / "config.json"), path.parent / "config.json")
        except CheckpointError:
            pass  # an unrelated config.json beside the file; the file's own metadata may still say
    if path.suffix == ".safetensors":
        state_dict, meta = _safetensors_load(path)
        if "cvt_config" in meta:
            with _reading(path):
                config, unrecorded = CvTConfig.from_dict(json.loads(meta["cvt_config"])), ()
                class_names = json.loads(meta["class_names"]) if "class_names" in meta else class_names
    else:
        state_dict, extra = _unwrap(_torch_load(path), path)
        if extra.get("format") == STATE_FORMAT and isinstance(extra.get("model_config"), dict):
            with _reading(path):  # cvt's own checkpoint.pt says what it holds
                config = CvTConfig.from_dict(extra["model_config"])
                class_names = extra.get("classes") or None
    try:
        fmt = detect_format(_strip_prefixes(state_dict))
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return Checkpoint(to_ours(state_dict), fmt, str(path), config, class_names, extra, unrecorded)


# ---------------------------------------------------------------------------------------------------------------
# Fitting a checkpoint to a model
# ---------------------------------------------------------------------------------------------------------------
def _list(keys: list[str], limit: int = 4) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


_FIRST_CONV = "stages.0.patch_embed.proj.weight"


def adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """The first convolution's kernel (out, C, k, k) for `in_chans` input channels: summed over C for one channel
    (a grey image seen as C equal channels gives the same output), else the C kernels tiled and scaled by
    C / in_chans so the output keeps its scale."""
    have = weight.shape[1]
    if in_chans == have:
        return weight
    if in_chans == 1:
        return weight.sum(1, keepdim=True)
    tiled = weight.repeat(1, -(-in_chans // have), 1, 1)[:, :in_chans]
    return tiled * (have / in_chans)


def load_into(model: nn.Module, ckpt: Checkpoint, *, backbone: bool = False) -> None:
    """Strictly copy `ckpt` into `model` (the rules: `fit_state_dict`).
    `backbone`: the model becomes a backbone after loading, so a file without a classifier is no news."""
    model.load_state_dict(fit_state_dict(model, ckpt.state_dict, ckpt.path, backbone=backbone), strict=True)


def save_described(model: nn.Module, config: dict[str, Any], folder: Path) -> Path:
    """`folder/model.safetensors` with `config` in its metadata, and `folder/config.json` (= `config`): a model
    that is no bare CvT (a timm classifier, a segmenter) saved so that its loader needs nothing else. Both files are
    written atomically; returns the weights' path."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    dst = folder / "model.safetensors"
    atomic_write(dst, lambda p: save_file(tensors, str(p), metadata={"format": "pt", "config": json.dumps(config)}))
    atomic_write(folder / "config.json", lambda p: p.write_text(json.dumps(config, indent=2)))
    return dst


def load_safetensors_into(model: nn.Module, weights: Path, described_by: str) -> None:
    """Load the safetensors file `weights` into `model`, every key matching (a dense run's detector or segmenter,
    which `described_by` names in the message); one clear line for a file that cannot be read or does not fit."""
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - a missing, truncated or foreign file is one clear line
        raise ValueError(f"cannot read {weights}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{weights} does not fit {described_by}: {len(missing)} missing key(s) {missing[:3]}, "
                         f"{len(unexpected)} unexpected {unexpected[:3]}")


def fit_state_dict(
    model: nn.Module,
    state_dict: dict[str, torch.Tensor],
    source: str,
    *,
    backbone: bool = False,
    adapt_first_conv: bool = True,
) -> dict[str, torch.Tensor]:
    """A state dict in our key layout made ready for `model.load_state_dict(..., strict=True)`.

    A classifier of another size, or none in the file, is initialised afresh (with a warning); the first
    convolution is adapted to the model's input channels (with a warning) unless `adapt_first_conv` is False (timm
    adapts it itself after its filter); anything else that does not fit is a `CheckpointError` naming the missing,
    unexpected and mis-shaped keys. `source` names the file in messages."""
    state = dict(state_dict)
    own = model.state_dict()
    channels_differ = (
        _FIRST_CONV in state and _FIRST_CONV in own and state[_FIRST_CONV].shape != own[_FIRST_CONV].shape
        and state[_FIRST_CONV].shape[:1] + state[_FIRST_CONV].shape[2:] == own[_FIRST_CONV].shape[:1]
        + own[_FIRST_CONV].shape[2:]
    )
    if channels_differ and adapt_first_conv:
        have, want = state[_FIRST_CONV].shape, own[_FIRST_CONV].shape
        warnings.warn(
            f"{source} takes {have[1]} input channels, the model {want[1]}: its first convolution was "
            f"adapted ({'summed over channels' if want[1] == 1 else 'kernels tiled and rescaled'})",
            stacklevel=4,
        )
        state[_FIRST_CONV] = adapt_input_channels(state[_FIRST_CONV], want[1]).to(state[_FIRST_CONV].dtype)
    for k in own:  # BatchNorm's step counter is bookkeeping; files stripped of it load as torch would load them
        if k.endswith(".num_batches_tracked") and k not in state:
            state[k] = own[k]
    classifier = [k for k in own if k.startswith(("head.", "norm."))]
    if classifier and not any(k in state for k in classifier):  # e.g. transformers' CvtModel: the encoder alone
        if not backbone:
            warnings.warn(
                f"{source} holds no classifier (final norm and head): they were initialised afresh (train them "
                "before use)",
                stacklevel=4,
            )
        state.update({k: own[k] for k in classifier})
        model.fresh_classifier = not backbone
    head_keys = [k for k in state if k.startswith("head.")]
    if not any(k.startswith("head.") for k in own):
        for k in head_keys:  # a model built without a classifier (num_classes=0) takes none
            state.pop(k)
    elif "head.weight" in state and state["head.weight"].shape[0] != own["head.weight"].shape[0]:
        warnings.warn(
            f"{source} has a {state['head.weight'].shape[0]}-class head; the model has {model.num_classes} classes, "
            "so its head was re-initialised (train it before use)",
            stacklevel=4,
        )
        for k in head_keys:
            state[k] = own[k]
        model.fresh_classifier = True
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape and not (k == _FIRST_CONV and channels_differ)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_list(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_list(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) (checkpoint vs model): {_list(mismatched)}")
        raise CheckpointError(f"{source} does not fit this model (another architecture?): " + "; ".join(parts))
    return state


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def _contiguous(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_weights(
    state_dict: dict[str, torch.Tensor],
    config: CvTConfig,
    dst: str | os.PathLike,
    fmt: str = "cvt",
    class_names: list[str] | None = None,
) -> Path:
    """Write weights (our key layout) as `fmt`:
    - "cvt": `dst` is a `.safetensors` file carrying the config and class names; `config.json` goes beside it;
    - "hf": `dst` is a folder like `save_pretrained` writes (config.json + model.safetensors);
    - "authors": `dst` is a `.pth` file of the authors' keys (their code has no config file).
    """
    from safetensors.torch import save_file

    dst = Path(dst)
    tensors = _contiguous(from_ours(state_dict, fmt))
    if fmt == "hf":
        hf_cfg = config_to_hf(config, class_names)
        atomic_write(dst / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        atomic_write(dst / "config.json", lambda p: p.write_text(json.dumps(hf_cfg, indent=2)))
        return dst
    if fmt == "authors":
        atomic_write(dst, lambda p: torch.save(tensors, p))
        return dst
    meta = {"format": "pt", "cvt_config": json.dumps(config.to_dict())}
    if class_names is not None:
        meta["class_names"] = json.dumps(list(class_names))
    atomic_write(dst, lambda p: save_file(tensors, str(p), metadata=meta))
    beside = {"format": "cvt", "config": config.to_dict(), "class_names": class_names, "weights": dst.name}
    atomic_write(dst.parent / "config.json", lambda p: p.write_text(json.dumps(beside, indent=2)))
    return dst
