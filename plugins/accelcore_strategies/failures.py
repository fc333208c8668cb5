"""Failure records: why a rank stopped, in one line, and which failure explains the others.

A rank writes its record into the job's folder before it exits; the launcher reads the records
of every rank that stopped and reports the root cause, never the "connection closed by peer"
that the surviving ranks see once the first one is gone.
"""

from __future__ import annotations

import json
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

from accelcore.errors import AccelcoreError, one_line

# Substrings of errors that a rank raises because *another* rank went away: they are effects,
# never the root cause, when a real failure is also known.
_PEER_LOSS_HINTS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                    "socket closed", "read error", "connection refused", "end of file")


@dataclass
class RankFailure:
    """Why one rank stopped, in one line."""

    rank: int
    cause: str
    peer_loss: bool = False  # raised because another rank went away (an effect, not the cause)
    time: float = field(default_factory=time.time)


class DistributedError(AccelcoreError):
    """A multi-process run failed; the message names the rank and the cause on one line."""

    def __init__(self, message: str, failure: RankFailure | None = None) -> None:
        super().__init__(message)
        self.failure = failure


def is_peer_loss(exc_or_text: BaseException | str) -> bool:
    text = exc_or_text if isinstance(exc_or_text, str) else one_line(exc_or_text)
    return any(hint in text.lower() for hint in _PEER_LOSS_HINTS)


def _record_path(comm_dir: str | Path, rank: int) -> Path:
    return Path(comm_dir) / f"rank{rank}.error.json"


def write_failure(comm_dir: str | Path, rank: int, exc: BaseException) -> None:
    cause = one_line(exc)
    record = {"rank": rank, "cause": cause, "peer_loss": is_peer_loss(cause), "time": time.time()}
    path = _record_path(comm_dir, rank)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)  # the launcher never reads a half-written file


def read_failure(comm_dir: str | Path, rank: int) -> RankFailure | None:
    try:
        record = json.loads(_record_path(comm_dir, rank).read_text())
    except (OSError, ValueError):
        return None
    return RankFailure(rank, record["cause"], bool(record["peer_loss"]), float(record["time"]))


def root_cause(failures: list[RankFailure]) -> RankFailure:
    """The failure that explains the others: a real error before a lost-peer error, then the
    earliest."""
    return min(failures, key=lambda f: (f.peer_loss, f.time, f.rank))


def signal_cause(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"
