"""Training operators: gradient-filtered and channel-sparse convolutions, and their modules.

- :func:`filtered_conv2d`, :func:`check_filterable`: the gradient filter of Yang et al. (CVPR'23).
- :func:`sparse_conv2d`, :func:`sparse_linear`: weight gradients for chosen channels only.
- :class:`PlannedConv2d`, :class:`PlannedLinear`: drop-in modules combining both.
- :class:`Epilogue`: a frozen batch norm and clamp run inside a filtered conv's autograd node.

The operators are PyTorch custom ops with their own backward and fake kernels,
``torch.ops.budgetsearch.sparse_conv2d``, ``sparse_linear`` and ``filtered_conv2d`` (the epilogue
included), so that ``torch.export`` keeps them and ``torch.compile`` traces through them
(:mod:`budgetsearch.ops._library`); the functions and modules here are their Python face.
"""

from __future__ import annotations

from .epilogue import Epilogue
from .filtered import FilterGeometry, check_filterable, filter_geometry, filtered_conv2d
from .modules import PlannedConv2d, PlannedLinear, replace_module, suspended_epilogues
from .sparse import ChannelSelection, ConvArgs, conv_args, sparse_conv2d, sparse_linear

__all__ = [
    "ChannelSelection",
    "ConvArgs",
    "Epilogue",
    "FilterGeometry",
    "PlannedConv2d",
    "PlannedLinear",
    "check_filterable",
    "conv_args",
    "filter_geometry",
    "filtered_conv2d",
    "replace_module",
    "sparse_conv2d",
    "sparse_linear",
    "suspended_epilogues",
]
