"""Torch-Pruning's dependency graph, built the way every real model needs it.

``channel_groups`` and ``compact`` both trace the model with ``tp.DependencyGraph``; this module
is the one place that does it, so both see the same groups:

- the forward is called as ``model(**x)`` for a dict and ``model(x)`` otherwise (never
  ``model(*x)``, which splits a token batch into rows), with Hugging Face caches off and only
  the output's floating tensors traced;
- transformers' ``Conv1D`` (weight ``[in, out]``) gets a pruner of its own;
- every attention module :mod:`admmprune.structure.heads` knows is traced through a stand-in forward
  ``O(Q(x))`` with the real output's shape: the head reshapes, rotary embeddings and window
  partitions inside are neither traced (Torch-Pruning mis-reads them as flattens, which made
  grouped-query and Swin attention take minutes) nor channel-pruned (heads are removed whole by
  :mod:`admmprune.structure.heads`).

Both the trace and the grouping are bounded: a group whose search cycles for ever is refused
(``DEPS_PER_NODE``), and the whole analysis stops with a :class:`GraphError` naming the model
after ``TIME_LIMIT`` seconds (plus ``TIME_PER_MODULE`` per module), where Torch-Pruning's
index mappings blow up (Swin V2, MaxViT): a clear refusal instead of a hang.

The graph's ``refusal(group)`` says why a group's channels must stay: they are normalised together
(LayerNorm/RMSNorm statistics change when a channel leaves), looked up from an embedding, read
by an attention module, or cross a grouped convolution.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ..weights.forward import call, floats, no_cache
from ..weights.gemm import is_conv1d, layer_types
from .attention import find, stand_in

_NORM_WORDS = ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm")
#: per-channel affine layers that produce channels with the convs before them
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _conv1d_pruner():
    import torch_pruning as tp

    class Conv1DPruner(tp.pruner.function.BasePruningFunc):
        """transformers' Conv1D: outputs are the weight's columns, inputs its rows."""

        def prune_out_channels(self, layer, idxs):
            keep = sorted(set(range(layer.nf)) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 1)
            if layer.bias is not None:
                layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
            layer.nf = len(keep)
            return layer

        def prune_in_channels(self, layer, idxs):
            keep = sorted(set(range(layer.weight.shape[0])) - set(idxs))
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
            return layer

        def get_out_channels(self, layer):
            return layer.nf

        def get_in_channels(self, layer):
            return layer.weight.shape[0]

    return Conv1DPruner()


def build(model: nn.Module, x: Any):
    """The dependency graph of ``model`` on ``x`` (see the module docstring): a Torch-Pruning
    ``DependencyGraph`` that also knows the model's attention modules
    (:func:`admmprune.structure.attention.find`) and answers :meth:`groups`, :meth:`refusal` and
    :meth:`in_attention`."""
    pruner = _conv1d_pruner()
    custom = {t: pruner for t in {type(m) for m in model.modules() if is_conv1d(m)}}
    DG = _graph_class()(model, find(model))
    calls: dict[nn.Module, list] = {}  # the grad_fns of each call's inputs
    made: dict = {}  # grad_fn of a layer's output → the layer

    def pre(m, args):
        calls.setdefault(m, []).extend(t.grad_fn for t in floats(args) if t.grad_fn is not None)

    seen: dict[nn.Module, int] = {}  # calls per layer

    def post(m, _args, out):
        seen[m] = seen.get(m, 0) + 1
        made.update((t.grad_fn, m) for t in floats(out) if t.grad_fn is not None)

    counting = []
    for m in model.modules():
        if isinstance(m, DG.types + BATCH_NORMS):
            counting += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    with (
        no_cache(model),
        stand_in(DG.attention),
        _guarded_reshapes(DG.opaque),
        torch.enable_grad(),
        _explained(model, "trace"),
    ):
        DG.build_dependency(
            model,
            example_inputs=x,
            forward_fn=call,
            output_transform=lambda out: [t for t in floats(out) if t.grad_fn is not None],
            customized_pruners=custom or None,
            verbose=False,
        )
    for h in counting:
        h.remove()
    DG.reused = {m for m, n in seen.items() if n > 1}  # one forward traced: run twice in it
    for m in DG.reused:  # and the layers whose channels it reads, at any of its calls
        for layer in layers_behind(calls.get(m, []), made):
            DG.feeds.setdefault(layer, m)
    return DG


# autograd nodes that mix features: a width behind them is not the width in front of them
_MIXING = ("Mm", "Addmm", "Bmm", "Baddbmm", "Convolution", "Embedding", "Mv", "Dot")


def layers_behind(grad_fns, made: dict) -> list[nn.Module]:
    """The layers whose outputs reach ``grad_fns`` with their width unchanged: a walk back
    through the autograd graph that stops at a layer's output (``made``: grad_fn → layer)
    or at a mixing op (a matrix product or convolution no layer made)."""
    found: dict[nn.Module, None] = {}
    stack, visited = list(grad_fns), set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        if node in made:
            found.setdefault(made[node])
            continue
        if type(node).__name__.startswith(_MIXING):
            continue
        stack.extend(nxt for nxt, _ in node.next_functions)
    return list(found)


def output_layers(model: nn.Module, example_input) -> list[nn.Module]:
    """Every Conv/Linear whose output reaches a model output with its width unchanged
    (:func:`layers_behind` from each output), plus the last layer to run. A
    model with several outputs (detection heads, ``return cls(h), box(h)``) has several; their
    channels are the model's outputs, never removed."""
    order: list[nn.Module] = []
    made: dict = {}  # grad_fn of a layer's output → the layer
    types = layer_types(model)

    def seen(mod, _args, out):
        order.append(mod)
        made.update((t.grad_fn, mod) for t in floats(out) if t.grad_fn is not None)

    hooks = [m.register_forward_hook(seen) for m in model.modules() if isinstance(m, types)]
    try:
        with torch.enable_grad(), no_cache(model):
            outputs = floats(call(model, example_input))
    finally:
        for h in hooks:
            h.remove()
    found = dict.fromkeys(order[-1:])
    found.update(dict.fromkeys(layers_behind([t.grad_fn for t in outputs], made)))
    return list(found)


