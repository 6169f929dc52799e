"""Finding and swapping modules by qualified name, with shared modules and tied weights in mind."""

from __future__ import annotations

from typing import Any

from torch import nn

CONV_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def module_aliases(model: nn.Module) -> dict[int, list[str]]:
    """id(module) -> every qualified name it is registered under."""
    aliases: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        aliases.setdefault(id(module), []).append(name)
    return aliases


def parameter_users(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """id(parameter) -> the (module name, module) pairs holding it directly."""
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        for parameter in module._parameters.values():
            if parameter is not None:
                users.setdefault(id(parameter), []).append((name, module))
    return users


def install(model: nn.Module, name: str, replacement: nn.Module) -> None:
    """Put ``replacement`` at the qualified ``name`` (its parent must exist)."""
    parent_name, _, attribute = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attribute, replacement)


def conv_geometry(module: nn.Module) -> tuple[Any, ...]:
    """Everything that makes two convs interchangeable, the bias's identity last."""
    return (
        type(module),
        module.in_channels,
        module.out_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        module.padding_mode,
        id(module.bias) if module.bias is not None else None,
    )


def tie_mismatch(module: nn.Module, other_name: str, other: nn.Module) -> str | None:
    """Why ``other`` (holding ``module``'s weight) cannot share one replacement with it, or None."""
    if not isinstance(other, CONV_TYPES) or type(other) is not type(module):
        return f"{other_name} ({type(other).__name__})"
    if conv_geometry(other)[:-1] != conv_geometry(module)[:-1]:
        return f"{other_name} (a conv of another shape)"
    if conv_geometry(other) != conv_geometry(module):
        return f"{other_name} (own bias: one shared replacement cannot keep both biases)"
    return None
