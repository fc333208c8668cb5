"""``accelcore bench train --num-processes 1,2``: the same global batch on N processes, for each
strategy.

Every rank runs the real training step of ``accelcore.training.loop.Trainer`` (DDP-wrapped when
N > 1, placed on its cores by the strategy's launcher) on one fixed batch, the same way the
single-process ``compute`` mode of ``accelcore.training.bench`` does. A step counts as long as the
slowest rank needs (the all-reduce makes them wait for it), so img/s = global batch / median of
the per-step maximum over ranks. The ranks are started through ``accelcore_launch``, so every
declared strategy can be measured, including a third party's.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from accelcore.errors import AccelcoreError, RecipeError, one_line
from accelcore.plugins import PluginManager
from accelcore.training.launch import launch

#: The one-process strategy: its rows would repeat every other strategy's 1-process row, and it
#: cannot run more than one process, so it is measured only when named in ``--strategies``.
ONE_PROCESS_STRATEGY = "single"


def default_strategies(pm: PluginManager) -> list[str]:
    """Every declared strategy except the one-process one."""
    return [name for name in pm.names("strategy") if name != ONE_PROCESS_STRATEGY]


def bench_rank(recipe: Any, iters: int, warmup: int, rank: int, world_size: int) -> dict | None:
    """One rank of the benchmark (runs inside a launched process)."""
    import torch
    import torch.distributed as dist

    from accelcore.interfaces import TrainJob
    from accelcore.training.loop import Trainer

    with tempfile.TemporaryDirectory(prefix="accelcore-bench-") as tmp:
        t = Trainer(TrainJob(recipe, Path(tmp)), rank, world_size, write=False)
        t.setup_runtime()
        t.setup_data()
        t.setup_model()
        t.wrap_model()
        images, targets = next(iter(t.loader))  # this rank's share of the global batch
        times = []
        for k in range(warmup + iters):
            if world_size > 1:
                dist.barrier()  # start every step together so the max is the step's length
            t0 = time.perf_counter()
            t.train_one_iter(images, targets, multiscale=False)
            t.state.iteration += 1
            if k >= warmup:
                times.append(time.perf_counter() - t0)
    steps = torch.tensor(times, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)
    if rank != 0:
        return None
    med = statistics.median(steps.tolist())
    return {"img_per_s": recipe.train.batch_size / med, "step_ms": 1000 * med,
            "threads": torch.get_num_threads(), "per_rank_batch": int(images.shape[0])}


def bench_distributed(pm: PluginManager, recipe: Any, strategies: list[str] | None,
                      num_processes: list[int], iters: int = 10, warmup: int = 3,
                      log: Any = print) -> list[dict[str, Any]]:
    """Rows ``{strategy, processes, allocator, threads, img_per_s, speedup, step_ms, status,
    reason}``; ``speedup`` is relative to the same strategy with 1 process. ``strategies``
    None: :func:`default_strategies`."""
    names = default_strategies(pm) if strategies is None else strategies
    # Unknown names stop the command; declared but unavailable ones become failed rows.
    declarations = {name: pm.require("strategy", name, "--strategies", available=False)
                    for name in names}
    for n in num_processes:
        if n < 1 or recipe.train.batch_size % n:
            raise RecipeError(f"--num-processes: {n} must be >= 1 and divide train.batch_size "
                              f"{recipe.train.batch_size}")
    rows: list[dict[str, Any]] = []
    fn = functools.partial(bench_rank, recipe, iters, warmup)
    for name in names:
        for n in num_processes:
            row: dict[str, Any] = {"strategy": name, "processes": n,
                                   "allocator": recipe.train.allocator, "img_per_s": None,
                                   "speedup": None, "step_ms": None, "threads": None,
                                   "status": "ok", "reason": ""}
            rows.append(row)
            if not declarations[name].available:
                row.update(status="failed", reason=declarations[name].reason)
                log(f"  {name:<10} {n} processes: unavailable: {row['reason']}")
                continue
            try:
                out = launch(pm, recipe, fn, n, strategy=name, key="--strategies")
            except (AccelcoreError, ImportError) as exc:
                # Our errors are one line already; an ImportError gets its type in front.
                reason = str(exc) if isinstance(exc, AccelcoreError) else one_line(exc)
                row.update(status="failed", reason=reason.splitlines()[0])
                log(f"  {name:<10} {n} processes: failed: {row['reason']}")
                continue
            row.update(img_per_s=out["img_per_s"], step_ms=out["step_ms"],
                       threads=out["threads"])
            log(f"  {name:<10} {n} x {out['threads']} threads  {out['img_per_s']:8.2f} img/s"
                f"  (median step {out['step_ms']:.0f} ms, batch {out['per_rank_batch']}/rank)")
    for row in rows:
        ref = next((r for r in rows if r["strategy"] == row["strategy"] and r["processes"] == 1
                    and r["img_per_s"]), None)
        if ref is not None and row["img_per_s"]:
            row["speedup"] = row["img_per_s"] / ref["img_per_s"]
    return rows
