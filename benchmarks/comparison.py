"""The CNN / ViT / CvT comparison (issue 23, docs/comparison.md): every experiment reruns with one command, resumes
when stopped, and writes its figures as JSON under benchmarks/results/issue23/.

    python benchmarks/comparison.py train         # 1, 2, 5, 7: the trained contestants (`cvt train` runs)
    python benchmarks/comparison.py train --only scratch --sizes small    # a part of them
    python benchmarks/comparison.py shift         # 3: shift consistency of the trained models
    python benchmarks/comparison.py attention     # 3: mean attention distance per head (CvT, ViT)
    python benchmarks/comparison.py hierarchy     # 4: feature strides and channels, FPN as it is
    python benchmarks/comparison.py posenc        # 5: accuracy at other input sizes, with and without pos. emb.
    python benchmarks/comparison.py resolution    # 6: speed and memory against input side (contestant registry)
    python benchmarks/comparison.py kv-stride     # 6: what a larger stage-1 key/value stride buys and costs
    python benchmarks/comparison.py report        # the plots (docs/img/comparison/) and the tables, from the JSON

Training uses no code of its own: every contestant is an ordinary `cvt train` run of `configs/comparison.yaml`
(the model and seed set here; for a fraction of the training set, epochs scaled by 1/fraction so the images seen
stay the same), in its own folder under `--runs`. A run folder without summary.json is resumed (`--resume`); a
finished run's final model is evaluated once on the test set (`cvt eval`). The recipe holds 5,000 training images
out as the validation split, so no choice ever sees the test set.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

import contestants
import harness
import probes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results" / "issue23"
RECIPE = ROOT / "configs" / "comparison.yaml"

# ---------------------------------------------------------------------------------------------------------------
# The contestants: `cvt train` arguments, at two sizes (~0.7M and ~3.5M parameters)
# ---------------------------------------------------------------------------------------------------------------
# cvt_tiny widened 2.25x (its heads doubled so each stays 36 wide) to ResNet's and ViT's 3.5M.
CVT_BASE_ARGS = "{embed_dims: [72, 144, 288], num_heads: [2, 4, 8]}"
CONTESTANTS: dict[str, dict[str, Any]] = {
    "cvt_small": dict(family="CvT", size="small", args=["--model", "cvt_tiny"]),
    "resnet_small": dict(family="ResNet", size="small", args=["--model", "timm:resnet_cifar_small"]),
    "vit_small": dict(family="ViT", size="small", args=["--model", "timm:vit_fmnist_small"]),
    "cvt_base": dict(family="CvT", size="base", args=["--model", "cvt_tiny", "--set", f"model_args={CVT_BASE_ARGS}"]),
    "resnet_base": dict(family="ResNet", size="base", args=["--model", "timm:resnet_cifar_base"]),
    "vit_base": dict(family="ViT", size="base", args=["--model", "timm:vit_fmnist_base"]),
    # the ablations (experiments 5 and 7), at the small size
    "cvt_small_pos": dict(family="CvT + position embedding", size="small", args=["--model", "timm:cvt_tiny_pos"]),
    "vit_small_nopos": dict(family="ViT without position embedding", size="small",
                            args=["--model", "timm:vit_fmnist_small", "--set", "model_args={pos_embed: none}"]),
    "cvt_small_linear": dict(family="CvT, linear projection", size="small",
                             args=["--model", "timm:cvt_tiny_linear"]),
}
FAMILIES = ("cvt", "resnet", "vit")
SEEDS = (0, 1, 2)
FRACTIONS = (0.01, 0.1)  # besides the whole training set
TRAIN_IMAGES = 55_000  # Fashion-MNIST's 60,000 less the 5,000 held out
BATCH, EPOCHS = 128, 2  # configs/comparison.yaml's


def run_list(only: set[str], sizes: set[str], seeds: frozenset[int] = frozenset(SEEDS)) -> list[dict[str, Any]]:
    """Every training run, in the order they are worth having: the small from-scratch comparison (3 seeds), the
    ablations and the data-efficiency runs (seed 0), then the base size."""
    runs = []

    def add(group: str, name: str, seed: int = 0, fraction: float = 1.0) -> None:
        if group in only and CONTESTANTS[name]["size"] in sizes and seed in seeds:
            runs.append(dict(group=group, contestant=name, seed=seed, fraction=fraction))

    for seed in SEEDS:
        for f in FAMILIES:
            add("scratch", f"{f}_small", seed)
    for name in ("cvt_small_pos", "vit_small_nopos", "cvt_small_linear"):
        add("ablation", name)
    for fraction in FRACTIONS:
        for f in FAMILIES:
            add("data", f"{f}_small", 0, fraction)
    for seed in SEEDS:
        for f in FAMILIES:
            add("scratch", f"{f}_base", seed)
    return runs


def run_key(run: dict[str, Any]) -> str:
    return f"{run['contestant']}_s{run['seed']}_f{run['fraction']:g}"


def schedule(fraction: float) -> tuple[int, float]:
    """Epochs and warm-up epochs for a fraction of the training set: the whole set's steps, as near as whole epochs
    come (the last partial batch of an epoch is dropped)."""
    if fraction == 1:
        return EPOCHS, 0.3
    total_steps = EPOCHS * (TRAIN_IMAGES // BATCH)
    steps = round(fraction * TRAIN_IMAGES) // BATCH
    epochs = round(total_steps / steps)
    return epochs, 0.3 * epochs / EPOCHS


def train_command(run: dict[str, Any], out: Path, resume: bool) -> list[str]:
    cmd = ["cvt", "train", "--config", str(RECIPE.relative_to(ROOT)), *CONTESTANTS[run["contestant"]]["args"],
           "--seed", str(run["seed"]), "--out", os.path.relpath(out, ROOT)]
    if run["fraction"] != 1:
        epochs, warmup = schedule(run["fraction"])
        cmd += ["--set", f"train_fraction={run['fraction']}", "--epochs", str(epochs),
                "--warmup-epochs", f"{warmup:g}", "--eval-every", str(max(1, epochs // 2))]
    return [*cmd, "--resume"] if resume else cmd


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def save(name: str, data: dict[str, Any]) -> None:
    from cvt.utils import write_text

    data.setdefault("machine", harness.machine_info(torch.device("cpu")))
    write_text(RESULTS / f"{name}.json", json.dumps(data, indent=2) + "\n")


def _cvt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(harness.cvt_cli(["cvt", *args]), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                          capture_output=True, text=True)


def train(args: argparse.Namespace) -> int:
    results = load("runs")
    results.setdefault("recipe", RECIPE.read_text())
    results.setdefault("runs", {})
    for run in run_list(set(args.only), set(args.sizes), frozenset(args.seeds)):
        key = run_key(run)
        out = args.runs / key
        if key in results["runs"]:
            continue
        summary = out / "summary.json"
        if not summary.exists():
            cmd = train_command(run, out, resume=(out / "checkpoint.pt").exists())
            if out.exists() and "--resume" not in cmd:
                cmd.append("--overwrite")  # a run that died before its first checkpoint
            print("+", shlex.join(cmd), flush=True)
            if args.dry_run:
                continue
            rc = subprocess.call(harness.cvt_cli(cmd), cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                                 stdout=subprocess.DEVNULL)
            if rc != 0:
                print(f"comparison: {key} failed (exit {rc}); rerun to resume", file=sys.stderr)
                return rc
        elif args.dry_run:
            continue
        s = json.loads(summary.read_text())
        # The test set, once, on the final model (the run's own evaluations were on the held-out split), at the
        # recipe's precision.
        proc = _cvt("eval", "--checkpoint", str(out), "--amp", "none", "--out", str(out / "test"))
        if proc.returncode != 0:
            error = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
            print(f"comparison: cvt eval of {key} failed: {error}", file=sys.stderr)
            return proc.returncode
        test = json.loads((out / "test" / "eval.json").read_text())
        results["runs"][key] = dict(
            run, family=CONTESTANTS[run["contestant"]]["family"], size=CONTESTANTS[run["contestant"]]["size"],
            command=shlex.join(train_command(run, out, resume=False)), params=s["params"],
            train_images=s["train_images"], epochs=s["epochs"],
            images_seen=s["epochs"] * (s["train_images"] // s["config"]["batch_size"]) * s["config"]["batch_size"],
            train_seconds=s["train_seconds"], images_per_s=s["images_per_s"],
            val_top1=s["final_top1"], test_top1=test["top1"], test_top5=test["top5"], test_loss=test["loss"],
            per_class_test_top1=test["per_class_top1"],
            cpu=harness.machine_info(torch.device("cpu"))["cpu"], date=time.strftime("%Y-%m-%d"),
        )
        save("runs", results)
        r = results["runs"][key]
        print(f"comparison: {key}: test top-1 {r['test_top1']:.2f}% (held-out {r['val_top1']:.2f}%), "
              f"{r['train_seconds']:.0f} s, {r['images_per_s']:.0f} images/s", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Probes of the trained models (experiments 3, 5 and 6's accuracy side)
# ---------------------------------------------------------------------------------------------------------------
def _test_images(every: int = 1):
    """Fashion-MNIST's test images (uint8, (N, 1, 28, 28)) and labels; `every`: each `every`-th only, which keeps
    the classes balanced (the test set is ordered at random)."""
    from cvt.data import load_fashion_mnist

    images, labels = load_fashion_mnist("test")
    return images[::every], labels[::every]


def _finished(keys: list[str]) -> list[str]:
    runs = load("runs").get("runs", {})
    missing = [k for k in keys if k not in runs]
    if missing:
        print(f"comparison: not trained yet: {', '.join(missing)} (run `comparison.py train`); skipped", flush=True)
    return [k for k in keys if k in runs]


def _seeded(names: list[str], seeds=SEEDS) -> list[str]:
    return [run_key(dict(contestant=n, seed=s, fraction=1.0)) for n in names for s in seeds]


def shift(args: argparse.Namespace) -> int:
    """Experiment 3: shift consistency of every from-scratch model, on every 20th test image: the item moved over
    a 36 px canvas, seen through a 28 px window centred on it ("window", the side the models were trained at) and
    as the whole canvas ("canvas")."""
    images, labels = _test_images(every=20)
    results = load("shift")
    results.setdefault("models", {})
    for key in _finished(_seeded([f"{f}_{size}" for size in args.sizes for f in FAMILIES], seeds=args.seeds)):
        if key in results["models"]:
            continue
        started = time.perf_counter()
        model, mean, std = probes.load_run(args.runs / key, any_size=True)
        results["models"][key] = {
            view: probes.shift_consistency(model, images, labels, mean, std, canvas=args.canvas,
                                           window=view == "window")
            for view in ("window", "canvas")}
        results["models"][key]["seconds"] = round(time.perf_counter() - started, 1)
        save("shift", results)
        print(f"comparison: shift {key}: " + "; ".join(
            f"{view}: consistency {r['consistency']:.2f}%, accuracy {r['accuracy_min']:.2f}-{r['accuracy_max']:.2f}%"
            for view, r in results["models"][key].items() if view != "seconds"), flush=True)
    return 0


def attention(args: argparse.Namespace) -> int:
    """Experiment 3's second view: mean attention distance per head of the CvTs and ViTs, on 500 test images."""
    images, _ = _test_images(every=20)
    names = ["cvt_small", "vit_small", "cvt_small_pos", "vit_small_nopos", "cvt_small_linear"]
    names += ["cvt_base", "vit_base"] if "base" in args.sizes else []
    results = {"images": len(images), "models": {}}
    for key in _finished(_seeded(names, seeds=(0,))):
        model, mean, std = probes.load_run(args.runs / key)
        x = probes.normalise(images, mean, std)
        with torch.inference_mode():
            rows = (probes.vit_attention_distance(model, x) if key.startswith("vit")
                    else probes.cvt_attention_distance(model, x))
        results["models"][key] = rows
        print(f"comparison: attention {key}: " + "; ".join(
            f"{'stage {} '.format(r['stage']) if 'stage' in r else ''}block {r['block']} "
            f"{sum(r['heads']) / len(r['heads']):.1f} px (uniform {r['uniform']:.1f})" for r in rows), flush=True)
    save("attention", results)
    return 0


