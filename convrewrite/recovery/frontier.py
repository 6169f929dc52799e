"""Streaming every layer's fit pairs from where the previous layer's stopped: about one pass in all.

Fitting layer k needs, per sample, the rewritten model's input of block k (blocks before k
already fitted) and the original model's output of layer k. Run from the model's input each
time, the passes cost the prefix up to each layer, twice: ``Σ_k (o_k + r_k)``, about L/2 passes
of the original plus L/2 of the rewritten model for L layers evenly spread (measured on
ResNet-50 with ``separable`` on its 17 3x3 convs: 13.2 passes).

With the model's fx graph the work is cut at each layer instead: per batch, the *frontier* of
each model (the values of the graph nodes computed so far that later nodes still read, the
residual stream included) is kept after layer k, and layer k+1 starts from it, running only the
nodes between the two layers. In all, fitting then runs each model once up to its last fitted
layer, whatever L is: ``(o_L + r_L)`` passes, under 2.

Where the frontiers live: in memory up to ``budget`` bytes (both models, both splits), on disk
beyond that (one file per batch in a temporary directory, removed when fitting ends), so memory
does not grow with the number of samples; the disk holds at most the two frontiers of one layer
(what a ResNet-50 bottleneck reads at 56x56 is 1.3 MB per image and model in float32).

Used only when it is exact: the graph (traced here, with the engine's tracer) must reproduce
both models' outputs on a probe batch, every fitted block must be one ``call_module`` node called
once, and the layers' nodes must come in the order the model calls them. Otherwise fitting keeps
the prefix passes (``Frontier.build`` returns None and says why).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten, tree_map

from convrewrite.recovery.batches import Batch, BatchSource, Split

#: Samples of the probe batch the graph is checked on (both ways: by the graph, by the models).
PROBE_SAMPLES = 2

#: One layer's pairs of one batch: [(block args, block kwargs, target)] (one call per block).
Pairs = list[tuple[tuple[Any, ...], dict[str, Any], torch.Tensor]]


def _nbytes(value: Any) -> int:
    leaves, _ = tree_flatten(value)
    return sum(t.numel() * t.element_size() for t in leaves if isinstance(t, torch.Tensor))


def _compact(value: Any) -> Any:
    """Tensors that view a larger storage copied out, so a stored frontier holds only its values."""

    def own(tensor: Any) -> Any:
        if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().nbytes() > tensor.nbytes + 4096:
            return tensor.clone()
        return tensor

    return tree_map(own, value)


def _fetch(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


@dataclass
class _Cut:
    """Where one layer cuts the graph: the block's node (rewritten model) and the target's (original)."""

    name: str
    block: int
    target: int


class _Executor:
    """Runs a range of a graph's nodes on one root module, keeping only the live values."""

    def __init__(self, graph: fx.Graph, root: nn.Module) -> None:
        self.nodes = list(graph.nodes)
        self.root = root
        #: Environments are keyed by node position (picklable, unlike fx nodes).
        self.index = {node: i for i, node in enumerate(self.nodes)}
        #: The last node that reads each node's value (the output node counts).
        self.last_use = [max((self.index[user] for user in node.users), default=-1) for node in self.nodes]
        self.placeholders = [n for n in self.nodes if n.op == "placeholder"]
        #: Per position, the values read there for the last time (freed once it has run).
        self.frees: list[list[int]] = [[] for _ in self.nodes]
        for position, last in enumerate(self.last_use):
            self.frees[max(last, position)].append(position)

    def start(self, batch: Batch) -> dict[int, Any]:
        env: dict[int, Any] = {}
        args, kwargs = batch.args, batch.kwargs
        for position, node in enumerate(self.placeholders):
            name = str(node.target).lstrip("*")
            if position < len(args):
                env[self.index[node]] = args[position]
            elif name in kwargs:
                env[self.index[node]] = kwargs[name]
            elif node.args:
                env[self.index[node]] = node.args[0]
            else:
                raise TypeError(f"no value for input {name!r}")
        return env

    def run(self, env: dict[int, Any], start: int, stop: int, keep: int = -1) -> Any:
        """Execute nodes [start, stop) in ``env`` (changed in place); the output node's value if reached.

        Each value is dropped as soon as the last node that reads it has run (``keep``, a
        position, is kept whatever reads it): a segment holds no more than the model's own forward.
        """
        result = None
        for position in range(start, stop):
            node = self.nodes[position]
            if node.op == "placeholder":
                continue
            if node.op == "output":
                result = fx.node.map_arg(node.args[0], lambda n: env[self.index[n]])
                continue
            args = fx.node.map_arg(node.args, lambda n: env[self.index[n]])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[self.index[n]])
            if node.op == "call_module":
                value = self.root.get_submodule(str(node.target))(*args, **kwargs)
            elif node.op == "call_function":
                value = node.target(*args, **kwargs)
            elif node.op == "call_method":
                value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            elif node.op == "get_attr":
                value = _fetch(self.root, str(node.target))
            else:  # pragma: no cover - fx has no other ops
                raise RuntimeError(f"unknown fx op {node.op}")
            env[position] = value
            for done in self.frees[position]:
                if done != keep:
                    env.pop(done, None)
        return result

    def arguments(self, env: dict[int, Any], position: int) -> tuple[Any, Any]:
        """The (args, kwargs) node ``position`` is called with, from ``env``."""
        node = self.nodes[position]
        return (
            fx.node.map_arg(node.args, lambda n: env[self.index[n]]),
            fx.node.map_arg(node.kwargs, lambda n: env[self.index[n]]),
        )

    def prune(self, env: dict[int, Any], position: int) -> dict[int, Any]:
        """The values still read by a node at or after ``position``."""
        return {key: value for key, value in env.items() if self.last_use[key] >= position}


