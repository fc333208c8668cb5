"""``accelerate.methods: auto``: the methods that can be fast on this CPU.

A backend declares the precision its method computes in (``Declaration.compute``). ``auto`` runs
every available method whose precision is native here and skips the rest with the reason in the
report — bf16 on a CPU without AVX512-BF16/AMX is emulated through fp32 and ran ~3× slower than
fp32 eager on a Zen 3, so running it by default only costs time. An explicit list runs as asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from accelcore.machine import cpu_model, precision_support

AUTO = "auto"


@dataclass(frozen=True)
class MethodChoice:
    """What ``auto`` decided for one declared method."""

    method: str
    run: bool
    reason: str = ""


def choose_methods(pm: Any, kind: str = "backend",
                   flags: set[str] | None = None) -> list[MethodChoice]:
    """One choice per declared method of ``kind``, in name order."""
    support = precision_support(flags)
    cpu = cpu_model() if flags is None else "this CPU"
    choices: list[MethodChoice] = []
    for name in pm.names(kind):
        decl = pm.find(kind, name).declaration
        if not decl.available:
            choices.append(MethodChoice(name, False, decl.reason))
            continue
        level = support.get(decl.compute, "native") if decl.compute else "native"
        if level != "native":
            choices.append(MethodChoice(name, False, (
                f"not run by methods: auto: {decl.compute} is {level} on {cpu}; "
                f"list it in accelerate.methods to run it anyway")))
            continue
        choices.append(MethodChoice(name, True))
    return choices


def expand_auto(methods: list[str], pm: Any,
                flags: set[str] | None = None) -> tuple[list[str], list[MethodChoice]]:
    """``methods`` with ``auto`` replaced by the chosen methods; also the skipped choices."""
    if AUTO not in methods:
        return methods, []
    choices = choose_methods(pm, flags=flags)
    chosen = [c.method for c in choices if c.run]
    out: list[str] = []
    for method in methods:
        out.extend(chosen if method == AUTO else [method])
    listed = set(out)
    skipped = [c for c in choices if not c.run and c.method not in listed]
    return list(dict.fromkeys(out)), skipped
