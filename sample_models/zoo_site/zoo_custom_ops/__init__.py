"""A stand-in for an installed library that registers torch operators when it is imported.

Real libraries (torchvision, audio and detection packages) register their operators with
``TORCH_LIBRARY`` (C++) or ``torch.library.Library`` (Python) at import time. torch allows one
definition per namespace and process, so importing such a library a second time (after something
removed it from ``sys.modules``) raises "Only a single TORCH_LIBRARY can be used to register the
namespace ...". The zoo model ``custom_op.py`` uses this package the way a model uses such a
library; the zoo test puts this directory on ``sys.path`` as if the package were installed.

``SoftClip`` skips its operator when the input is already inside the limit: a data-dependent
branch, so torch.fx keeps it as a leaf and the generated ``model.py`` imports this package again.
"""

from __future__ import annotations

import torch
from torch import nn

NAMESPACE = "convrewrite_zoo_ops"

_library = torch.library.Library(NAMESPACE, "DEF")
_library.define("soft_clip(Tensor x, float limit) -> Tensor")


def _soft_clip(x: torch.Tensor, limit: float) -> torch.Tensor:
    return limit * torch.tanh(x / limit)


_library.impl("soft_clip", _soft_clip, "CompositeExplicitAutograd")


class SoftClip(nn.Module):
    """limit * tanh(x / limit) through the registered operator, skipped when |x| <= limit."""

    def __init__(self, limit: float = 3.0) -> None:
        super().__init__()
        self.limit = limit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().amax()) <= self.limit:
            return x
        return torch.ops.convrewrite_zoo_ops.soft_clip(x, self.limit)

    def extra_repr(self) -> str:
        return f"limit={self.limit}"