class GraphError(ValueError):
    """Torch-Pruning could not build or group the model's dependency graph."""


def analyse(model: nn.Module, x: Any, ignored: list[nn.Module]):
    """The graph (:func:`build`) and its channel groups (``Graph.groups``), both within the
    model's time bound (:func:`deadline`): what ``channel_groups`` and ``compact`` start from."""
    with deadline(model, "trace and group"):
        DG = build(model, x)
        return DG, DG.groups(ignored)


#: seconds the dependency analysis of one model may take (plus TIME_PER_MODULE per module)
TIME_LIMIT = 60.0
TIME_PER_MODULE = 0.02


class _DeadlineError(BaseException):
    """Raised by the timer inside the analysis, turned into a GraphError by ``deadline``
    (a BaseException, so that no ``except Exception`` on the way swallows it)."""


@contextlib.contextmanager
def deadline(model: nn.Module, what: str) -> Iterator[None]:
    """Stop the dependency analysis of ``model`` with a :class:`GraphError` once it has run
    past its time bound (on the main thread of a POSIX process: the timer is SIGALRM's; the
    caller's own timer is put back after)."""
    limit = TIME_LIMIT + TIME_PER_MODULE * sum(1 for _ in model.modules())
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        yield
        return
    start = time.monotonic()

    def stop(*_):
        raise _DeadlineError

    previous = signal.signal(signal.SIGALRM, stop)
    old_timer = signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    except _DeadlineError:
        raise GraphError(
            f"Torch-Pruning's dependency analysis could not {what} {type(model).__name__} "
            f"within {limit:.0f} s (its channel index mappings grow without bound on this "
            "architecture). Structured channel pruning is not available for this model; "
            "unstructured, N:M and head pruning do not need the graph."
        ) from None
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if old_timer[0] > 0:  # the caller's timer, less the time we took
            signal.setitimer(
                signal.ITIMER_REAL, max(1e-3, old_timer[0] - (time.monotonic() - start))
            )


class _EndlessGroupError(Exception):
    """A group's dependency search passed its bound (see ``Graph.get_pruning_group``)."""


#: a channel group's search reaches one (layer, handler) at most this many times (other
#: index sets through concatenations and splits); more is a cycle that never closes
DEPS_PER_NODE = 16


