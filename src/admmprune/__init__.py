"""admmprune: DNN weight pruning and quantization as constrained optimization, solved by ADMM.

The public API is what this module re-exports; everything else is private.
"""

from ._version import __version__ as __version__
from .deployment.compressed import export_compressed, load_compressed
from .deployment.deploy import Deployed, DeployReport, deploy
from .deployment.sparse_checkpoint import load_sparse, save_sparse
from .sets.constraints import (
    NM,
    Channels,
    Columns,
    Constraint,
    Filters,
    Intersection,
    Projection,
    Unstructured,
)
from .sets.quantization import Binary, Quantized, Ternary
from .solvers.admm import ADMM
from .solvers.masked_mapping import MaskedMapping
from .solvers.oneshot.driver import oneshot
from .solvers.oneshot.report import LayerReport, OneShotReport
from .solvers.ssauto import SSAuto
from .structure.compact import CompactionError, CompactReport, compact, zero_dead_inputs
from .structure.groups import ChannelGroup, channel_groups
from .structure.heads import PrunedMultiheadAttention, head_groups
from .weights.masks import Masks, prune
from .weights.select import Target, select

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
    "load_sparse",
    "oneshot",
    "prune",
    "save_sparse",
    "select",
    "zero_dead_inputs",
]


def __getattr__(name: str) -> type:
    # Swin's pruned attention subclasses torchvision's: made on first use, so that
    # ``import admmprune`` does not import torchvision's models (seconds per process)
    if name == "PrunedShiftedWindowAttention":
        from .structure.attention import pruned_swin_class

        return pruned_swin_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
