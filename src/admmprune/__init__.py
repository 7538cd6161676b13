"""admmprune: DNN weight pruning and quantization as constrained optimization, solved by ADMM.

The public API is what this module re-exports; everything else is private.
"""

from .admm import ADMM
from .compact import CompactionError, CompactReport, compact, zero_dead_inputs
from .compressed import export_compressed, load_compressed
from .constraints import (
    NM,
    Channels,
    Columns,
    Constraint,
    Filters,
    Intersection,
    Projection,
    Unstructured,
)
from .deploy import Deployed, DeployReport, deploy
from .groups import ChannelGroup, channel_groups
from .heads import PrunedMultiheadAttention, PrunedShiftedWindowAttention, head_groups
from .masks import Masks, prune
from .oneshot import LayerReport, OneShotReport, oneshot
from .proximal import SSAuto
from .quantization import Binary, MaskedMapping, Quantized, Ternary
from .select import Target, select

__version__ = "0.1.0"

__all__ = [
    "ADMM",
    "NM",
    "Binary",
    "ChannelGroup",
    "Channels",
    "Columns",
    "CompactReport",
    "CompactionError",
    "Constraint",
    "DeployReport",
    "Deployed",
    "Filters",
    "Intersection",
    "LayerReport",
    "MaskedMapping",
    "Masks",
    "OneShotReport",
    "Projection",
    "PrunedMultiheadAttention",
    "PrunedShiftedWindowAttention",
    "Quantized",
    "SSAuto",
    "Target",
    "Ternary",
    "Unstructured",
    "channel_groups",
    "compact",
    "deploy",
    "export_compressed",
    "head_groups",
    "load_compressed",
    "oneshot",
    "prune",
    "select",
    "zero_dead_inputs",
]