def _explained(model: nn.Module, what: str):
    return _explained_name(type(model).__name__, what)


@contextlib.contextmanager
def _explained_name(model_name: str, what: str) -> Iterator[None]:
    try:
        yield
    except GraphError:
        raise
    except Exception as e:  # a failure inside Torch-Pruning 1.6.1: say so, and what to do
        raise GraphError(
            f"Torch-Pruning could not {what} {model_name}: {type(e).__name__}: {e} "
            "(in its dependency graph; ShuffleNetV2's channel shuffle + chunk is one known "
            "case). Structured channel pruning is not available for this model; unstructured, "
            "N:M and head pruning do not need the graph."
        ) from e


@functools.cache
def _graph_class():
    import torch_pruning as tp

    class Graph(tp.DependencyGraph):
        """Torch-Pruning's graph with :func:`_guarded_reshapes` around every index-mapping
        update (it re-runs them each time a group is formed), and what :meth:`refusal` needs
        about the model, computed once."""

        def __init__(self, model: nn.Module, attention: list) -> None:
            super().__init__()
            self.attention = attention
            self.opaque: set = set()  # reshapes whose channel mapping is unknown
            self.endless: set = set()  # roots whose dependency search did not end
            self.reused: set = set()  # layers run more than once in the traced forward
            self.feeds: dict = {}  # a layer → the reused layer that reads its channels
            self.names = {m: n for n, m in model.named_modules()}
            self.owners = {  # id(parameter) → (module name, module)
                id(p): (n, m) for n, m in model.named_modules() for p in m.parameters(False)
            }
            self.inside = {id(m): a.name for a in attention for m in a.module.modules()}
            # attention no adapter knows: its channels are never offered either
            for n, m in model.named_modules():
                if id(m) not in self.inside and _looks_like_attention(m):
                    self.inside.update({id(sub): n for sub in m.modules()})
            self.projections = {id(m) for a in attention for m in a.projections()}
            self.types = layer_types(model)
            self.model_name = type(model).__name__

        def get_pruning_group(self, module, pruning_fn, idxs):
            """Torch-Pruning's group, its search bounded: one whose index mappings change at
            every turn of a cycle (Phi's partial rotary) would grow for ever. Past
            ``DEPS_PER_NODE`` visits of one (layer, handler) the root alone is returned and
            recorded in ``endless`` (:meth:`refusal` keeps its channels)."""
            from torch_pruning.dependency.dependency import Dependency
            from torch_pruning.dependency.group import Group

            add = Group.add_dep
            times: dict = {}

            def bounded(group, dep, idxs):
                key = (id(group), id(dep.target), dep.handler)
                times[key] = times.get(key, 0) + 1
                if times[key] > DEPS_PER_NODE:
                    raise _EndlessGroupError
                add(group, dep, idxs)

            Group.add_dep = bounded
            try:
                with _guarded_reshapes(self.opaque):
                    return super().get_pruning_group(module, pruning_fn, idxs)
            except _EndlessGroupError:
                self.endless.add(module)
                group, node = Group(), self.module2node[module]
                add(group, Dependency(pruning_fn, pruning_fn, node, node), list(idxs))
                return group
            finally:
                Group.add_dep = add

        def groups(self, ignored: list[nn.Module]) -> list:
            """Every channel group rooted at a producer layer (``get_all_groups``)."""
            with _explained_name(self.model_name, "group the channels of"), _mapped_once(self):
                return list(self.get_all_groups(ignored_layers=ignored,
                                                root_module_types=list(self.types)))  # fmt: skip

        def in_attention(self, root: nn.Module) -> bool:
            """Is ``root`` a Q/K/V projection (its rows are heads, not channels)?"""
            return id(root) in self.projections

        def refusal(self, group) -> str | None:
            """Why the channels of ``group`` cannot leave with the function unchanged."""
            return _refusal(self, group)

    return Graph


@contextlib.contextmanager
def _mapped_once(graph) -> Iterator[None]:
    """Torch-Pruning recomputes every concat / split / reshape index mapping at each
    ``get_pruning_group`` (most of the analysis time on DenseNets and detectors); while the
    groups are only listed nothing is pruned, so the mappings cannot change: compute them once."""
    from torch_pruning.dependency import index_mapping

    update = index_mapping.update_index_mapping
    with _guarded_reshapes(graph.opaque):
        update(graph)
    index_mapping.update_index_mapping = lambda graph: None
    try:
        yield
    finally:
        index_mapping.update_index_mapping = update


