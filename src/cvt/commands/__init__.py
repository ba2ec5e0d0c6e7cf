"""One module per `cvt` subcommand: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations


def load_classifier(checkpoint: str, device, verb: str):
    """The model `cvt eval` and `cvt predict` run: any checkpoint format, or a timm classifier's run, on `device`, in
    eval mode; one with no head, or an untrained one, is refused (`verb`: what there would be nothing to do)."""
    from ..registry import from_pretrained
    from ..tasks.classification import load_timm_classifier

    model = load_timm_classifier(checkpoint)
    if model is None:
        model = from_pretrained(checkpoint)
    model = model.to(device).eval()
    if model.num_classes == 0:
        raise ValueError(f"{checkpoint} has no classifier head: nothing to {verb}")
    if model.fresh_classifier:
        raise ValueError(f"{checkpoint} holds no trained classifier (only the encoder): fine-tune it first, "
                         "e.g. cvt train --pretrained")
    return model


def dense_task(checkpoint: str):
    """The Task class of a dense-prediction checkpoint (a run folder or its model.safetensors), which `cvt eval` and
    `cvt predict` hand the work to (its `load_for_inference`, `evaluate_files`, `predict_files` and
    `format_prediction` hooks, documented in `cvt.tasks.detection`); None for a classifier in any format. The
    task is config.json's "task" beside the weights (else summary.json's)."""
    import json
    from pathlib import Path

    from ..tasks import get_task

    path = Path(checkpoint)
    folder = path if path.is_dir() else path.parent
    for name in ("config.json", "summary.json"):
        try:
            task = json.loads((folder / name).read_text()).get("task")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(task, str):
            return None if task == "classification" else get_task(task)
    return None
