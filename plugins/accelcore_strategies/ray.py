"""Strategy "ray": ``train.num_processes`` ranks as Ray Train workers (``TorchTrainer``, gloo).

Without ``ray.address`` a private local Ray is started (loopback, no dashboard) and stopped
afterwards; with it (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) the job runs on that
cluster, which is how training spans several machines (docs/distributed.md). Ray Train builds the
process group; each worker pins itself to a disjoint set of its node's cores and runs the core
loop ``fit`` unchanged (``ddp.run_rank``).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelcore import hookimpl
from accelcore.interfaces import Declaration, TrainJob

NAME = "ray"


# specname: this module's hooks join the package plugin beside the other strategies' ones.
@hookimpl(specname="accelcore_declare")
def declare_ray() -> list[Declaration]:
    available = importlib.util.find_spec("ray") is not None  # never import ray just to declare
    return [Declaration("strategy", NAME, "Ray Train TorchTrainer workers (local Ray, or a "
                        "cluster via ray.address), DDP/gloo", available=available,
                        reason="" if available else "ray is not installed; "
                        "pip install 'accelcore[ray]'")]


@hookimpl(specname="accelcore_train")
def train_ray(strategy: str, job: TrainJob) -> dict | None:
    if strategy != NAME:
        return None
    return run_ray(job)


def run_ray(job: TrainJob) -> dict:
    """Train ``job`` with ``train.num_processes`` Ray Train workers, each running ``fit``."""
    import functools

    from accelcore_strategies.ddp import DEFAULT_TIMEOUT_S, fit_job

    cfg = job.recipe.train
    summary = launch_ray(functools.partial(fit_job, job), cfg.num_processes, job.recipe.ray,
                         job.run_dir, allocator=cfg.allocator,
                         timeout_s=float(job.extra.get("dist_timeout_s", DEFAULT_TIMEOUT_S)),
                         batch_size=cfg.batch_size)
    if not isinstance(summary, dict):
        raise _one_line(RuntimeError(f"rank 0 returned {type(summary).__name__}, "
                                     "not the training summary"))
    return summary


def launch_ray(fn: Callable[[int, int], Any], nprocs: int, ray_cfg: Any, run_dir: str | Path,
               allocator: str = "default", timeout_s: float | None = None,
               batch_size: int | None = None) -> Any:
    """Run ``fn(rank, world_size)`` on ``nprocs`` Ray Train workers; return rank 0's result.

    ``ray_cfg`` is the recipe's ``RayConfig`` (``address``, ``cpus_per_worker``).
    """
    import os

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from accelcore.runtime import allocator_env
    from accelcore_strategies.ddp import DEFAULT_TIMEOUT_S, WorkerSpec

    env = allocator_env(allocator)  # clear error before Ray starts; path must exist on nodes
    runtime_env = {"env_vars": env} if env else None
    owns_ray = not ray.is_initialized()
    if owns_ray:
        if ray_cfg.address:
            ray.init(address=ray_cfg.address, runtime_env=runtime_env)
        else:
            per = ray_cfg.cpus_per_worker or max(1, len(os.sched_getaffinity(0)) // nprocs)
            # address="local": always a private instance, never someone else's Ray on this host.
            # (Ray registers the node under its own IP even when asked for 127.0.0.1 —
            # services.resolve_ip_for_localhost — so traffic uses that IP but stays on the host.)
            ray.init(address="local", num_cpus=nprocs * per, include_dashboard=False,
                     runtime_env=runtime_env)
    try:
        cpus = int(ray.cluster_resources().get("CPU", nprocs))
        per = ray_cfg.cpus_per_worker or max(1, cpus // nprocs)
        batch = (f", global batch {batch_size} = {batch_size // nprocs} per rank"
                 if batch_size else "")
        print(f"accelcore: strategy ray: {nprocs} worker(s) x {per} CPU on "
              f"{ray_cfg.address or 'a local Ray'}{batch}, allocator {allocator}", flush=True)
        spec = WorkerSpec(fn=fn, world_size=nprocs, rendezvous=None, cores=None, comm_dir=None)
        trainer = TorchTrainer(
            _ray_rank,
            train_loop_config={"spec": spec, "cpus_per_worker": per},
            torch_config=TorchConfig(backend="gloo",
                                     timeout_s=int(timeout_s or DEFAULT_TIMEOUT_S)),
            scaling_config=ScalingConfig(num_workers=nprocs, use_gpu=False,
                                         resources_per_worker={"CPU": per}),
            run_config=RunConfig(name="ray_train",
                                 storage_path=str(Path(run_dir).resolve() / "ray"),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            raise _one_line(exc) from None
        if result.error is not None:
            raise _one_line(result.error)
        return result.return_value
    finally:
        if owns_ray:
            ray.shutdown()


def _ray_rank(config: dict) -> dict:
    """One Ray Train worker: pin to this node's share of cores, then the shared rank body."""
    import dataclasses

    import ray.train

    from accelcore_strategies.ddp import plan_cores, run_rank

    ctx = ray.train.get_context()
    cores = plan_cores(ctx.get_local_world_size(), cores_per_proc=config["cpus_per_worker"])
    spec = dataclasses.replace(config["spec"], cores=cores)
    return run_rank(spec, ctx.get_world_rank(), local_rank=ctx.get_local_rank())


def _one_line(exc: BaseException) -> Exception:
    """Ray's failure (per-rank exceptions with tracebacks) as one DistributedError line."""
    from accelcore_strategies.ddp import (
        RankFailure,
        describe_exception,
        is_peer_loss,
        root_cause,
    )
    from accelcore_strategies.launcher import DistributedError

    per_rank = getattr(exc, "worker_failures", None) or {}
    failures = []
    for rank, error in per_rank.items():
        inner = _innermost(error)
        if type(inner).__name__ == "ActorDiedError":
            # Ray only sees the connection drop, not the signal (SIGKILL, OOM killer, segfault).
            cause = ("worker process died (killed by a signal such as SIGKILL, the OOM killer, "
                     "or a crash; Ray saw its connection drop)")
        else:
            cause = describe_exception(inner)
        failures.append(RankFailure(int(rank), cause, is_peer_loss(cause), 0.0))
    if not failures:  # the trainer/controller itself failed (e.g. could not unpickle the job)
        return DistributedError(f"strategy 'ray': {describe_exception(_innermost(exc))}")
    cause = root_cause(failures)
    return DistributedError(f"strategy 'ray': rank {cause.rank} failed: {cause.cause}", cause)


def _innermost(exc: BaseException) -> BaseException:
    """The user's exception inside Ray's wrappers (``RayTaskError.cause``; a dead worker's
    ``ActorDiedError`` inside ``WorkerHealthCheckFailedError.health_check_failure``)."""
    for _ in range(10):
        inner = (getattr(exc, "cause", None) or getattr(exc, "health_check_failure", None)
                 or getattr(exc, "controller_failure", None) or exc.__cause__)
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc
