"""One module per `cvt` subcommand: `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations


def load_classifier(checkpoint: str, device, verb: str):
    """The model `cvt eval` and `cvt predict` run: any checkpoint format, on `device`, in eval mode; one with no
    head, or an untrained one, is refused (`verb`: what there would be nothing to do)."""
    from ..registry import from_pretrained

    model = from_pretrained(checkpoint).to(device).eval()
    if model.num_classes == 0:
        raise ValueError(f"{checkpoint} has no classifier head: nothing to {verb}")
    if model.fresh_classifier:
        raise ValueError(f"{checkpoint} holds no trained classifier (only the encoder): fine-tune it first, "
                         "e.g. cvt train --pretrained")
    return model
