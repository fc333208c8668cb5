"""float32: the base protocol unchanged."""

from __future__ import annotations

from accelcore.interfaces import Precision


class SinglePrecision(Precision):
    name = "32"
