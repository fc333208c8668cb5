"""The launchers of this plugin, one module each, and the one registry the hooks dispatch by:
strategy name -> ``Launcher`` class. Adding a strategy here is adding its class to ``LAUNCHERS``;
a third party does the same in its own plugin with its own ``accelcore_launch``."""

from __future__ import annotations

from accelcore_strategies.launchers.base import Launcher
from accelcore_strategies.launchers.ray import RayLauncher
from accelcore_strategies.launchers.single import SingleLauncher
from accelcore_strategies.launchers.spawn import SpawnLauncher
from accelcore_strategies.launchers.subprocess import SubprocessLauncher

LAUNCHERS: dict[str, type[Launcher]] = {
    cls.name: cls for cls in (SingleLauncher, SubprocessLauncher, SpawnLauncher, RayLauncher)}

__all__ = ["LAUNCHERS", "Launcher", "RayLauncher", "SingleLauncher", "SpawnLauncher",
           "SubprocessLauncher"]