def posenc(args: argparse.Namespace) -> int:
    """Experiment 5: test accuracy at other input sides, by resizing and by padding (or centre-cropping), of the
    models with and without position embeddings (seed 0), the ResNet beside them."""
    images, labels = _test_images()
    results = {"sides": args.sides, "models": {}}
    names = ["cvt_small", "cvt_small_pos", "vit_small", "vit_small_nopos", "resnet_small"]
    for key in _finished(_seeded(names, seeds=(0,))):
        model, mean, std = probes.load_run(args.runs / key, any_size=True)
        row: dict[str, Any] = {}
        for side in args.sides:
            for how, fn in (("resize", probes.resize), ("pad", probes.pad_to)):
                if side == images.shape[-1] and how == "pad":
                    continue
                pred = probes.predict(model, probes.normalise(fn(images, side), mean, std))
                row[f"{how}_{side}"] = round(100 * (pred == labels).float().mean().item(), 2)
        results["models"][key] = row
        print(f"comparison: posenc {key}: " + ", ".join(f"{k} {v:.2f}%" for k, v in row.items()), flush=True)
    save("posenc", results)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Hierarchy (experiment 4)
# ---------------------------------------------------------------------------------------------------------------
HIERARCHY_MODELS = {  # name: (family, the side it is built for, in_chans)
    "cvt_tiny": ("CvT", 28, 1), "resnet_cifar_small": ("ResNet", 28, 1), "vit_fmnist_small": ("ViT", 28, 1),
    "cvt_13": ("CvT", 224, 3), "resnet50": ("ResNet", 224, 3), "vit_small_patch16_224": ("ViT", 224, 3),
    "swin_tiny_patch4_window7_224": ("Swin", 224, 3),
}


