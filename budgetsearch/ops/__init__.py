"""Training operators: gradient-filtered and channel-sparse convolutions, and their modules.

- :func:`filtered_conv2d`, :func:`check_filterable`: the gradient filter of Yang et al. (CVPR'23).
- :func:`sparse_conv2d`, :func:`sparse_linear`: weight gradients for chosen channels only.
- :class:`PlannedConv2d`, :class:`PlannedLinear`: drop-in modules combining both.
"""

from __future__ import annotations

from .filtered import FilterGeometry, check_filterable, filter_geometry, filtered_conv2d
from .modules import PlannedConv2d, PlannedLinear, replace_module
from .sparse import ChannelSelection, ConvArgs, conv_args, sparse_conv2d, sparse_linear

__all__ = [
    "ChannelSelection",
    "ConvArgs",
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
]
