"""Which parameters get which constraint.

A *spec* maps keys to constraints (or ``None`` to leave a layer alone):

- a glob such as ``"conv*"`` or ``"layer1.*"`` matches the names of *prunable* modules, those
  whose ``weight`` has two or more dimensions (Conv and Linear), and attention / recurrent
  layers with raw GEMM weights (``in_proj_weight``, ``weight_ih_l0`` …), and mixture-of-experts
  containers with fused 3-D expert weights (``experts.gate_up_proj`` …: each expert is its own
  GEMM, see :mod:`admmprune.weights.experts`); the constraint goes on that module's ``weight``
  (or each raw GEMM weight, or each expert's slice);
- an exact module name or full parameter name (``"fc1"``, ``"fc1.weight"``) matches that one
  module or parameter, whatever its kind (the constraint then checks the parameter's rank);
- a module type or tuple of types (``nn.Conv2d``), or ``"type:Conv2d"`` (a ``torch.nn`` type
  by name, as in recipes), matches every module of that type.

``default`` goes on every prunable weight that no key claims. A key that matches nothing, or two
keys that claim one parameter, is an error that lists the names available.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..sets.constraints import Constraint, Projection
from .experts import expert_weights
from .experts import is_transposed as experts_transposed
from .gemm import is_conv1d, raw_weights

__all__ = ["Spec", "Target", "select"]

Key = str | type | tuple[type, ...]
Spec = Mapping[Key, Constraint | None]


@dataclass(frozen=True)
class Target:
    """One constrained parameter: where it lives and which set S it must lie in."""

    name: str  # full parameter name, e.g. "features.0.weight"
    module_name: str
    module: nn.Module
    attr: str  # the parameter's attribute on module, e.g. "weight"
    constraint: Constraint
    groups: int = 1
    # stored [in, out] (transformers' Conv1D): the sets see Wᵀ, so Filters still means outputs
    transposed: bool = False
    # a fused experts weight [E, out, in] (or [E, in, out], transposed): the set applies to
    # each expert's slice on its own (its own kept count)
    experts: bool = False

    @property
    def param(self) -> nn.Parameter:
        # Looked up each time: model.to(...) or swap_tensors may replace the Parameter object.
        return getattr(self.module, self.attr)

    def project(self, V: torch.Tensor) -> Projection:
        """``Π_S(V)`` in the parameter's own layout (per expert slice for fused experts)."""
        if self.experts:
            parts = [self._project(v) for v in V]
            return Projection(
                torch.stack([p.Z for p in parts]), torch.stack([p.support for p in parts])
            )
        return self._project(V)

    def gemm_view(self, W: torch.Tensor) -> torch.Tensor:
        """One GEMM's weight as ``[out, in, ...]`` (the first expert's, for fused experts)."""
        W = W[0] if self.experts else W
        return W.T if self.transposed else W

    def _project(self, V: torch.Tensor) -> Projection:
        if not self.transposed:
            return self.constraint.project(V, self.groups)
        p = self.constraint.project(V.T, self.groups)
        return Projection(p.Z.T, p.support.T)


def _is_glob(key: str) -> bool:
    return any(ch in key for ch in "*?[")


