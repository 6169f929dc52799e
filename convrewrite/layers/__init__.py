"""Replacement blocks, one small torch-only file per concept, re-exported flat (timm style).

Each block is registered as an FX leaf, so traced graphs call it as one module and generated source
keeps it as one readable layer. The files here import nothing but torch: ``convrewrite apply``
copies their source into the generated ``model.py``.
"""

from convrewrite.layers.separable import SeparableConv1d, SeparableConv2d
from convrewrite.tracing import register_leaf_module

BLOCK_CLASSES = (SeparableConv1d, SeparableConv2d)

for _cls in BLOCK_CLASSES:
    register_leaf_module(_cls)

__all__ = ["BLOCK_CLASSES", "SeparableConv1d", "SeparableConv2d"]
