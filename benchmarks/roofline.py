"""The machine's own compute limit per precision, and how close an inference report gets to it.

    python benchmarks/roofline.py                          # GEMM rates + yolox_nano's bound
    python benchmarks/roofline.py --report RUN/report.json # + ratio of the selected method

What it measures, under the project's runtime setup, all cores:

* ``gemm_gops``: dense GEMM throughput per precision, in GOP/s (one multiply-add = 2 ops),
  the best of a few square sizes: ``fp32`` and ``bf16`` with ``torch.mm``, ``int8`` with
  ``torch._int_mm`` (int8 x int8 -> int32, oneDNN: VNNI or AMX where the CPU has them). A GEMM
  this size is the best case for the hardware; a real network's convolutions (1x1, depthwise,
  small channel counts) reach less, so the bound below is optimistic by construction.
* ``model_gop_per_image``: 2 x the multiply-adds of the model's convolutions and matrix
  products at the given input size (torch's ``FlopCounterMode``, one eager pass).
* ``bound_ms``: the batch's operations at the int8 (and bf16, fp32) GEMM rate.

With ``--report``, the selected method's measured latency over the int8 bound is printed as
``x_of_int8_bound`` (issue 12's target: <= 3.5). Writes ``benchmarks/results/roofline_<date>.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = (1024, 2048, 3072)
REPEATS = 5


def gemm_gops(dtype: str, size: int) -> float:
    """Median GOP/s of ``REPEATS`` ``size``-cube GEMMs in ``dtype`` (after one warm-up)."""
    import torch

    from accelcore.inference.latency import measure_latency

    if dtype == "int8":
        a = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        b = torch.randint(-128, 127, (size, size), dtype=torch.int8)
        multiply = torch._int_mm
    else:
        torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
        a = torch.randn(size, size).to(torch_dtype)
        b = torch.randn(size, size).to(torch_dtype)
        multiply = torch.mm
    ms = measure_latency(lambda left: multiply(left, b), a, warmup=1, min_runs=REPEATS,
                         min_seconds=0.0, max_runs=REPEATS)["median_ms"]
    return 2 * size**3 / (ms / 1000) / 1e9


def model_gop_per_image(model_name: str, height: int, width: int) -> float:
    """Operations of one image (torch's ``FlopCounterMode``: 2 x the multiply-adds of the
    convolutions and matrix products; elementwise layers are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from accelcore.registry import create_model

    model = create_model(model_name).eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, height, width))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="yolox_nano")
    parser.add_argument("--size", type=int, nargs=2, default=(416, 416), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--report", type=Path, help="an inference report.json to compare")
    parser.add_argument("--json", type=Path, help="output (default benchmarks/results/...)")
    args = parser.parse_args()

    from accelcore.machine import machine_info
    from accelcore.runtime import RuntimeSetup

    RuntimeSetup().apply()
    rates = {dtype: round(max(gemm_gops(dtype, n) for n in SIZES), 1)
             for dtype in ("fp32", "bf16", "int8")}
    gop = model_gop_per_image(args.model, *args.size)
    batch_gop = gop * args.batch
    bounds = {dtype: round(1000 * batch_gop / rate, 1) for dtype, rate in rates.items()}
    result: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine_info(),
        "gemm_gops": rates, "gemm_sizes": list(SIZES), "model": args.model,
        "input_size": list(args.size), "batch": args.batch,
        "model_gop_per_image": round(gop, 3), "batch_gop": round(batch_gop, 1),
        "bound_ms": bounds}
    print(f"CPU {result['machine']['cpu']}: GEMM GOP/s " +
          ", ".join(f"{d} {r}" for d, r in rates.items()))
    print(f"{args.model} @{args.size[0]}x{args.size[1]}: {gop:.2f} GOP/image, "
          f"batch {args.batch} = {batch_gop:.0f} GOP -> bound " +
          ", ".join(f"{d} {ms} ms" for d, ms in bounds.items()))
    if args.report:
        report = json.loads(args.report.read_text())
        lead = report.get("lead") or {}
        selected = lead.get("selected") or report.get("selected")
        latency = lead.get("selected_latency_ms")
        if latency is None:
            latency = next(row["latency_ms"] for row in report["methods"]
                           if row.get("method") == selected)
        result["report"] = {"path": str(args.report), "selected": selected,
                            "latency_ms": round(latency, 1),
                            "x_of_int8_bound": round(latency / bounds["int8"], 2)}
        print(f"selected {selected}: {latency:.1f} ms = "
              f"{result['report']['x_of_int8_bound']}x the int8 bound")
    out = args.json or REPO / "benchmarks" / "results" / f"roofline_{time.strftime('%Y%m%d')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