class _Store:
    """The frontiers of one split, batch by batch: in memory up to the shared budget, else on disk."""

    def __init__(self, owner: Frontier) -> None:
        self.owner = owner
        self.entries: list[Any] = []  # a tuple in memory, or a Path on disk
        #: Bytes each in-memory entry was counted for when stored (its dicts change afterwards).
        self.sizes: list[int] = []

    def put(self, position: int, value: tuple) -> None:
        size = _nbytes(value)
        while position >= len(self.entries):
            self.entries.append(None)
            self.sizes.append(0)
        old = self.entries[position]
        self.owner.used -= self.sizes[position]
        self.sizes[position] = 0
        if isinstance(old, Path):
            old.unlink(missing_ok=True)
        if self.owner.used + size <= self.owner.budget:
            self.entries[position] = value
            self.sizes[position] = size
            self.owner.used += size
            return
        path = self.owner.directory() / f"{id(self)}-{position}.pt"
        torch.save(_compact(value), path)
        self.owner.spilled_bytes += size
        self.entries[position] = path

    def truncate(self, count: int) -> None:
        """Drop the entries from ``count`` on (a split that has fewer batches than before)."""
        for position in range(count, len(self.entries)):
            self.owner.used -= self.sizes[position]
            if isinstance(self.entries[position], Path):
                self.entries[position].unlink(missing_ok=True)
        del self.entries[count:], self.sizes[count:]

    def get(self, position: int) -> tuple:
        entry = self.entries[position]
        if isinstance(entry, Path):
            return torch.load(entry, map_location=self.owner.device, weights_only=False)
        return entry


