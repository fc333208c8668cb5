"""Strategy "ray": the ranks are Ray Train workers (``TorchTrainer``, gloo).

Without ``train.options.ray.address`` a private local Ray is started (loopback, no dashboard)
and stopped afterwards; with it (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``) the job runs
on that cluster, which is how training spans several machines (docs/distributed.md). Ray Train
builds the process group; each worker pins itself to a disjoint set of its node's cores and runs
the function it was given (``rank.run_rank``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from accelcore.errors import one_line
from accelcore_strategies.cores import plan_cores
from accelcore_strategies.failures import DistributedError, RankFailure, is_peer_loss, root_cause
from accelcore_strategies.launchers.base import Launcher, positive_int, positive_number, text
from accelcore_strategies.rank import WorkerSpec, run_rank
from accelcore_strategies.rendezvous import DEFAULT_TIMEOUT_S


class RayLauncher(Launcher):
    """``address``: the Ray cluster (None: a private local Ray). ``cpus_per_worker``: Ray CPUs
    reserved per worker = cores it is pinned to (default: CPUs / workers). ``timeout_s``: gloo
    collective timeout. ``storage_path``: Ray Train's own state (default: a temporary folder
    removed afterwards; on a multi-node cluster, a folder every node reaches)."""

    name = "ray"
    description = ("Ray Train TorchTrainer workers (local Ray, or a cluster via "
                   "train.options.ray.address), DDP/gloo")
    options = {"address": text, "cpus_per_worker": positive_int, "timeout_s": positive_number,
               "storage_path": text}

    def __init__(self, nprocs: int, *, allocator: str = "default",
                 malloc_tuning: bool = True, global_batch: int | None = None,
                 address: str | None = None,
                 cpus_per_worker: int | None = None, timeout_s: float = DEFAULT_TIMEOUT_S,
                 storage_path: str | None = None) -> None:
        super().__init__(nprocs, allocator=allocator, malloc_tuning=malloc_tuning,
                         global_batch=global_batch)
        self.env = self.runtime.env()  # clear error before Ray starts; path must exist
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.timeout_s = timeout_s
        self.storage_path = storage_path

    @classmethod
    def unavailable_reason(cls) -> str:
        if importlib.util.find_spec("ray") is None:  # never import ray just to declare
            return "ray is not installed; pip install 'accelcore[ray]'"
        return ""

    def launch(self, fn: Callable[[int, int], Any]) -> Any:
        import ray

        with contextlib.ExitStack() as stack:
            storage = self.storage_path or stack.enter_context(tempfile.TemporaryDirectory(
                prefix="accelcore-ray-", ignore_cleanup_errors=True))
            runtime_env = {"env_vars": self.env} if self.env else None
            owns_ray = not ray.is_initialized()
            if owns_ray:
                if self.address:
                    ray.init(address=self.address, runtime_env=runtime_env)
                else:
                    per = self.cpus_per_worker or max(1, len(os.sched_getaffinity(0))
                                                      // self.nprocs)
                    # address="local": always a private instance, never someone else's Ray on
                    # this host. (Ray registers the node under its own IP even when asked for
                    # 127.0.0.1 — services.resolve_ip_for_localhost — so traffic uses that IP
                    # but stays on the host.)
                    ray.init(address="local", num_cpus=self.nprocs * per,
                             include_dashboard=False, runtime_env=runtime_env)
                stack.callback(ray.shutdown)  # before the storage folder goes
            return self._fit(fn, ray, storage)

    def _fit(self, fn: Callable[[int, int], Any], ray: Any, storage: str) -> Any:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        cpus = int(ray.cluster_resources().get("CPU", self.nprocs))
        per = self.cpus_per_worker or max(1, cpus // self.nprocs)
        print(f"accelcore: strategy ray: {self.nprocs} worker(s) x {per} CPU on "
              f"{self.address or 'a local Ray'}{self.batch_note()}, allocator {self.allocator}",
              flush=True)
        spec = WorkerSpec(fn=fn, world_size=self.nprocs, rendezvous=None, cores=None,
                          comm_dir=None)
        trainer = TorchTrainer(
            _ray_rank,
            train_loop_config={"spec": spec, "cpus_per_worker": per},
            torch_config=TorchConfig(backend="gloo", timeout_s=int(self.timeout_s)),
            scaling_config=ScalingConfig(num_workers=self.nprocs, use_gpu=False,
                                         resources_per_worker={"CPU": per}),
            run_config=RunConfig(name="ray_train", storage_path=str(Path(storage).resolve()),
                                 failure_config=FailureConfig(max_failures=0)),
        )
        try:
            result = trainer.fit()
        except Exception as exc:
            raise ray_failure(exc) from None
        if result.error is not None:
            raise ray_failure(result.error)
        return result.return_value


def _ray_rank(config: dict) -> Any:
    """One Ray Train worker: pin to this node's share of cores, then the shared rank body."""
    import ray.train

    ctx = ray.train.get_context()
    cores = plan_cores(ctx.get_local_world_size(), cores_per_proc=config["cpus_per_worker"])
    spec = dataclasses.replace(config["spec"], cores=cores)
    return run_rank(spec, ctx.get_world_rank(), local_rank=ctx.get_local_rank())


def ray_failure(exc: BaseException) -> DistributedError:
    """Ray's failure (per-rank exceptions with tracebacks) as one DistributedError line."""
    per_rank = getattr(exc, "worker_failures", None) or {}
    failures = []
    for rank, error in per_rank.items():
        inner = _innermost(error)
        if type(inner).__name__ == "ActorDiedError":
            # Ray only sees the connection drop, not the signal (SIGKILL, OOM killer, segfault).
            cause = ("worker process died (killed by a signal such as SIGKILL, the OOM killer, "
                     "or a crash; Ray saw its connection drop)")
        else:
            cause = one_line(inner)
        failures.append(RankFailure(int(rank), cause, is_peer_loss(cause), 0.0))
    if not failures:  # the trainer/controller itself failed (e.g. could not unpickle the job)
        return DistributedError(f"strategy 'ray': {one_line(_innermost(exc))}")
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