def hierarchy(args: argparse.Namespace) -> int:
    """Per model: timm's `features_only` maps (reduction, channels, the shapes a forward gives), and whether
    torchvision's FeaturePyramidNetwork takes them as they are and makes a pyramid (more than one stride)."""
    import timm
    from torchvision.ops import FeaturePyramidNetwork

    import cvt  # noqa: F401 - registers cvt's models with timm

    results: dict[str, Any] = {"models": {}}
    for name, (family, side, chans) in HIERARCHY_MODELS.items():
        model = timm.create_model(name, features_only=True, pretrained=False, in_chans=chans).eval()
        info = model.feature_info
        with torch.inference_mode():
            maps = model(torch.randn(1, chans, side, side))
        shapes = [list(m.shape[1:]) for m in maps]
        channels_first = all(s[0] == c for s, c in zip(shapes, info.channels()))
        fpn = FeaturePyramidNetwork(info.channels(), 64).eval()
        with torch.inference_mode():
            out = fpn({str(i): m for i, m in enumerate(maps)}) if channels_first else None
        results["models"][name] = dict(
            family=family, side=side, reductions=info.reduction(), channels=info.channels(), shapes=shapes,
            fpn_takes_it=out is not None,
        )
        print(f"comparison: hierarchy {name}: reductions {info.reduction()}, channels {info.channels()}, "
              f"FPN {'takes it' if out is not None else 'refuses it'}", flush=True)
    save("hierarchy", results)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Efficiency at high resolution (experiment 6): the benchmark harness's contestants, timed against input side
