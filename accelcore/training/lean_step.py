"""The lean training step's master switch.

The lean step is what a training step does beyond torch's own ops on a channels_last model, all
of it exact: this package's C++ kernels (:mod:`accelcore.training.native` — fused BatchNorm +
SiLU, depthwise gradients, space-to-depth), concatenations that hand back channels_last
gradients (:func:`accelcore.training.layout.channel_cat`) and the training-only restructurings
a model plugin makes when :func:`enabled` says so (each plugin documents its own). ``0`` in
:data:`SWITCH_ENV` switches all of it off: the plain channels_last step the bench's
``fp32_cl_torch`` row measures, the reference the lean step is measured against.
"""

from __future__ import annotations

import os

SWITCH_ENV = "ACCELCORE_LEAN_STEP"


def enabled() -> bool:
    """Whether the lean step may run (unless :data:`SWITCH_ENV` is ``0``)."""
    return os.environ.get(SWITCH_ENV, "1") != "0"