class Frontier:
    """The two models' frontiers per batch, advanced layer by layer (see the module docstring)."""

    def __init__(
        self,
        graph: fx.Graph,
        original: nn.Module,
        rewritten: nn.Module,
        cuts: Sequence[_Cut],
        data: BatchSource,
        device: torch.device,
        budget: int,
        rank: int,
        world: int,
    ) -> None:
        self.original = _Executor(graph, original)
        self.rewritten = _Executor(graph, rewritten)
        self.cuts = {cut.name: cut for cut in cuts}
        self.data, self.device = data, device
        self.budget, self.used = budget, 0
        self.rank, self.world = rank, world
        self.stores: dict[Split, _Store] = {"fit": _Store(self), "holdout": _Store(self)}
        #: Per split: the layer whose pairs the store holds (None: nothing run yet).
        self.at: dict[Split, str | None] = {"fit": None, "holdout": None}
        self.positions: dict[Split, tuple[int, int]] = {"fit": (0, 0), "holdout": (0, 0)}
        self.spilled_bytes = 0
        self._directory: Path | None = None
        #: Set when an advance stopped part-way (the stores then mix two layers): fitting goes
        #: back to prefix passes for the layers left.
        self.broken = False

    # -- building

    @classmethod
    def build(
        cls,
        original: nn.Module,
        rewritten: nn.Module,
        names: Sequence[str],
        targets: dict[str, str | None],
        calls: dict[str, int],
        probe: Batch,
        data: BatchSource,
        device: torch.device,
        budget: int,
        rank: int,
        world: int,
    ) -> tuple[Frontier | None, str]:
        """A frontier for fitting ``names`` in this order, or (None, why the prefix passes stay)."""
        from convrewrite.core.tracing import trace

        if os.environ.get("CONVREWRITE_FIT_FRONTIER", "1") == "0":
            return None, "frontier streaming switched off (CONVREWRITE_FIT_FRONTIER=0)"
        if any(calls.get(name, 0) != 1 for name in names):
            return None, "a fitted block is called more than once per forward"
        traced = trace(original)
        if traced.graph_module is None:
            return None, f"the original model has no fx graph ({traced.failure})"
        graph = traced.graph_module.graph
        nodes = list(graph.nodes)
        modules: dict[str, list[int]] = {}
        for position, node in enumerate(nodes):
            if node.op == "call_module":
                modules.setdefault(str(node.target), []).append(position)
        cuts: list[_Cut] = []
        for name in names:
            target = targets.get(name) or name
            if len(modules.get(name, [])) != 1 or len(modules.get(target, [])) != 1:
                return None, f"{name} is not one module call in the traced graph"
            cut = _Cut(name, modules[name][0], modules[target][0])
            if cut.target < cut.block:
                return None, f"{name}'s target comes before it in the graph"
            if cuts and (cut.block < cuts[-1].block or cut.target < cuts[-1].target):
                return None, "the layers' graph nodes are not in the order the model calls them"
            cuts.append(cut)
        frontier = cls(graph, original, rewritten, cuts, data, device, budget, rank, world)
        probe = _first_samples(probe, PROBE_SAMPLES)
        try:
            with torch.no_grad():
                if not _same(frontier._probe_pairs(probe), _hooked_pairs(original, rewritten, cuts, targets, probe)):
                    return None, "the traced graph does not reproduce the layers' inputs and outputs"
        except Exception as exc:  # noqa: BLE001 - any failure: the prefix passes are always right
            return None, f"the traced graph does not run on the models ({type(exc).__name__}: {exc})"
        return frontier, ""

    def _probe_pairs(self, probe: Batch) -> list[Any]:
        """Every layer's (block args, kwargs, target) on ``probe``, by the graph, in one pass."""
        found: list[Any] = []
        original_env, rewritten_env = self.original.start(probe), self.rewritten.start(probe)
        at_original = at_rewritten = 0
        for cut in self.cuts.values():
            self.original.run(original_env, at_original, cut.target + 1, keep=cut.target)
            self.rewritten.run(rewritten_env, at_rewritten, cut.block)
            at_original, at_rewritten = cut.target + 1, cut.block
            args, kwargs = self.rewritten.arguments(rewritten_env, cut.block)
            found.append(_clone((args, kwargs, original_env[cut.target])))
        return found

    # -- streaming

    def directory(self) -> Path:
        if self._directory is None:
            self._directory = Path(tempfile.mkdtemp(prefix="convrewrite-frontier-"))
        return self._directory

    def close(self) -> None:
        for store in self.stores.values():
            store.entries.clear()
            store.sizes.clear()
        self.used = 0
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None

    def _batches(self, split: Split) -> Iterator[Batch]:
        if split == "fit":
            return iter(self.data.batches("fit", rank=self.rank, world_size=self.world))
        return iter(self.data.batches("holdout"))

    def pairs(self, name: str, split: Split) -> Iterator[tuple[int, Pairs]]:
        """(samples, pairs) per batch of ``split`` for layer ``name``: computed from the previous
        layer's frontier the first time (which moves the frontier here), read back after that."""
        cut = self.cuts[name]
        store = self.stores[split]
        if self.at[split] == name:
            for position in range(len(store.entries)):
                size, _, _, pairs = store.get(position)
                yield size, pairs
            return
        start_original, start_rewritten = self.positions[split]
        stop_original, stop_rewritten = cut.target + 1, cut.block
        first = self.at[split] is None
        source: Iterator[Any] = self._batches(split) if first else iter(range(len(store.entries)))
        completed = False
        try:
            yield from self._advance(
                cut, split, source, first, (start_original, start_rewritten), (stop_original, stop_rewritten)
            )
            completed = True
        finally:
            if not completed:
                self.broken = True
                self.close()
        self.at[split] = name
        self.positions[split] = (stop_original, stop_rewritten)

    def _advance(
        self,
        cut: _Cut,
        split: Split,
        source: Iterator[Any],
        first: bool,
        starts: tuple[int, int],
        stops: tuple[int, int],
    ) -> Iterator[tuple[int, Pairs]]:
        """One pass of ``split`` from the stored frontiers (or the batches) to ``cut``."""
        (start_original, start_rewritten), (stop_original, stop_rewritten) = starts, stops
        store = self.stores[split]
        count = 0
        with torch.no_grad():
            for position, item in enumerate(source):
                if first:
                    batch = item.to(self.device)
                    size = batch.size
                    original_env = self.original.start(batch)
                    rewritten_env = self.rewritten.start(batch)
                else:
                    size, original_env, rewritten_env, _ = store.get(position)
                self.original.run(original_env, start_original, stop_original, keep=cut.target)
                self.rewritten.run(rewritten_env, start_rewritten, stop_rewritten)
                args, kwargs = self.rewritten.arguments(rewritten_env, cut.block)
                target = original_env[cut.target]
                pairs: Pairs = [(tuple(args), dict(kwargs), target)]
                entry = (
                    size,
                    self.original.prune(original_env, stop_original),
                    self.rewritten.prune(rewritten_env, stop_rewritten),
                    pairs,
                )
                del original_env, rewritten_env
                store.put(position, entry)
                count += 1
                yield size, pairs
        store.truncate(count)