# ---------------------------------------------------------------------------------------------------------------
RESOLUTION_CONTESTANTS = ("ours", "timm:vit_small_patch16_224", "timm:resnet50", "timm:swin_tiny_patch4_window7_224")


def resolution(args: argparse.Namespace) -> int:
    """Inference and training-step images/s and training peak memory of CvT-13 (ours) and timm's ViT-S/16,
    ResNet-50 and Swin-T at each side, at one batch for all, through benchmarks/harness.py. Resumable per side."""
    device = torch.device(args.device)
    file = "resolution" if device.type == "cpu" and args.dtype == "fp32" else f"resolution_{device.type}_{args.dtype}"
    results = load(file)
    results.setdefault("sides", {})
    for side in args.res_sides:
        if str(side) in results["sides"]:
            continue
        cfg = harness.BenchConfig(model="cvt_13", img_size=side, infer_batches=(args.res_batch,),
                                  train_batch=args.res_batch, rounds=args.rounds, memory_rounds=1,
                                  impls=RESOLUTION_CONTESTANTS, baseline="ours", tasks=("infer", "train", "memory"),
                                  min_time=0.5, device=args.device, dtype=args.dtype)
        started = time.perf_counter()
        r = harness.run_benchmark(cfg, log=lambda m: print(f"  {m}", flush=True))
        b = str(args.res_batch)
        setting = contestants.Setting.of("cvt_13", side)
        x = torch.randn(1, 3, side, side, device=device)
        row = {}
        for name in RESOLUTION_CONTESTANTS:
            mem = r["memory"][name]
            model = contestants.build(contestants.parse(name), setting).to(device).eval()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
                ops = probes.attention_ops(model, x)
            row[name] = dict(
                attention_ops=ops,
                label=r["contestants"][name]["label"], params=r["contestants"][name]["params"],
                macs_per_image=r["contestants"][name]["macs_per_image"],
                infer_images_per_s=r["infer"][b][name]["images_per_s"],
                infer_samples_s=r["infer"][b][name]["samples_s"],
                train_images_per_s=r["train"][b][name]["images_per_s"],
                train_samples_s=r["train"][b][name]["samples_s"],
                peak_rss_bytes=mem["peak_rss_bytes"], rss_before_steps_bytes=mem["rss_before_steps_bytes"],
                peak_allocated_bytes=mem.get("peak_allocated_bytes"),
            )
        results["sides"][str(side)] = row
        results.update(batch=args.res_batch, rounds=args.rounds, device=args.device, dtype=args.dtype,
                       command=f"python benchmarks/comparison.py resolution --res-sides "
                               f"{' '.join(map(str, args.res_sides))} --res-batch {args.res_batch} "
                               f"--device {args.device} --dtype {args.dtype}")
        save(file, results)
        print(f"comparison: resolution {side} px done in {time.perf_counter() - started:.0f} s: " + ", ".join(
            f"{n} {v['infer_images_per_s']:.2f}/{v['train_images_per_s']:.2f} images/s" for n, v in row.items()),
            flush=True)
    return 0


