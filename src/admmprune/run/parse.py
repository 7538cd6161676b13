"""Recipe text → a validated :class:`~admmprune.run.config.Recipe`: YAML files, ``--set``
overrides, the authors' layout (``prune_ratios`` …) converted at the boundary, pydantic errors as
one readable message; ``flatten`` / ``differing_keys``: what resume compares key by key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .config import AUTHORS_MULTI_RHO, AUTHORS_SPARSITY, NOT_IDENTITY, Recipe, RecipeError

__all__ = ["differing_keys", "flatten", "load_recipe", "parse_recipe", "parse_set"]


_AUTHORS_KEYS = {"prune_ratios", "rho", "admm_epoch", "multi_rho", "sparsity_type"}


def _from_authors(raw: dict) -> dict:
    """Convert the authors' top-level keys into ours (``prune_ratios`` are fractions pruned)."""
    keys = _AUTHORS_KEYS & set(raw)
    if not keys:
        return raw
    if "prune_ratios" not in raw:
        raise RecipeError(
            f"authors' keys {sorted(keys)} need prune_ratios: {{param_name: ratio}} beside them."
        )
    if "constraints" in raw:
        raise RecipeError(
            "give either constraints (ours) or prune_ratios (the authors'), not both."
        )
    raw = dict(raw)
    kind = raw.pop("sparsity_type", "irregular")
    if kind not in AUTHORS_SPARSITY:
        raise RecipeError(
            f"sparsity_type: {kind!r} is not supported; allowed: {', '.join(AUTHORS_SPARSITY)}."
        )
    ratios = raw.pop("prune_ratios")
    if not isinstance(ratios, dict):
        raise RecipeError("prune_ratios must map parameter names to fractions pruned.")
    cons = {}
    for name, ratio in ratios.items():
        if not isinstance(ratio, (int, float)) or not (0 <= ratio < 1):
            raise RecipeError(
                f"prune_ratios[{name!r}] = {ratio!r}: a fraction pruned must be in [0, 1)."
            )
        cons[name] = {t: round(1.0 - ratio, 12) for t in AUTHORS_SPARSITY[kind]}
    raw["constraints"] = cons
    admm = dict(raw.get("admm") or {})
    if "rho" in raw:
        admm["rho"] = raw.pop("rho")
    if "admm_epoch" in raw:
        admm["update_every"] = raw.pop("admm_epoch")
    if raw.pop("multi_rho", False):
        admm["rho_growth"] = AUTHORS_MULTI_RHO
    raw["admm"] = admm
    return raw


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<recipe>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            allowed = _allowed_at(e["loc"][:-1])
            msg = f"unknown key; allowed here: {', '.join(allowed)}"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "constraints" in map(str, e["loc"]) and e["type"] in (
            "less_than_equal",
            "greater_than",
        ):
            msg += " (keep is the fraction KEPT, in (0, 1]; e.g. 0.1 keeps 10 %)"
        lines.append(f"  {loc}: {msg}")
    return "invalid recipe:\n" + "\n".join(lines)


def _allowed_at(loc) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return []
        model = field.annotation
    return list(getattr(model, "model_fields", {}))


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}`` (lists and scalars are leaves)."""
    out = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def differing_keys(saved: dict, now: dict, ignore=NOT_IDENTITY) -> list[str]:
    """The dotted keys whose values differ between two recipe dumps, as ``key (old → new)``,
    leaving out ``ignore`` and everything under it."""
    a, b = flatten(saved), flatten(now)

    def ignored(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in ignore)

    keys = sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))
    return [f"{k} ({a.get(k, '<unset>')!r} → {b.get(k, '<unset>')!r})" for k in keys]


def parse_set(items: list[str]) -> dict[str, Any]:
    """``["admm.rho=0.01", "seed=3"]`` → ``{"admm.rho": 0.01, "seed": 3}`` (values read as
    YAML: numbers, booleans, null, lists)."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key or any(not part for part in key.split(".")):
            raise RecipeError(
                f"--set {item!r}: write KEY.PATH=VALUE, e.g. --set admm.rho=0.01 or "
                "--set 'constraints.fc1={unstructured: 0.1}'."
            )
        try:
            out[key] = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item!r}: the value is not valid YAML: {exc}") from None
    return out


def _override(raw: dict, dotted: str, value: Any) -> None:
    node, path = raw, []
    *parents, leaf = dotted.split(".")
    for p in parents:
        path.append(p)
        if node.get(p) is None:  # absent, or `data: null`: an empty section
            node[p] = {}
        node = node[p]
        if not isinstance(node, dict):
            raise RecipeError(
                f"cannot set {dotted}: {'.'.join(path)} is {node!r}, not a section of keys."
            )
    node[leaf] = value


def parse_recipe(raw: Any, overrides: dict | None = None) -> Recipe:
    """Validate a recipe given as a dict (e.g. parsed YAML); raise :class:`RecipeError`.

    ``overrides`` maps dotted keys to values (``--set``, ``--data-dir``), applied before
    validation, so they are checked like the file.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise RecipeError(f"a recipe is a YAML mapping, got {type(raw).__name__}.")
    raw = _from_authors(raw)
    for dotted, value in (overrides or {}).items():
        _override(raw, dotted, value)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(_format(err)) from None


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read and validate a YAML recipe file."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe {str(path)!r} does not exist.")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecipeError(
            f"recipe {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8."
        ) from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(path)!r} is not valid YAML: {exc}") from None
    return parse_recipe(raw, overrides)
