"""`TrainConfig`: everything a training run needs, as one validated dataclass; recipes are YAML files of its fields.

Precedence, lowest first: the defaults below, a recipe (`--config configs/x.yaml`), then command-line flags. A
resumed run starts from the recipe stored in its checkpoint instead of the defaults. YAML is read by `read_yaml`
(`yaml.safe_load`, but `2e-4` is a number); an unknown key is an error that names the key and the closest known
ones.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

AMP_MODES = ("auto", "none", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
# The `head:` values each task builds (cvt.detection.HEADS for detection), without importing the tasks.
TASK_HEADS = {
    "detection": ("fasterrcnn", "maskrcnn", "retinanet", "fcos"),
    "segmentation": ("upernet", "fpn"),  # cvt.segmentation.DECODERS
}


# The task a data spec implies when a recipe names none, by the spec's prefix; any other spec (fashion-mnist,
# imagefolder:PATH) is classification.
DATA_TASKS = {"coco": "detection", "seg": "segmentation"}


def default_task(data: str) -> str:
    return DATA_TASKS.get(data.partition(":")[0], "classification")


@dataclass
class TrainConfig:
    # ---- what to train --------------------------------------------------------------------------------------
    # What the model learns (`cvt.tasks`): "classification". None: the data's (default_task above).
    task: str | None = None
    # A registered variant (`cvt zoo`). None: "cvt_tiny", or the architecture a --pretrained checkpoint describes.
    # "timm:<name>": a timm model, the classifier (e.g. timm:resnet_cifar_small, cvt.models.baselines) or backbone.
    model: str | None = None
    # CvTConfig fields to change, e.g. {drop_path_rate: 0.1, depths: [1, 2, 4]}; a timm model's keyword arguments.
    model_args: dict[str, Any] = field(default_factory=dict)
    # Local weights in any format `cvt.read_checkpoint` reads; the head is re-initialised for the new classes.
    pretrained: str | None = None
    # A dense task's head (None: the task's default): segmentation "upernet" or "fpn" (smp decoders).
    head: str | None = None

    # ---- data -----------------------------------------------------------------------------------------------
    data: str = "fashion-mnist"  # or "imagefolder:PATH" with PATH/train/<class>/*, PATH/val/<class>/*
    data_dir: str | None = None  # folder of the four Fashion-MNIST .gz files (default: Debian's)
    img_size: int | None = None  # None: 28 for Fashion-MNIST, the model's own size for image folders
    crop_pct: float = 0.875  # evaluation: resize to img_size / crop_pct, centre-crop img_size
    interpolation: str = "bicubic"
    num_workers: int | None = None  # None: 0 for in-memory data, else a share of the CPUs
    strict_data: bool = False  # an unreadable image is an error instead of being skipped and counted

    # ---- detection (cvt.tasks.detection) --------------------------------------------------------------------
    # (`head` above: the detector over the backbone, fasterrcnn (default), maskrcnn, retinanet or fcos.)
    # The detector builder's settings beyond the task's small-data defaults, e.g. {fpn_channels: 128,
    # box_batch_size_per_image: 256, anchor_sizes: [32, 64, 128, 256, 512]} (cvt.detection.build_detector).
    head_args: dict[str, Any] = field(default_factory=dict)
    # torchvision's GeneralizedRCNNTransform: shorter side resized to min_size, longer side at most max_size.
    # None: the task's defaults for 96-128 px scenes (128/192), not torchvision's 800/1333 for COCO.
    min_size: int | None = None
    max_size: int | None = None

    # ---- optimisation ---------------------------------------------------------------------------------------
    epochs: int = 10
    steps_per_epoch: int | None = None  # cap on optimizer steps per epoch (quick trials); None: the whole split
    batch_size: int = 128  # global: images per optimizer step over all processes and accumulation steps
    accum_steps: int = 1  # gradient accumulation: each process runs batch_size / (world * accum_steps) at a time
    lr: float = 1e-3  # peak learning rate (no implicit scaling with the batch size)
    weight_decay: float = 0.05  # AdamW; never on norms, biases and the cls token
    warmup_epochs: float = 1.0  # linear warm-up from warmup_lr, per step
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5  # the cosine ends here ...
    cooldown_epochs: float = 0.0  # ... and stays here for the last cooldown_epochs
    clip_grad: float | None = None  # max global gradient norm
    label_smoothing: float = 0.1
    ema_decay: float = 0.0  # 0: no EMA; else the EMA weights are evaluated and saved
    ema_warmup: bool = False  # decay min(ema_decay, 1 - step^-2/3) (timm's warm-up): early averages forget faster

    # ---- data split (classification) ------------------------------------------------------------------------
    # Hold this many training images out (the same class-balanced ones for every seed and model) as the
    # validation split, so that choices never see the test set; it is then left to `cvt eval`. 0: validate on
    # the test split (Fashion-MNIST) or PATH/val.
    holdout: int = 0
    # Train on this fraction of the (remaining) training images: a class-balanced subset, the same for every seed
    # and model, each smaller fraction's images inside every larger one's.
    train_fraction: float = 1.0

    # ---- augmentation ---------------------------------------------------------------------------------------
    mixup: float = 0.0  # Beta(alpha, alpha) of Mixup; 0 off
    cutmix: float = 0.0  # Beta(alpha, alpha) of CutMix; 0 off
    mixup_prob: float = 1.0  # chance a batch is mixed at all
    mixup_switch_prob: float = 0.5  # chance of CutMix instead of Mixup when both are on
    randaugment: str | None = None  # timm RandAugment spec, e.g. "rand-m9-mstd0.5-inc1" (image folders)
    color_jitter: float = 0.0  # image folders; ignored when randaugment is set (as in timm)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop area range (image folders)
    shift: int = 0  # in-memory data (Fashion-MNIST): random translation of up to this many pixels
    hflip: float = 0.5  # horizontal flip probability
    reprob: float = 0.0  # random erasing probability (timm, per image, "pixel" mode)

    # ---- machinery ------------------------------------------------------------------------------------------
    amp: str = "auto"  # auto: bf16 (or fp16 + loss scaling) on CUDA, none on CPU
    device: str | None = None  # None: cuda when available, else cpu
    seed: int = 0
    eval_every: int = 1  # evaluate every N epochs (the last epoch always)
    # Besides the checkpoint at each epoch's end, one within an epoch once this many minutes have passed since the
    # last (0: off): a run killed outright (SIGKILL, a lost node) loses at most this much, however long its epochs.
    checkpoint_minutes: float = 30.0
    # Wall-clock time the run may take, e.g. "9m", "540s", "1h30m" (cvt.budget): after its first steps the run fits
    # its length (at most epochs x steps) and the cosine to what ends inside it, final evaluation included.
    time_budget: str | float | None = None
    grad_checkpointing: bool = False
    # Under DDP, BatchNorm statistics over the global batch: N processes then train as one process with the same
    # batch. Off: each process normalises its own share, as the authors trained (no extra communication).
    sync_bn: bool = False
    compile: bool = False  # torch.compile the model (pays a compile at start; measured: not worth it yet, README)
    # torch.compile's mode: "reduce-overhead" adds CUDA graphs, for GPU steps bound by queuing kernels
    compile_mode: str = "default"
    out: str = "runs/train"

    def __post_init__(self) -> None:
        if self.model_args is None:  # `model_args:` with every key commented out
            self.model_args = {}
        if self.head_args is None:
            self.head_args = {}
        if isinstance(self.crop_scale, list):
            self.crop_scale = tuple(self.crop_scale)
        if self.task is None and isinstance(self.data, str):
            self.task = default_task(self.data)  # recipe.yaml and the checkpoint record the task that trained
        for name in ("pretrained", "data_dir", "out"):  # a Path from Python code; recipe.yaml stores text
            if isinstance(getattr(self, name), os.PathLike):
                setattr(self, name, os.fspath(getattr(self, name)))
            if isinstance(getattr(self, name), str) and getattr(self, name).startswith("~"):
                # no shell expands a recipe's `~/runs` (nor `--set out=~/runs`): it would be a folder named `~`
                setattr(self, name, os.path.expanduser(getattr(self, name)))
        self.validate()

    # ---------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, name: str, what: str) -> None:
            if not cond:
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(self.model is None or isinstance(self.model, str), "model", "a model name")
        need(isinstance(self.model_args, dict), "model_args", "a mapping of CvTConfig fields")
        need(self.head is None or (isinstance(self.head, str) and bool(self.head)), "head", "a head name or null")
        need(isinstance(self.data, str) and bool(self.data), "data", "'fashion-mnist' or 'imagefolder:PATH'")
        from .tasks import task_names

        if isinstance(self.data, str) and self.task == default_task(self.data) not in task_names():
            raise ValueError(f"data {self.data!r} implies task {self.task!r}, which cvt cannot train yet; "
                             f"known tasks: {', '.join(task_names())}")
        need(self.task in task_names(), "task", f"one of {', '.join(task_names())}")
        need(self.img_size is None or (is_int(self.img_size) and self.img_size >= 1), "img_size", "a positive integer")
        if self.head is not None and self.task in TASK_HEADS:
            need(self.head in TASK_HEADS[self.task], "head",
                 f"one of {', '.join(TASK_HEADS[self.task])} or null (the default) for task {self.task}")
        need(isinstance(self.head_args, dict), "head_args", "a mapping of cvt.detection.build_detector settings")
        for name in ("min_size", "max_size"):
            need(getattr(self, name) is None or (is_int(getattr(self, name)) and getattr(self, name) >= 1), name,
                 "a positive integer or null")
        need(is_num(self.crop_pct) and 0 < self.crop_pct <= 1, "crop_pct", "in (0, 1]")
        need(self.interpolation in INTERPOLATIONS, "interpolation", f"one of {', '.join(INTERPOLATIONS)}")
        need(self.num_workers is None or (is_int(self.num_workers) and self.num_workers >= 0), "num_workers", ">= 0")
        need(is_int(self.epochs) and self.epochs >= 1, "epochs", "an integer >= 1")
        need(self.steps_per_epoch is None or (is_int(self.steps_per_epoch) and self.steps_per_epoch >= 1),
             "steps_per_epoch", "an integer >= 1 or null")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "an integer >= 1")
        need(is_int(self.accum_steps) and self.accum_steps >= 1, "accum_steps", "an integer >= 1")
        need(is_num(self.lr) and self.lr > 0, "lr", "a positive number")
        need(is_num(self.weight_decay) and self.weight_decay >= 0, "weight_decay", ">= 0")
        need(is_num(self.warmup_epochs) and self.warmup_epochs >= 0, "warmup_epochs", ">= 0")
        need(is_num(self.warmup_lr) and self.warmup_lr >= 0, "warmup_lr", ">= 0")
        need(is_num(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", f"between 0 and lr ({self.lr})")
        need(is_num(self.cooldown_epochs) and 0 <= self.cooldown_epochs < self.epochs, "cooldown_epochs",
             "between 0 and epochs")
        need(self.clip_grad is None or (is_num(self.clip_grad) and self.clip_grad > 0), "clip_grad", "> 0 or null")
        need(is_num(self.label_smoothing) and 0 <= self.label_smoothing < 1, "label_smoothing", "in [0, 1)")
        need(is_num(self.ema_decay) and 0 <= self.ema_decay < 1, "ema_decay", "in [0, 1) (0: off)")
        for name in ("mixup", "cutmix", "color_jitter"):
            need(is_num(getattr(self, name)) and getattr(self, name) >= 0, name, ">= 0")
        for name in ("mixup_prob", "mixup_switch_prob", "hflip", "reprob"):
            need(is_num(getattr(self, name)) and 0 <= getattr(self, name) <= 1, name, "in [0, 1]")
        need(self.randaugment is None or isinstance(self.randaugment, str),
             "randaugment", "a timm RandAugment spec like 'rand-m9-mstd0.5-inc1' or null")
        if self.randaugment is not None:
            check_randaugment(self.randaugment)
        need(isinstance(self.crop_scale, tuple) and len(self.crop_scale) == 2
             and all(is_num(v) for v in self.crop_scale)
             and 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", "two numbers 0 < lo <= hi <= 1")
        need(is_int(self.shift) and self.shift >= 0, "shift", "an integer >= 0")
        need(is_int(self.holdout) and self.holdout >= 0, "holdout", "an integer >= 0 (0: none)")
        need(is_num(self.train_fraction) and 0 < self.train_fraction <= 1, "train_fraction", "in (0, 1]")
        if self.task != "classification" and (self.holdout or self.train_fraction != 1):
            raise ValueError(f"holdout and train_fraction split a classification training set, not {self.task}'s")
        need(self.amp in AMP_MODES, "amp", f"one of {', '.join(AMP_MODES)}")
        need(self.device is None or isinstance(self.device, str), "device", "cpu, cuda or cuda:N")
        need(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0")
        for name in ("sync_bn", "compile", "grad_checkpointing", "strict_data", "ema_warmup"):
            need(isinstance(getattr(self, name), bool), name, "true or false")
        for name in ("pretrained", "data_dir"):
            need(getattr(self, name) is None or (isinstance(getattr(self, name), str) and bool(getattr(self, name))),
                 name, "a path or null")
        need(self.compile_mode in COMPILE_MODES, "compile_mode", f"one of {', '.join(COMPILE_MODES)}")
        need(is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "an integer >= 1")
        need(is_num(self.checkpoint_minutes) and self.checkpoint_minutes >= 0, "checkpoint_minutes", ">= 0 (0: off)")
        need(isinstance(self.out, str) and bool(self.out), "out", "a folder path")
        if self.time_budget is not None:
            from .budget import parse_duration

            try:
                parse_duration(self.time_budget)
            except ValueError:
                need(False, "time_budget", "a duration like 9m, 540s or 1h30m, or null")
        if (self.mixup > 0 or self.cutmix > 0) and self.batch_size % 2:
            raise ValueError(f"batch_size must be even with mixup/cutmix (pairs are mixed), got {self.batch_size}")

    # ---------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def replace(self, **changes: Any) -> TrainConfig:
        check_keys(changes, "settings")
        return dataclasses.replace(self, **changes)


# The parts of a timm RandAugment spec after "rand", as timm's parser reads them (timm/data/auto_augment.py,
# rand_augment_transform): a key, then a value starting at the first digit.
_RANDAUGMENT_PARTS = {
    "m": (int, lambda v: v >= 0, "m<int>: magnitude, >= 0 (timm's default 10)"),
    "n": (int, lambda v: v >= 1, "n<int>: operations per image, >= 1"),
    "p": (float, lambda v: 0 <= v <= 1, "p<float>: probability of each operation, in [0, 1]"),
    "mstd": (float, lambda v: v >= 0, "mstd<float>: magnitude noise, >= 0 (> 100: uniform)"),
    "mmax": (int, lambda v: v >= 1, "mmax<int>: magnitude upper bound, >= 1"),
    "inc": (int, lambda v: v in (0, 1), "inc<0|1>: severity increasing with magnitude"),
}
_RANDAUGMENT_SETS = ("weights", "3a", "3aw")  # t<name>: timm's named transform sets


def check_randaugment(spec: str) -> None:
    """Raise a ValueError naming the bad part of a RandAugment spec. timm's own parser skips parts it cannot
    read ('rand-foo', 'rand-m') and falls back to defaults for unknown transform sets, so a typo would train
    silently with other augmentation than asked for; this reads the grammar strictly, then lets timm build it."""
    import re

    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"randaugment must start with 'rand' (e.g. 'rand-m9-mstd0.5-inc1'; null: off), got {spec!r}")
    keys = ", ".join(h.split(":")[0] for *_, h in _RANDAUGMENT_PARTS.values())
    grammar = f"{keys}, t<{'|'.join(_RANDAUGMENT_SETS)}>"
    for part in parts[1:]:
        if part.startswith("t"):
            if part[1:] not in _RANDAUGMENT_SETS:
                raise ValueError(f"randaugment {spec!r}: unknown transform set {part!r}; the parts are {grammar}")
            continue
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not match or match.group(1) not in _RANDAUGMENT_PARTS:
            raise ValueError(f"randaugment {spec!r}: cannot read {part!r}; the parts are {grammar}")
        kind, ok, hint = _RANDAUGMENT_PARTS[match.group(1)]
        try:
            value = kind(match.group(2))
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise ValueError(f"randaugment {spec!r}: bad value in {part!r}; expected {hint}")
    # Our grammar follows the installed timm; should a timm version read it differently, say so in one line too.
    from timm.data.auto_augment import rand_augment_transform

    try:
        rand_augment_transform(spec, {})
    except Exception as e:  # noqa: BLE001 - timm signals a bad spec with AssertionError, ValueError, KeyError
        raise ValueError(f"randaugment {spec!r} is refused by timm: {e or type(e).__name__}") from None


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def check_keys(d: dict[str, Any], where: str) -> None:
    known = field_names()
    for key in d:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"unknown key {key!r} in {where}{hint}")


# YAML 1.2's (and Python's) exponent floats without a dot, which YAML 1.1 (PyYAML) reads as strings: `5e-4`, `1E+3`,
# `.5e3`. Forms with a dot (`1.0e-3`) are YAML 1.1 floats already.
_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


@functools.cache
def _yaml_classes() -> tuple[type, type]:
    """SafeLoader and SafeDumper that also know `_EXPONENT_FLOAT` (added to copies of PyYAML's resolver tables;
    tried after YAML 1.1's own, which none of these strings match)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    for cls in (Loader, Dumper):
        cls.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+.0123456789"))
    return Loader, Dumper


def read_yaml(text: str) -> Any:
    """`yaml.safe_load`, except that `5e-4` is a float, as in YAML 1.2 and Python.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-3`), so `lr: 5e-4` or `--set min_lr=2e-4` would
    otherwise arrive as the string '5e-4' and be refused as not a number.
    """
    import yaml

    return yaml.load(text, Loader=_yaml_classes()[0])


def write_yaml(data: Any) -> str:
    """`yaml.safe_dump` (keys in their order) that `read_yaml` reads back to the same values: a string such as
    '1e-3' is written quoted."""
    import yaml

    return yaml.dump(data, Dumper=_yaml_classes()[1], sort_keys=False)


def load_recipe(path: str | Path) -> dict[str, Any]:
    """The settings in a YAML recipe (validated names; values are checked when the TrainConfig is built)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = read_yaml(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping of settings (key: value), got {type(data).__name__}")
    check_keys(data, f"recipe {path}")
    return data


def build_config(base: dict[str, Any] | None = None, *layers: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from `base` (e.g. a resumed run's settings) updated by each layer in turn."""
    merged: dict[str, Any] = {}
    for layer in (base or {}, *layers):
        check_keys(layer, "settings")
        for key, value in layer.items():
            if key == "model_args" and isinstance(value, dict) and isinstance(merged.get(key), dict):
                value = {**merged[key], **value}  # model_args merge field by field
            merged[key] = value
    return TrainConfig(**merged)
