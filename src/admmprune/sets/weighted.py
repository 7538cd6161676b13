r"""Projections in a diagonal metric: ``Π_S^m(V) = argmin_{Z ∈ S} Σ_i m_i (Z_i − V_i)²``, ``m ≥ 0``.

For a *support set* (a sparsity set: ``Z ∈ S`` iff its support lies in an allowed pattern, the
values free: Unstructured, Filters, Columns, Channels, N:M, a channel group, their
intersections) the minimiser keeps ``V`` on one allowed support ``s``, and its cost is

    Σ_{i ∉ s} m_i V_i²  =  Σ_i m_i V_i²  −  Σ_{i ∈ s} m_i V_i²

so the best ``s`` is the allowed support of largest ``Σ_{i∈s} m_i V_i² = Σ_{i∈s} (√m_i V_i)²``:
exactly the support the Euclidean projection picks for ``Ṽ = √m ⊙ V``. Hence

    Π_S^m(V) = V ⊙ supp(Π_S(√m ⊙ V))

exact for every set whose Euclidean projection ranks entries by ``V_i²`` (element-wise, N:M) or
groups by ``Σ V_i²`` (rows, columns, channel groups). With ``m`` an optimizer's second moment
(Adam's ``exp_avg_sq``, a diagonal Fisher) this is the "objective-aware" projection: a weight is
kept by ``v_i·w_i²``, the loss increase its removal costs to second order. Quantization sets
choose values, not supports, and have no such form (refused by :func:`check_support_set`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .constraints import Projection

__all__ = ["check_support_set", "project_weighted"]


def check_support_set(constraint, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``constraint`` is a support set."""
    if not getattr(constraint, "support_set", False):
        raise ValueError(
            f"{name!r}: a metric projection needs a sparsity set (its projection keeps the "
            f"weights on a support it chooses); {constraint!r} is not one. Quantize with the "
            "Euclidean projection (metric=None), or leave this layer out of the spec."
        )


def project_weighted(
    project: Callable[[Mapping[str, torch.Tensor]], Mapping[str, Projection]],
    V: Mapping[str, torch.Tensor],
    m: Mapping[str, torch.Tensor],
) -> dict[str, Projection]:
    """``Π_S^m`` of every tensor of ``V`` (joint projections included, e.g. channel groups):
    ``project`` is the Euclidean projection of the dict, ``m`` the metric per name (``V``'s
    shapes, ``≥ 0``)."""
    scaled = {n: V[n] * m[n].to(V[n].device).sqrt() for n in V}
    return {n: Projection(V[n] * p.support, p.support) for n, p in project(scaled).items()}
