"""Where fitting and distillation run: ``--device auto|cpu|cuda[:i]|mps``."""

from __future__ import annotations

import torch

from convrewrite.errors import UsageError

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | None) -> torch.device:
    """The torch device for ``spec``; ``auto`` (or None) prefers CUDA, then MPS, then the CPU.

    A device that this machine does not have is a usage error (exit 2), raised before any work.
    """
    text = (spec or "auto").strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {spec!r} is not a device", hint=f"use {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: CUDA is not available on this machine", hint="use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                hint=f"use cuda:0 .. cuda:{torch.cuda.device_count() - 1}",
            )
        return device
    if device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {spec}: MPS is not available on this machine", hint="use --device cpu")
        return device
    raise UsageError(f"--device {spec!r} is not supported", hint=f"use {DEVICE_CHOICES}")