@contextlib.contextmanager
def _guarded_reshapes(opaque: set) -> Iterator[None]:
    """Torch-Pruning 1.6.1 divides by a reshape's inferred channel count, which is 0 for a
    5-D view (ShuffleNetV2's channel shuffle: ZeroDivisionError). Such a reshape is skipped
    and recorded: groups through it are refused (``refusal``), since its channel mapping
    is unknown."""
    from torch_pruning.dependency import index_mapping, shape_infer

    original = index_mapping.update_reshape_index_mapping

    def guarded(graph, node):
        sides = (
            (node.outputs, shape_infer.infer_in_channels_recursively),
            (node.inputs, shape_infer.infer_out_channels_recursively),
        )
        for nodes, infer in sides:
            for n in nodes:
                if infer(graph, n, [0]) == 0:
                    opaque.add(node.module)
                    return None
        return original(graph, node)

    index_mapping.update_reshape_index_mapping = guarded
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _looks_like_attention(m: nn.Module) -> bool:
    """A module named as attention that projects with two or more Linear layers of its own."""
    linears = sum(isinstance(c, nn.Linear) for c in m.children())
    return "Attention" in type(m).__name__ and linears >= 2


def _refusal(DG, group) -> str | None:
    """Why the channels of a Torch-Pruning ``group`` cannot leave with the function unchanged,
    or ``None`` (``DG``: the :func:`build` graph, with the model's names and attention)."""
    names, owners, inside, opaque = DG.names, DG.owners, DG.inside, DG.opaque
    root = group.items[0].dep.target.module
    if root in DG.endless:
        return (
            "Torch-Pruning's search for the layers coupled to its channels does not end (a "
            "cycle whose channel mapping changes at every turn, e.g. a partial rotary "
            "embedding's slice and concat)"
        )
    reasons = []  # (priority, text): the most basic cause is named
    for item in group.items:
        m = item.dep.target.module
        if isinstance(m, nn.Parameter):  # an unwrapped parameter: judge by its owner
            name, owner = owners.get(id(m), ("", None))
            if owner is not None and any(w in type(owner).__name__ for w in _NORM_WORDS):
                reasons.append((0, f"its channels are normalised together by {name!r} "
                                   f"({type(owner).__name__}: its statistics change when a "
                                   "channel leaves)"))  # fmt: skip
            continue
        if m in opaque:
            reasons.append((1, "its channels pass through a reshape whose channel mapping "
                               "Torch-Pruning cannot infer (e.g. a channel shuffle)"))  # fmt: skip
            continue
        if not isinstance(m, nn.Module):
            continue
        kind, name = type(m).__name__, names.get(m, type(m).__name__)
        writes = DG.is_out_channel_pruning_fn(item.dep.handler)
        shared = m if m in DG.reused else DG.feeds.get(m) if writes else None
        if shared is not None:
            reasons.append((1, f"its channels reach {names.get(shared)!r}, which runs several "
                               "times per forward (a detection head shared by the pyramid's "
                               "levels): the trace couples one call's channels"))  # fmt: skip
        elif any(w in kind for w in _NORM_WORDS):
            reasons.append((0, f"its channels are normalised together by {name!r} ({kind}: "
                               "its statistics change when a channel leaves)"))  # fmt: skip
        elif isinstance(m, nn.Embedding):
            reasons.append((1, f"its channels are looked up from the embedding {name!r}"))
        elif isinstance(m, nn.MultiheadAttention) or id(m) in inside:
            where = name if isinstance(m, nn.MultiheadAttention) else inside[id(m)]
            reasons.append((2, f"its channels are read by the attention {where!r}"))
        elif (
            isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            and m.groups > 1
            and not (m.groups == m.in_channels == m.out_channels)
        ):
            reasons.append((1, f"its channels cross the grouped conv {name!r} "
                                   f"(groups={m.groups})"))  # fmt: skip
    return min(reasons)[1] if reasons else None
