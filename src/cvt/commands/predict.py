"""`cvt predict`: the top-k classes of each image, with probabilities; class names come with the checkpoint.

    cvt predict --checkpoint runs/demo/model.safetensors shirt.png boot.jpg
    cvt predict --checkpoint runs/demo --json photos/          # a folder: every image in it

A dense-prediction run answers with its task's output (`Task.predict_files`; detection: boxes x1, y1, x2, y2 in
the image's pixels, class names, scores, masks as COCO RLE with --json); --save DIR draws them on each image:

    cvt predict --checkpoint runs/det scene.png --json --save drawn/

An unreadable file gets an error line and the others are still answered (exit status 1 when any failed).

--backend onnxruntime runs a classifier in ONNX Runtime on the CPU instead of PyTorch, on the same preprocessed
batches (docs/export.md): the model is exported once per checkpoint and image size into a cache folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

BACKENDS = ("torch", "onnxruntime")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="weights in any format (cvt, Hugging Face, authors')")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    parser.add_argument("--top-k", type=int, default=5, help="classes to show per image (default 5)")
    parser.add_argument("--img-size", type=int, help="input side (default: what the checkpoint was trained at)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--tta", default="none", choices=("none", "hflip"),
                        help="test-time augmentation: hflip averages the image's and its mirror's probabilities")
    parser.add_argument("--backend", default="torch", choices=BACKENDS,
                        help="classifiers: run the model in PyTorch (default) or in ONNX Runtime on the CPU, "
                        "exported once per checkpoint into $XDG_CACHE_HOME/cvt/onnx (default ~/.cache/cvt/onnx)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument("--save", metavar="DIR", help="dense runs: write each image with its predictions drawn here")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="dense runs: keep detections scoring at least this (default 0.5)")


def _expand(paths: list[str]) -> list[str]:
    from ..data import IMAGE_EXTENSIONS

    out = []
    for p in paths:
        if os.path.isdir(p):
            for dirpath, dirnames, files in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                out += [os.path.join(dirpath, f) for f in sorted(files)
                        if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
        else:
            out.append(p)
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from ..data import BatchTransform, file_transform, open_image, preprocess_for
    from ..engine import pick_device
    from ..model import CvT
    from ..tasks.classification import input_channels, log_probs
    from . import dense_task, load_classifier

    if args.top_k < 1 or args.batch_size < 1:
        raise ValueError("--top-k and --batch-size must be >= 1")
    onnx = args.backend == "onnxruntime"
    if onnx and args.device not in (None, "cpu"):
        raise ValueError("--backend onnxruntime runs on the CPU: leave out --device or pass --device cpu")
    device = pick_device("cpu" if onnx else args.device)
    task = dense_task(args.checkpoint)
    if task is not None:
        if onnx:
            raise ValueError("--backend onnxruntime runs classifiers only; predict with a detection or "
                             "segmentation run with --backend torch")
        return _run_dense(task, args, device)
    if args.save:
        raise ValueError("--save draws a dense run's predictions; a classifier has none to draw")
    if onnx:
        import onnxruntime  # noqa: F401 - missing, it fails here, before any loading, with cli.py's pip hint
    model = load_classifier(args.checkpoint, device, "predict")
    if onnx and not isinstance(model, CvT):
        raise ValueError("--backend onnxruntime runs CvT classifiers only (cvt.export); predict with this timm model "
                         "with --backend torch")
    names = model.class_names if model.class_names and len(model.class_names) == model.num_classes else None
    names = names or [str(i) for i in range(model.num_classes)]
    pre = preprocess_for(args.checkpoint, input_channels(model), args.img_size, 224)
    to_tensor, to_model = file_transform(pre, train=False), BatchTransform(pre)
    k = min(args.top_k, model.num_classes)
    forward = onnx_forward(model, pre.img_size) if onnx else model

    paths = _expand(args.images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(args.images)}")
    results: dict[str, dict] = {}
    ready: list[tuple[str, torch.Tensor]] = []

    def flush() -> None:
        if not ready:
            return
        x = torch.stack([t for _, t in ready]).to(device)
        with torch.no_grad():
            probs = log_probs(forward, to_model(x), args.tta).exp()
        top = probs.topk(k, dim=-1)
        for (path, _), p, i in zip(ready, top.values.tolist(), top.indices.tolist()):
            results[path] = {"image": path, "predictions": [
                {"class": names[c], "index": c, "probability": round(q, 6)} for q, c in zip(p, i)]}
        ready.clear()

    for path in paths:
        try:
            if not Path(path).is_file():
                raise FileNotFoundError("no such file")
            ready.append((path, to_tensor(open_image(path, pre.in_chans))))
        except Exception as e:  # noqa: BLE001 - one bad file must not stop the others
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            results[path] = {"image": path, "error": f"{type(e).__name__}: {reason}"}
            print(f"cvt predict: error: {path}: {reason}", file=sys.stderr)
        if len(ready) >= args.batch_size:
            flush()
    flush()

    ordered = [results[p] for p in paths]
    if args.json:
        print(json.dumps(ordered, indent=2))
    else:
        for r in ordered:
            if "predictions" in r:
                tops = ", ".join(f"{p['class']} {p['probability'] * 100:.1f}%" for p in r["predictions"])
                print(f"{r['image']}: {tops}")
    return 1 if any("error" in r for r in ordered) else 0


def onnx_cache_dir() -> Path:
    """Where exported models are kept between runs: $XDG_CACHE_HOME/cvt/onnx, else ~/.cache/cvt/onnx."""
    from ..utils import cache_dir

    return cache_dir() / "onnx"


def onnx_cache_key(model, img_size: int) -> str:
    """A digest of everything the exported file depends on: the loaded model's config and every tensor of its state
    (so any checkpoint format, and any copy or rewrite of the file, gives the key its content does), the image side
    it is traced at, and the cvt and torch versions that export it."""
    import torch

    import cvt

    h = hashlib.sha256(json.dumps([model.cfg.to_dict(), img_size, cvt.__version__, torch.__version__],
                                  sort_keys=True, default=str).encode())
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:32]


def onnx_session(path: str | os.PathLike):
    """An ONNX Runtime CPU session on `path` with as many threads as PyTorch uses. Its threads do not spin-wait
    after a run (ONNX Runtime's default), which would take the cores from the PyTorch preprocessing between
    batches; benchmarks/latency.py times sessions made here."""
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_forward(model, img_size: int):
    """`model` as a function of a float batch run by ONNX Runtime: exported (`cvt.export.export_onnx`, atomically)
    into the cache on first use for this model and side, the cached file reused after that."""
    import torch

    from ..export import export_onnx

    if img_size < model.min_input_size():
        raise ValueError(f"--img-size {img_size} is below this model's minimum input of {model.min_input_size()} px")
    path = onnx_cache_dir() / f"{onnx_cache_key(model, img_size)}.onnx"
    if not path.is_file():
        print(f"cvt predict: exporting the model to ONNX once, into {path}", file=sys.stderr)
        export_onnx(model, path, img_size)
    session = onnx_session(path)

    def forward(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(["logits"], {"images": x.contiguous().numpy()})[0])

    return forward


def _run_dense(task, args: argparse.Namespace, device) -> int:
    """A dense task's predictions (`task.predict_files`), one JSON document or a line per image."""
    model, settings = task.load_for_inference(args.checkpoint, device)
    paths = _expand(args.images)
    if not paths:
        raise ValueError(f"no images found in {', '.join(args.images)}")
    records = task.predict_files(model, settings, paths, device=device, score_threshold=args.score_threshold,
                                 save_dir=Path(args.save) if args.save else None)
    for r in records:
        if "error" in r:
            print(f"cvt predict: error: {r['image']}: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(records, indent=2))
    else:
        for r in records:
            if "error" not in r:
                print(task.format_prediction(r))
    return 1 if any("error" in r for r in records) else 0
