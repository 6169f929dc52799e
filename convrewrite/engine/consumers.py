"""Who reads each conv's output: the graph context a rule needs to rewrite beyond one conv.

A rule is offered one conv at a time (``ConvSite``). ``fuse-bn`` must also know which module
consumes the conv's output, and whether anything else does. The traced graph tells: the users of
the conv's ``call_module`` node. Modules are looked up by name in the live model, so after earlier
rules replaced some modules in place (the graph keeps their names), a consumer shows its current
type. A conv the graph does not call exactly once (called inside an FX leaf, inside a block an
earlier rule installed, or several times) gets None: its consumers are not known, with one
exception: the last module of an ``nn.Sequential`` the graph calls as one node (a separable or
low-rank block an earlier rule installed) produces that node's output, so it has the node's
consumers. ``separable then fuse-bn`` folds a BatchNorm into the block's pointwise conv that way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from torch import fx, nn

from convrewrite.core.profiling import ModelProfile
from convrewrite.core.tracing import torch_function_name
from convrewrite.rules.api import Consumer


def _consumer(user: fx.Node, producer: fx.Node, model: nn.Module, calls: Counter[str]) -> Consumer:
    sole = all(node is producer for node in user.all_input_nodes)
    if user.op == "call_module":
        name = str(user.target)
        try:
            module: Any = model.get_submodule(name)
        except AttributeError:
            module = None
        return Consumer(
            name=name,
            kind="module",
            type=type(module).__name__ if module is not None else "?",
            module=module,
            calls=calls.get(name, 0),
            sole_input=sole,
        )
    if user.op == "call_function":
        return Consumer(torch_function_name(user.target), "function", sole_input=sole)
    if user.op == "call_method":
        return Consumer(str(user.target), "method", sole_input=sole)
    return Consumer("output", "output", sole_input=sole)


def conv_consumers(
    graph_module: fx.GraphModule | None, model: nn.Module, current: ModelProfile
) -> dict[str, tuple[Consumer, ...]]:
    """Module name -> the uses of its output, for every module the graph calls exactly once.

    ``current`` (the profile of the model as it is now) gives each consumer's total number of
    calls, counted in the eager run, so calls from inside FX leaves count too.
    """
    if graph_module is None:
        return {}
    calls: Counter[str] = Counter(record.name for record in current.records if record.called)
    nodes: dict[str, list[fx.Node]] = {}
    for node in graph_module.graph.nodes:
        if node.op == "call_module":
            nodes.setdefault(str(node.target), []).append(node)
    result: dict[str, tuple[Consumer, ...]] = {}
    for name, found in nodes.items():
        if len(found) != 1 or calls.get(name, 0) != 1:
            continue
        producer = found[0]
        result[name] = tuple(_consumer(user, producer, model, calls) for user in producer.users)
        last = last_of_sequential(model, name)
        if last is not None and calls.get(last, 0) == 1:
            result[last] = result[name]
    return result


def last_of_sequential(model: nn.Module, name: str) -> str | None:
    """The qualified name of the module whose output is the output of the ``nn.Sequential`` at
    ``name`` (its last child, through nested Sequentials), or None."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    found = None
    while isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward and len(module):
        child_name = list(module._modules)[-1]
        child = module._modules[child_name]
        if child is None:
            return None
        name, module = f"{name}.{child_name}", child
        found = name
    return found


__all__ = ["conv_consumers", "last_of_sequential"]
