"""Where the ranks of a local job meet: a free loopback port and the gloo process group."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch.distributed as dist

LOOPBACK = "127.0.0.1"
# Generous like torch's own default: rank 0 evaluates alone while the others wait in a barrier,
# so a short gloo timeout would kill healthy runs. Dead ranks are caught by launcher polling.
DEFAULT_TIMEOUT_S = 1800.0


@dataclass(frozen=True)
class Rendezvous:
    """Where rank 0's TCPStore listens; every rank connects there to form the gloo group."""

    addr: str
    port: int
    world_size: int
    timeout_s: float = DEFAULT_TIMEOUT_S


def find_free_port(host: str = LOOPBACK) -> int:
    """A port the kernel considers free right now on ``host`` (bind to port 0 and release)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def is_port_in_use_error(message: str) -> bool:
    """True for rank 0's TCPStore failing to listen (another process took the port)."""
    text = message.lower()
    return "eaddrinuse" in text or "address already in use" in text


def init_process_group(rank: int, rendezvous: Rendezvous | None) -> bool:
    """Join the gloo group; returns False if a launcher (Ray Train) already did it."""
    if dist.is_initialized():
        if rendezvous is not None and (dist.get_rank() != rank
                                       or dist.get_world_size() != rendezvous.world_size):
            raise RuntimeError(
                f"process group already initialised as rank {dist.get_rank()}/"
                f"{dist.get_world_size()}, expected {rank}/{rendezvous.world_size}")
        return False
    if rendezvous is None:
        raise RuntimeError("no rendezvous given and no process group initialised")
    if rendezvous.addr in (LOOPBACK, "localhost"):
        # gloo picks its interface from the hostname; on one node keep all traffic on loopback.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"tcp://{rendezvous.addr}:{rendezvous.port}", rank=rank,
        world_size=rendezvous.world_size, timeout=timedelta(seconds=rendezvous.timeout_s))
    return True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
