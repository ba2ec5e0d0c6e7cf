"""cvt: the Convolutional Vision Transformer (Wu et al., ICCV 2021) for PyTorch."""
from . import models  # registers the cvt_* models with timm (timm.list_models(module="cvt"))
from .config import CvTConfig
from .flops import count_macs
from .layers import fast_paths, set_fast_paths
from .model import CvT, param_count
from .registry import create_model, default_config, from_pretrained, list_models
from .weights import CheckpointError, read_checkpoint, save_weights

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CvT",
    "CvTConfig",
    "count_macs",
    "create_model",
    "default_config",
    "fast_paths",
    "from_pretrained",
    "list_models",
    "models",
    "param_count",
    "read_checkpoint",
    "save_weights",
    "set_fast_paths",
]
