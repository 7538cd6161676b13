"""What a one-shot run did, per layer and in total."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["LayerReport", "OneShotReport"]

_MODES = {True: "sequential", "layers": "sequential by layer", False: "parallel"}


@dataclass
class LayerReport:
    """One layer's result: its summed reconstruction error ``||X(Ŵ − W)ᵀ||²`` (``error``), the
    same relative to ``||XWᵀ||²`` (``rel_error``), kept fraction, rows of X seen (for an expert:
    the tokens routed to it), seconds, and the solver that ran (``"magnitude"`` for an expert
    routed fewer than ``min_expert_tokens`` tokens)."""

    name: str
    error: float
    rel_error: float
    kept: float
    rows: int
    seconds: float
    solver: str = ""


@dataclass
class OneShotReport:
    """What :func:`oneshot` did: samples and batches used, per-layer results, the peak bytes
    of statistics held at once (``gram_bytes_peak``), and the wall time."""

    solver: str
    samples: int
    batches: int
    sequential: bool | str  # True, "layers" or False (see oneshot)
    damp: float
    layers: dict[str, LayerReport] = field(default_factory=dict)
    gram_bytes_peak: int = 0
    seconds: float = 0.0
    # sequential through this nn.ModuleList one block at a time, from cached block inputs
    # (None: from the model's input for every block of layers)
    by_layer: str | None = None
    activation_bytes_peak: int = 0  # the cached block inputs (by_layer only)
    # the block lists whose layers one constraint went on (oneshot(model, constraint, ...))
    block_lists: list[str] = field(default_factory=list)

    @property
    def fallbacks(self) -> dict[str, int]:
        """Experts pruned by magnitude for want of routed tokens: ``{name: tokens seen}``."""
        return {n: r.rows for n, r in self.layers.items() if r.solver != self.solver}

    @property
    def error(self) -> float:
        """The layers' reconstruction errors summed."""
        return sum(r.error for r in self.layers.values())

    def as_dict(self) -> dict:
        out = asdict(self)
        out["error"] = self.error
        out["fallbacks"] = self.fallbacks
        return out

    def summary(self) -> str:
        return (
            f"one-shot {self.solver}: {len(self.layers)} layers from {self.samples} calibration "
            f"samples ({self.batches} batches, {_MODES[self.sequential]}),"
            f" summed layer error {self.error:.4g}, Grams peak "
            f"{self.gram_bytes_peak / 2**20:.1f} MiB"
            + (
                f", block inputs peak {self.activation_bytes_peak / 2**20:.1f} MiB"
                if self.by_layer
                else ""
            )
            + f", {self.seconds:.1f} s"
            + (
                f"; {len(self.fallbacks)} expert(s) routed too few calibration tokens pruned by "
                f"magnitude: {', '.join(list(self.fallbacks)[:8])}"
                + (" …" if len(self.fallbacks) > 8 else "")
                if self.fallbacks
                else ""
            )
        )
