"""Entry point of one worker process of the ``subprocess`` strategy.

``python -m accelcore_strategies.worker COMM_DIR RANK``: reads the pickled
:class:`~accelcore_strategies.rank.WorkerSpec` the launcher wrote into ``COMM_DIR`` and runs it
as ``RANK``. Exit code 0 on success, 1 on an exception (recorded in ``COMM_DIR`` for the launcher,
full traceback on stderr).
"""

from __future__ import annotations

import pickle
import sys
import traceback
from pathlib import Path

from accelcore_strategies.rank import SPEC_FILE, run_rank


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m accelcore_strategies.worker COMM_DIR RANK", file=sys.stderr)
        return 2
    comm_dir, rank = Path(args[0]), int(args[1])
    spec = pickle.loads((comm_dir / SPEC_FILE).read_bytes())
    try:
        run_rank(spec, rank)
    except BaseException:  # noqa: BLE001 - every failure is reported to the launcher
        traceback.print_exc()
        sys.stderr.flush()
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
