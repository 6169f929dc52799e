"""Measured speed: latency of the original and the rewritten model, whole and layer by layer.

The package's names are ``speed/latency.py``'s public ones (its ``__all__``, written once there).
"""

from convrewrite.speed import latency
from convrewrite.speed.latency import *  # noqa: F403 -- re-exports exactly latency.__all__

__all__ = list(latency.__all__)
