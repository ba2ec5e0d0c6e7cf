"""timm's view of cvt: the `cvt_*` entry points, their pretrained configs and the checkpoint filter; and the
baselines CvT is compared with (`cvt.models.baselines`: CIFAR-stem ResNets and 28 px ViTs from timm's classes) and
CvT's own ablations (`cvt.models.ablations`: with position embeddings, without convolutional projections).

Importing it (`import cvt` does) registers the models with timm, from the modules `cvt.models.cvt` and
`cvt.models.baselines` and `cvt.models.ablations`, which timm lists as `timm.list_models(module="cvt")`,
`module="baselines"` and `module="ablations"`.
"""

from . import ablations, baselines  # noqa: F401 - register cvt_tiny_{pos,linear}, resnet_cifar_*, vit_fmnist_*
from .cvt import build_cvt, checkpoint_filter_fn, default_cfgs

__all__ = ["build_cvt", "checkpoint_filter_fn", "default_cfgs"]