def _prunable(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    """``{param name: (module name, module)}`` for each module weight of rank >= 2, and the raw
    GEMM weights of attention and recurrent layers (:func:`raw_weights`)."""
    out = {}
    for mname, module in model.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and w.ndim >= 2:
            out[f"{mname}.weight" if mname else "weight"] = (mname, module)
        for attr in raw_weights(module) + expert_weights(module):
            out[f"{mname}.{attr}" if mname else attr] = (mname, module)
    return out


def _all_params(model: nn.Module) -> dict[str, tuple[str, nn.Module]]:
    out = {}
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            out[f"{mname}.{pname}" if mname else pname] = (mname, module)
    return out


def _describe(key: Key) -> str:
    if isinstance(key, tuple):
        return "(" + ", ".join(k.__name__ for k in key) + ")"
    return key.__name__ if isinstance(key, type) else repr(key)


def _available(prunable: dict[str, tuple[str, nn.Module]], limit: int = 40) -> str:
    names = [
        f"{p if not p.endswith('.weight') and p != 'weight' else m or '<root>'} "
        f"({type(mod).__name__})"
        for p, (m, mod) in prunable.items()
    ]
    shown = ", ".join(names[:limit])
    return shown + (f", … ({len(names) - limit} more)" if len(names) > limit else "")


def _match(key: Key, prunable: dict, params: dict) -> list[str]:
    if isinstance(key, type) or (isinstance(key, tuple) and all(isinstance(k, type) for k in key)):
        return [p for p, (_, mod) in prunable.items() if isinstance(mod, key)]
    if not isinstance(key, str):
        raise ValueError(
            f"spec key {key!r} is neither a name/glob string nor a module type; "
            "write e.g. 'conv1', 'layer*.conv*' or nn.Conv2d."
        )
    if key.startswith("type:"):  # as in recipes: 'type:Conv2d' is torch.nn.Conv2d
        cls = getattr(nn, key[5:], None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return [p for p, (_, mod) in prunable.items() if isinstance(mod, cls)]
        # another library's layer by class name, e.g. 'type:Conv1D' (transformers)
        found = [p for p, (_, mod) in prunable.items() if type(mod).__name__ == key[5:]]
        if not found:
            raise ValueError(
                f"spec key {key!r}: torch.nn has no module type {key[5:]!r}, and no layer of "
                "the model has that class name."
            )
        return found
    if _is_glob(key):
        return [p for p, (m, _) in prunable.items() if fnmatch.fnmatchcase(m, key)]
    if key in params:
        return [key]
    weight = f"{key}.weight" if key else "weight"
    return [weight] if weight in params else []


def select(model: nn.Module, spec: Spec, default: Constraint | None = None) -> list[Target]:
    """Resolve ``spec`` (and ``default``) on ``model`` into one :class:`Target` per parameter.

    Targets come in ``model.named_parameters()`` order, so every run orders them alike.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f"spec must be a mapping {{name, glob or module type: constraint}}, got "
            f"{type(spec).__name__}; e.g. {{'conv*': Filters(keep=0.5)}}."
        )
    prunable = _prunable(model)
    params = _all_params(model)
    claimed: dict[str, tuple[Key, Constraint | None]] = {}
    for key, constraint in spec.items():
        if constraint is not None and not isinstance(constraint, Constraint):
            raise ValueError(
                f"spec[{_describe(key)}] = {constraint!r} is not a constraint; use e.g. "
                "Unstructured(keep=0.1), Filters(keep=0.5), or None to leave it unconstrained."
            )
        names = _match(key, prunable, params)
        if not names:
            raise ValueError(
                f"spec key {_describe(key)} matches no prunable layer of "
                f"{type(model).__name__}. Available: {_available(prunable)}."
            )
        for name in names:
            if name in claimed:
                raise ValueError(
                    f"parameter {name!r} is claimed by two spec keys, "
                    f"{_describe(claimed[name][0])} and {_describe(key)}; make the patterns "
                    "disjoint (a key set to None leaves a layer unconstrained)."
                )
            claimed[name] = (key, constraint)
    if default is not None:
        if not isinstance(default, Constraint):
            raise ValueError(f"default={default!r} is not a constraint.")
        for name in prunable:
            claimed.setdefault(name, ("<default>", default))

    targets = []
    named = dict(model.named_parameters())
    for name, param in named.items():
        if name not in claimed or claimed[name][1] is None:
            continue
        constraint = claimed[name][1]
        mname, module = params[name]
        groups = int(getattr(module, "groups", 1)) if name.endswith("weight") else 1
        attr = name[len(mname) + 1 :] if mname else name
        experts = attr in expert_weights(module)
        transposed = (
            experts_transposed(module) if experts else attr == "weight" and is_conv1d(module)
        )
        t = Target(name, mname, module, attr, constraint, groups, transposed, experts)
        constraint.check(t.gemm_view(param), name, groups)
        targets.append(t)
    if not targets:
        raise ValueError(
            "the spec constrains no parameter (every key is None and no default is given); "
            f"available: {_available(prunable)}."
        )
    return targets
