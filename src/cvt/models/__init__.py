"""timm's view of cvt: the `cvt_*` entry points, their pretrained configs and the checkpoint filter; and the
baselines CvT is compared with (`cvt.models.baselines`: CIFAR-stem ResNets and 28 px ViTs from timm's classes).

Importing it (`import cvt` does) registers the models with timm, from the modules `cvt.models.cvt` and
`cvt.models.baselines`, which timm lists as `timm.list_models(module="cvt")` and `module="baselines"`.
"""

from . import baselines  # noqa: F401 - registers resnet_cifar_* and vit_fmnist_* with timm
from .cvt import build_cvt, checkpoint_filter_fn, default_cfgs

__all__ = ["build_cvt", "checkpoint_filter_fn", "default_cfgs"]