def kv_stride(args: argparse.Namespace) -> int:
    """What a larger stage-1 key/value stride buys and costs, without new weights: test accuracy of the small
    CvTs (3 seeds) at stage-1 stride 1, 2 (trained) and 4; CvT-13's inference and training-step speed and MACs at
    stride 2, 4 and 8 at each side."""
    import cvt
    from cvt.flops import count_macs

    images, labels = _test_images()
    results: dict[str, Any] = {"accuracy": {}, "speed": {}}
    for key in _finished(_seeded(["cvt_small"])):
        model, mean, std = probes.load_run(args.runs / key)
        x = probes.normalise(images, mean, std)
        row = {}
        for stride in (1, 2, 4):
            probes.set_stage_kv_stride(model, 0, stride)
            row[str(stride)] = round(100 * (probes.predict(model, x) == labels).float().mean().item(), 2)
        results["accuracy"][key] = row
        print(f"comparison: kv-stride {key}: " + ", ".join(f"stride {k} {v:.2f}%" for k, v in row.items()), flush=True)
    device = torch.device("cpu")
    for side in args.kv_sides:
        calls, macs = {}, {}
        x = torch.randn(args.res_batch, 3, side, side)
        for stride in (2, 4, 8):
            model = cvt.create_model("cvt_13").eval()
            probes.set_stage_kv_stride(model, 0, stride)
            macs[stride] = count_macs(model, side)

            def infer(model=model, x=x):
                with torch.inference_mode():
                    return model(x)

            calls[f"infer_{stride}"] = infer
            # the step trains a copy: `train_step_fn` puts its model in training mode
            calls[f"train_{stride}"] = harness.train_step_fn(copy.deepcopy(model), device, "fp32", args.res_batch,
                                                             side)
        t = harness.interleaved(calls, device, args.rounds, min_time=0.5)
        results["speed"][str(side)] = {
            str(stride): dict(macs_per_image=macs[stride],
                              infer_images_per_s=args.res_batch / t[f"infer_{stride}"]["seconds"],
                              train_images_per_s=args.res_batch / t[f"train_{stride}"]["seconds"])
            for stride in (2, 4, 8)}
        print(f"comparison: kv-stride CvT-13 {side} px: " + ", ".join(
            f"stride {k} {v['infer_images_per_s']:.2f}/{v['train_images_per_s']:.2f} images/s"
            for k, v in results["speed"][str(side)].items()), flush=True)
    results.update(batch=args.res_batch, rounds=args.rounds)
    save("kv_stride", results)
    return 0


