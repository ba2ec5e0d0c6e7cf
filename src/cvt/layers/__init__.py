"""Layers behind cvt's model, like timm.layers: the fast paths (each behind a public switch) and the
normalisation and checkpointing pieces the q/k/v projections need.

    from cvt.layers import fast_paths, set_fast_paths, FAST_PATHS
    with fast_paths(False):            # the reference forward everywhere
        ...
    set_fast_paths(onednn_linear=False)  # or CVT_FAST_PATHS=-onednn_linear in the environment
"""

from .activations import QuickGELU
from .checkpoint import checkpoint_block
from .config import FAST_PATHS, fast_path_config, fast_paths, is_enabled, set_fast_paths
from .linear import Linear
from .norm import BatchNorm2d, sync_batch_norm

__all__ = [
    "FAST_PATHS", "BatchNorm2d", "Linear", "QuickGELU", "checkpoint_block", "fast_path_config", "fast_paths",
    "is_enabled", "set_fast_paths", "sync_batch_norm",
]