def _first_samples(batch: Batch, count: int) -> Batch:
    """The first ``count`` samples of ``batch`` (tensors whose dim 0 is the batch), for the check."""
    if batch.size <= count:
        return batch

    def head(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim and value.shape[0] == batch.size:
            return value[:count]
        return value

    return Batch(tree_map(head, batch.args), tree_map(head, batch.kwargs), count)


def _clone(value: Any) -> Any:
    return tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, value)


def _hooked_pairs(
    original: nn.Module, rewritten: nn.Module, cuts: Sequence[_Cut], targets: dict[str, str | None], probe: Batch
) -> list[Any]:
    """The same pairs from the models' own forwards (hooks; each forward stops at the last layer)."""
    from convrewrite.recovery.fit import _StopForward

    inputs: list[Any] = []
    outputs: list[Any] = []
    handles = []
    last = len(cuts) - 1
    for position, cut in enumerate(cuts):

        def before(module: nn.Module, args: tuple, kwargs: dict, position: int = position) -> None:
            inputs.append(_clone((args, kwargs)))
            if position == last:
                raise _StopForward

        def after(module: nn.Module, args: tuple, output: Any, position: int = position) -> None:
            outputs.append(_clone(output))
            if position == last:
                raise _StopForward

        handles.append(rewritten.get_submodule(cut.name).register_forward_pre_hook(before, with_kwargs=True))
        handles.append(original.get_submodule(targets.get(cut.name) or cut.name).register_forward_hook(after))
    try:
        for model in (rewritten, original):
            with contextlib.suppress(_StopForward):
                probe.call(model)
    finally:
        for handle in handles:
            handle.remove()
    return [(args, kwargs, output) for (args, kwargs), output in zip(inputs, outputs)]


def _same(a: Any, b: Any) -> bool:
    left, _ = tree_flatten(a)
    right, _ = tree_flatten(b)
    if len(left) != len(right):
        return False
    for x, y in zip(left, right):
        if isinstance(x, torch.Tensor) != isinstance(y, torch.Tensor):
            return False
        if isinstance(x, torch.Tensor):
            if x.shape != y.shape or x.dtype != y.dtype:
                return False
            if x.is_floating_point():
                scale = float(y.detach().abs().max()) if y.numel() else 0.0
                if not torch.allclose(x, y, rtol=1e-5, atol=1e-6 * max(scale, 1e-30)):
                    return False
            elif not torch.equal(x, y):
                return False
    return True


__all__ = ["Frontier"]
