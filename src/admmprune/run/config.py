"""The recipe schema: one YAML file describes pretrain → ADMM → prune → retrain → report.

Unknown keys and wrong types are errors that name the key and what is allowed. The authors'
layout (``prune_ratios: {param: ratio}``, ``rho``, ``admm_epoch``, ``multi_rho``,
``sparsity_type``) is accepted at the top level and converted; note that ``prune_ratios`` are
fractions *pruned*, our ``keep`` is the fraction kept.

Constraints in YAML map a key to ``{type: keep}`` pairs; several pairs intersect::

    constraints:
      conv1: {unstructured: 0.2}
      "layer*.conv*": {filters: 0.5, columns: 0.5}
      "type:Linear": {unstructured: 0.05}    # every nn.Linear
      fc3: null                               # leave alone
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..sets import constraints

__all__ = ["Recipe", "RecipeError"]

#: keys that say where and how a run is shown or placed, not what it computes: a run resumes
#: under other values of these (``data.dir`` / ``data.path`` only while they hold the same data)
NOT_IDENTITY = frozenset(
    {"output_dir", "device", "progress", "logging", "data.dir", "data.path", "data.download"}
    | {"data.num_workers"}
)
DATA_LOCATION = ("data.dir", "data.path")

CONSTRAINT_TYPES = {
    "unstructured": constraints.Unstructured,
    "filters": constraints.Filters,
    "channels": constraints.Channels,
    "columns": constraints.Columns,
}
# The authors' sparsity_type names.
AUTHORS_SPARSITY = {
    "irregular": ("unstructured",),
    "filter": ("filters",),
    "channel": ("channels",),
    "column": ("columns",),
    "filter+column": ("filters", "columns"),
}
AUTHORS_MULTI_RHO = 1.3  # the growth per Z/U update in the authors' ADMM-NN code


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the key and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class OptimizerCfg(_Strict):
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: PosFloat = 0.01
    momentum: NonNegFloat = 0.9
    weight_decay: NonNegFloat = 0.0
    nesterov: bool = False


class ScheduleCfg(_Strict):
    name: Literal["constant", "cosine", "step", "multistep"] = "constant"
    step_size: Annotated[int, Field(gt=0)] = 30
    milestones: list[Annotated[int, Field(gt=0)]] = []
    gamma: PosFloat = 0.1


class StageCfg(_Strict):
    epochs: Annotated[int, Field(ge=0)] = 0
    optimizer: OptimizerCfg = OptimizerCfg()
    schedule: ScheduleCfg = ScheduleCfg()
    # the gradients' global norm is clipped to this before every step (none: no clipping)
    clip_grad_norm: PosFloat | None = None
    # each batch runs as this many micro-batches, their gradients summed into one step (the
    # same step as the whole batch, with 1/grad_accum of its activation memory)
    grad_accum: Annotated[int, Field(gt=0)] = 1


class AdmmCfg(StageCfg):
    update_every: Annotated[int, Field(gt=0)] = 1
    rho: PosFloat | list[PosFloat] = 1e-3
    rho_growth: PosFloat = 1.0
    rho_max: PosFloat | None = None
    mode: Literal["penalty", "grad"] = "penalty"
    lr_reset: bool = True  # restart the schedule at each epoch-end Z/U update (the authors' recipe)
    rounds: Annotated[int, Field(gt=0)] = 1  # progressive ADMM: rounds towards keep^{r/R}
    # > 0: Z/U updates this many times per epoch (no lr reset); 0: every update_every epochs
    updates_per_epoch: Annotated[int, Field(ge=0)] = 0
    # Z⁰: projection = Π_S(W⁰); oneshot = the one-shot solution (the `oneshot` section's
    # solver on calibration images), so ADMM training starts from it
    init: Literal["projection", "oneshot"] = "projection"
    # the Z-step's and the hard prune's metric: adam = the optimizer's exp_avg_sq (keeps the
    # weights of largest v·w²), fisher = mean squared gradients, none = Euclidean
    metric: Literal["adam", "fisher", "none"] = "none"
    # Z and U in fp32 (with a cached T: 12 bytes per constrained weight), bfloat16 (≤ 4 bytes)
    # or float8 (Z in float8_e4m3fn with a per-tensor scale, U in bf16: ≤ 3 bytes); sparse Z is
    # kept as a bitmask + values where smaller; sparsity sets only
    state_dtype: Literal["float32", "bfloat16", "float8"] = "float32"

    @model_validator(mode="after")
    def _adam_metric_needs_adam(self):
        if self.metric == "adam" and self.optimizer.name not in ("adam", "adamw"):
            raise ValueError(
                f"admm.metric: adam reads Adam's second moment, but admm.optimizer is "
                f"{self.optimizer.name}; use optimizer adam / adamw, or metric: fisher"
            )
        return self


Bits = Annotated[int, Field(ge=2, le=16)] | Literal["binary", "ternary"]


class QuantizeCfg(StageCfg):
    """ADMM quantization of the kept weights after masked retraining (ADMM-NN-S).

    ``layers`` maps layer names/globs (as in ``constraints``) to bits, ``binary`` or ``ternary``;
    empty: no quantization. ``epochs: 0`` quantizes in one shot (nearest levels, no training).
    """

    layers: dict[str, Bits] = {}
    levels: Literal["uniform", "pow2"] = "uniform"
    # admm: ADMM towards the levels, then snap; masked_mapping: the authors' retraining that
    # freezes mapping_share more of the weights on their levels every epoch
    method: Literal["admm", "masked_mapping"] = "admm"
    mapping_share: Annotated[float, Field(gt=0, le=1)] = 0.3
    rho: PosFloat = 1e-2
    rho_growth: PosFloat = 1.0
    updates_per_epoch: Annotated[int, Field(gt=0)] = 1


class SsAutoCfg(_Strict):
    """SS-Auto (``method: ssauto``): soft row + column penalties on ``layers``, one global target;
    the per-layer rates come out of the solver (see :mod:`admmprune.solvers.ssauto`)."""

    layers: list[str] = []  # names, globs or type:Name of the layers to prune
    target: Annotated[float, Field(gt=0, le=1)] = 0.5  # fraction kept (of weights or MACs)
    by: Literal["weights", "macs"] = "macs"
    rho: PosFloat = 1e-2
    rho_growth: PosFloat = 1.0
    reweight: bool = False
    debias: bool = True  # Z keeps W's values on the surviving groups (see proximal.py)
    couple_bn: bool = True  # a dead row's BatchNorm entries are pulled to zero with it
    couple: bool = True  # coupled rows (residual streams) are one group: compact removes them
    min_keep: Annotated[float, Field(ge=0, le=1)] = 0.0  # per layer, of rows and of columns
    dual: bool = False  # ADMM's scaled dual U on the soft problem (see proximal.py)
    updates_per_epoch: Annotated[int, Field(gt=0)] = 1


class HeuristicCfg(_Strict):
    """Settings of the baseline methods (see :mod:`admmprune.solvers.baselines`)."""

    cycles: Annotated[int, Field(gt=0)] = 3  # iterative: prune → retrain cycles
    prune_every: Annotated[int, Field(gt=0)] = 50  # gradual: steps between pruning steps
    end: Annotated[float, Field(gt=0, le=1)] = 0.75  # gradual: reach the target at this share


class OneShotCfg(_Strict):
    """One-shot pruning from calibration data (``method: oneshot``, :func:`admmprune.oneshot`):
    ``samples`` training images drawn with the run's seed (no augmentation), in batches of
    ``batch_size``; ``options`` go to the solver (e.g. ``{iters: 40}`` for admm)."""

    solver: Literal["admm", "sparsegpt", "wanda", "magnitude"] = "admm"
    samples: Annotated[int, Field(gt=0)] = 1024
    batch_size: Annotated[int, Field(gt=0)] = 256
    sequential: bool | Literal["layers"] = True  # see admmprune.oneshot
    dense_target: bool = False  # admm: fit the dense model's outputs (see admmprune.oneshot)
    damp: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 0.01
    # an expert routed fewer calibration tokens is pruned by magnitude (see admmprune.oneshot)
    min_expert_tokens: Annotated[int, Field(ge=0)] = 16
    options: dict[str, float | int] = {}

    @model_validator(mode="after")
    def _dense_target_is_admm(self):
        if self.dense_target and self.solver != "admm":
            raise ValueError(
                f"dense_target: true needs solver: admm ({self.solver} solves the plain layer "
                "problem)."
            )
        return self


class CoupledCfg(_Strict):
    """Coupled channel groups (StructADMM on residual nets): each keeps ``keep`` of its channels;
    with ``kind: heads``, each attention module keeps ``keep`` of its heads."""

    keep: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]
    # glob on the group's root layer name (heads: on the attention module's); None: every group
    layers: str | None = None
    kind: Literal["channels", "heads"] = "channels"
    # l2: the Euclidean projection (ADMM); l1: rank channels by L1 norm (one-shot, Li et al.)
    norm: Literal["l2", "l1"] = "l2"


class LoggingCfg(_Strict):
    """Where metrics go besides ``metrics.jsonl``: ``tensorboard: true`` writes every scalar to
    ``RUN_DIR/tensorboard`` too (extra ``[tensorboard]``)."""

    tensorboard: bool = False


class ModelCfg(_Strict):
    name: str | None = None
    kwargs: dict[str, Any] = {}
    checkpoint: str | None = None  # a state_dict (or {"model": state_dict}) to start from
    # a local Hugging Face `save_pretrained` directory of a causal LM (extra [hf]; never
    # downloaded, never trust_remote_code); instead of `name`
    hf: str | None = None

    @model_validator(mode="after")
    def _one_source(self):
        if (self.name is None) == (self.hf is None):
            raise ValueError(
                "model: give exactly one of name (a built-in, torchvision or module:factory "
                "model) and hf (a local Hugging Face directory)"
            )
        if self.hf is not None and (self.kwargs or self.checkpoint):
            raise ValueError("model.hf loads its own config and weights: drop kwargs/checkpoint")
        return self


class DataCfg(_Strict):
    name: Literal["digits", "mnist", "cifar10", "cifar100", "npz", "imagefolder", "text"] = "digits"
    dir: str | None = None
    path: str | None = None  # text: a .txt file or a folder of them (read in name order)
    # text: a tokenizer directory or tokenizer.json (default: the model.hf directory), the
    # sequence length of calibration and perplexity windows, and the share of tokens at the
    # end of the text held out for perplexity
    tokenizer: str | None = None
    seq_len: Annotated[int, Field(gt=1)] = 256
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    download: bool = False
    augment: bool = True
    val_size: Annotated[int, Field(ge=0)] = 0
    image_size: Annotated[int, Field(gt=0)] = 224
    batch_size: Annotated[int, Field(gt=0)] = 64
    # unset on a language model: its batch_size (each window's logits are seq_len × vocab)
    eval_batch_size: Annotated[int, Field(gt=0)] = 512
    num_workers: Annotated[int, Field(ge=0)] = 0


#: ``nm: "2:4"`` (n kept of every m consecutive weights), the others a kept fraction
ConstraintCfg = (
    dict[
        Literal["unstructured", "filters", "channels", "columns", "nm", "per_row"],
        bool | float | str,
    ]
    | None
)


class Recipe(_Strict):
    """A whole run. Every section has defaults except ``model`` and ``constraints``."""

    seed: int = 0
    output_dir: str = "runs/run"
    device: str = "auto"
    amp: bool = False
    progress: bool = True  # progress bars (on a terminal only; elsewhere a line per epoch)
    logging: LoggingCfg = LoggingCfg()
    model: ModelCfg
    # How the compression stage (the `admm` section's epochs) induces sparsity.
    method: Literal["admm", "magnitude", "iterative", "gradual", "ssauto", "oneshot"] = "admm"
    heuristic: HeuristicCfg = HeuristicCfg()
    oneshot: OneShotCfg = OneShotCfg()
    ssauto: SsAutoCfg = SsAutoCfg()
    data: DataCfg = DataCfg()
    pretrain: StageCfg = StageCfg()
    admm: AdmmCfg = AdmmCfg()
    retrain: StageCfg = StageCfg()
    quantize: QuantizeCfg = QuantizeCfg()
    constraints: dict[str, ConstraintCfg] = {}
    default_constraint: ConstraintCfg = None
    # one entry, or a list (different keeps for different layers; their layers must not overlap)
    coupled_channels: CoupledCfg | list[CoupledCfg] | None = None
    compact: bool = True  # at the end: remove zero channel groups, measure MACs and latency

    @field_validator("constraints")
    @classmethod
    def _no_empty(cls, value: dict):
        for key, pairs in value.items():
            if pairs is not None and not pairs:
                raise ValueError(f"{key}: give at least one {{type: keep}} pair, or null")
            for kind, keep in (pairs or {}).items():
                _check_pair(f"constraints[{key!r}]", kind, keep)
        return value

    @field_validator("default_constraint")
    @classmethod
    def _default_pairs(cls, value):
        for kind, keep in (value or {}).items():
            _check_pair("default_constraint", kind, keep)
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if value != "auto" and not value.startswith(("cpu", "cuda", "mps")):
            raise ValueError(f"device {value!r}: use auto, cpu, cuda or cuda:N")
        return value

    @model_validator(mode="after")
    def _metric_is_admm(self):
        if self.admm.metric != "none" and self.method != "admm":
            raise ValueError(
                f"admm.metric: {self.admm.metric} is the metric of ADMM's projection, but "
                f"method is {self.method}; set method: admm, or drop admm.metric"
            )
        return self

    @model_validator(mode="after")
    def _something_to_constrain(self):
        if (self.model.hf is not None) != (self.data.name == "text"):
            raise ValueError(
                "a language-model run needs both model.hf (a local Hugging Face causal LM) and "
                "data.name: text; the image pipelines take neither"
            )
        if self.model.hf is not None and (
            self.method == "ssauto" or self.coupled_channels is not None
        ):
            raise ValueError(
                "a model.hf run prunes weights (unstructured, per_row, nm, …) one shot or with "
                "method admm / gradual / magnitude / iterative; coupled_channels and method: "
                "ssauto are for image models"
            )
        if self.method == "ssauto":
            if any(v is not None for v in self.constraints.values()) or self.coupled_channels:
                raise ValueError(
                    "method: ssauto chooses the per-layer rates itself; list its layers in "
                    "ssauto.layers (and the global target in ssauto.target) instead of "
                    "constraints / coupled_channels"
                )
            if not self.ssauto.layers:
                raise ValueError("method: ssauto needs ssauto.layers, e.g. ['type:Conv2d']")
            if self.admm.epochs == 0:
                raise ValueError("method: ssauto needs admm.epochs > 0 (its training stage)")
            return self
        if (
            not any(v is not None for v in self.constraints.values())
            and not self.default_constraint
            and self.coupled_channels is None
        ):
            raise ValueError(
                "constraints: no layer is constrained; give at least one {type: keep} "
                "(or coupled_channels)"
            )
        if self.method == "oneshot" and self.admm.epochs > 0:
            raise ValueError(
                "method: oneshot prunes from calibration data with no training: set admm.epochs: "
                "0 (retrain.epochs fine-tunes the pruned model afterwards)"
            )
        if self.admm.init == "oneshot" and (
            self.method != "admm"
            or self.admm.epochs == 0
            or self.admm.rounds > 1
            or self.coupled_channels is not None
        ):
            raise ValueError(
                "admm.init: oneshot starts training-time ADMM from the one-shot solution: it "
                "needs method: admm, admm.epochs > 0, admm.rounds: 1 and no coupled_channels (for "
                "one-shot pruning alone use method: oneshot)"
            )
        if self.coupled_channels is not None and self.method != "admm":
            raise ValueError("coupled_channels works with method: admm only (for now)")
        if self.admm.epochs > 0 and any(c.norm == "l1" for c in self.coupled()):
            raise ValueError(
                "coupled_channels norm: l1 ranks channels for one-shot pruning; ADMM needs the "
                "Euclidean projection. Set admm.epochs: 0 (one shot) or norm: l2."
            )
        if self.quantize.epochs > 0 and not self.quantize.layers:
            raise ValueError(
                "quantize.epochs > 0 but quantize.layers is empty; name the layers to quantize, "
                "e.g. quantize: {layers: {'*': 4}}"
            )
        return self

    def coupled(self) -> list[CoupledCfg]:
        """``coupled_channels`` as a list (empty when off)."""
        c = self.coupled_channels
        return [] if c is None else list(c) if isinstance(c, list) else [c]

    def spec(self):
        """The constraint spec for :class:`admmprune.ADMM` (keys ``type:Name`` become types)."""
        if self.method == "ssauto":
            from ..sets.rows_columns import SoftRowsColumns

            soft = {key: SoftRowsColumns() for key in self.ssauto.layers}
            return _module_types("ssauto.layers", soft), None
        spec = {key: to_constraint(value) for key, value in self.constraints.items()}
        return _module_types("constraints", spec), to_constraint(self.default_constraint)

    def quantize_spec(self):
        """The quantization spec for :class:`admmprune.ADMM` (empty when ``quantize`` is off)."""
        from ..sets.quantization import Binary, Quantized, Ternary

        q = self.quantize

        def make(bits):
            if bits == "binary":
                return Binary()
            if bits == "ternary":
                return Ternary()
            return Quantized(bits, q.levels)

        return _module_types("quantize.layers", {k: make(b) for k, b in q.layers.items()})


def _parse_nm(text: str) -> tuple[int, int]:
    n, sep, m = str(text).partition(":")
    if not (sep and n.strip().isdigit() and m.strip().isdigit()) or not 1 <= int(n) <= int(m):
        raise ValueError(f"nm: {text!r} must read 'N:M' with 1 <= N <= M, e.g. '2:4'")
    return int(n), int(m)


def _check_pair(where: str, kind: str, keep) -> None:
    if kind == "per_row":
        if not isinstance(keep, bool):
            raise ValueError(f"{where}.per_row: {keep!r} must be true or false")
        return
    if isinstance(keep, bool):
        raise ValueError(f"{where}.{kind}: {keep!r} is a boolean; give the fraction kept")
    if kind == "nm":
        _parse_nm(keep)
    elif isinstance(keep, str) or not (math.isfinite(keep) and 0 < keep <= 1):
        raise ValueError(
            f"{where}.{kind}: {keep!r}: keep is the fraction KEPT, in (0, 1]; e.g. 0.1 keeps 10 %"
        )


def _module_types(section: str, spec: dict) -> dict:
    """Keys ``type:Name`` become the module type ``torch.nn.Name``; other keys stay names/globs."""
    import torch.nn as nn

    out = {}
    for key, value in spec.items():
        if key.startswith("type:"):
            cls = getattr(nn, key[5:], None)
            if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
                raise RecipeError(f"{section}[{key!r}]: torch.nn has no module type {key[5:]!r}")
            key = cls
        out[key] = value
    return out


def _one_constraint(kind: str, keep, per_row: bool) -> constraints.Constraint:
    if kind == "nm":
        return constraints.NM(*_parse_nm(keep))
    if kind == "unstructured":
        return constraints.Unstructured(keep, per_row=per_row)
    return CONSTRAINT_TYPES[kind](keep)


def to_constraint(pairs: dict[str, float] | None) -> constraints.Constraint | None:
    if pairs is None:
        return None
    pairs = dict(pairs)
    per_row = pairs.pop("per_row", False)
    if per_row and "unstructured" not in pairs:
        raise RecipeError("per_row: true applies to unstructured: give {unstructured: KEEP, ...}")
    parts = [_one_constraint(kind, keep, per_row) for kind, keep in pairs.items()]
    return parts[0] if len(parts) == 1 else constraints.Intersection(*parts)
