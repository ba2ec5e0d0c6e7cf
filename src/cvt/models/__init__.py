"""timm's view of cvt: the `cvt_*` entry points, their pretrained configs and the checkpoint filter.

Importing it (`import cvt` does) registers the models with timm, from the module `cvt.models.cvt`, which timm lists
as `timm.list_models(module="cvt")`.
"""

from .cvt import build_cvt, checkpoint_filter_fn, default_cfgs

__all__ = ["build_cvt", "checkpoint_filter_fn", "default_cfgs"]