# ---------------------------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", choices=list(EXPERIMENTS))
    p.add_argument("--runs", type=Path, default=ROOT / "runs" / "comparison", help="folder of the run folders")
    p.add_argument("--only", nargs="+", default=["scratch", "ablation", "data"],
                   choices=["scratch", "ablation", "data"], help="train: these groups of runs")
    p.add_argument("--sizes", nargs="+", default=["small", "base"], choices=["small", "base"])
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), choices=list(SEEDS),
                   help="train, shift: these seeds")
    p.add_argument("--dry-run", action="store_true", help="train: print the `cvt train` commands only")
    p.add_argument("--canvas", type=int, default=36, help="shift: side of the canvas the 28 px images move on")
    p.add_argument("--sides", type=int, nargs="+", default=[20, 28, 36, 56], help="posenc: input sides")
    p.add_argument("--res-sides", type=int, nargs="+", default=[64, 128, 224, 384, 512],
                   help="resolution: input sides")
    p.add_argument("--kv-sides", type=int, nargs="+", default=[224, 384, 512], help="kv-stride: CvT-13's sides")
    p.add_argument("--res-batch", type=int, default=4, help="resolution, kv-stride: images per call, every model")
    p.add_argument("--rounds", type=int, default=3, help="resolution, kv-stride: rounds of alternation")
    p.add_argument("--device", default="cpu", help="resolution: cpu or cuda (a GPU: e.g. --res-sides 224 384 512 "
                   "768 1024 --res-batch 8, once with --dtype fp32 and once with bf16)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="resolution: bf16 under autocast")
    args = p.parse_args(argv)
    return EXPERIMENTS[args.experiment](args)


def report(args: argparse.Namespace) -> int:
    import comparison_report

    comparison_report.write()
    print(f"comparison: tables in {comparison_report.DOC}, plots in {comparison_report.IMG}")
    return 0


EXPERIMENTS = {"train": train, "shift": shift, "attention": attention, "hierarchy": hierarchy, "posenc": posenc,
               "resolution": resolution, "kv-stride": kv_stride, "report": report}


if __name__ == "__main__":
    sys.exit(main())
