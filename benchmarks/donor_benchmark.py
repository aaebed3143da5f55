"""Swapped blocks held on a second GPU against pinned host memory (issue #19).

Core's own Wan class at Wan 14B's block size (8 blocks, bf16, random weights), built by
core's loader as ``engine_refactor_compare.py`` builds it, every block swapped, computing on
``cuda:0``. Each source stores the swapped blocks somewhere else: ``cpu`` (pinned host memory,
the default) or ``cuda:1`` (``donor_device="cuda:1"``, copied peer to peer). Rows: 1,560 and
32,760 tokens per source, each against its own floor (swapped bytes over that source's
measured copy rate) and its output against the model all on ``cuda:0``.

    python benchmarks/donor_benchmark.py --comfyui PATH   # results/donor_<gpu>.json
    python benchmarks/donor_benchmark.py --cpu --comfyui PATH --output /tmp/d.json

Fields: ``device``, ``p2p_gbps``, ``h2d_gbps``, ``peer_access`` and rows of ``source``,
``tokens``, ``ms``, ``floor_ms``, ``ratio``, ``equal_output``. Bars: from ``cuda:1`` at 1,560
tokens within 1.05x its floor; faster than from ``cpu`` where ``p2p_gbps`` > ``h2d_gbps``;
outputs equal. ``--cpu`` is a smoke run: the small Wan, with the ``cpu`` source only (there
is no second device), no bar judged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import architectures_benchmark as arch  # noqa: E402  (imports _pack: this checkout's package)
from engine_refactor_compare import FAMILY, SHAPES, TEXT  # noqa: E402

from comfyui_wan_blockswap import model_configs  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap import apply_block_swap  # noqa: E402

GB = 1e9
FLOOR_BAR = 1.05
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def copy_rate_gbps(nbytes: int, source: torch.device, target: torch.device) -> float:
    """Median GB/s of copies of ``nbytes`` from ``source`` into ``target`` (``cpu``: pinned
    host memory), timed on the target's current stream after a warm-up copy."""
    if source.type == "cpu":
        return arch.copy_rate_gbps(nbytes, target)
    src = torch.ones(nbytes, dtype=torch.uint8, device=source)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=target)
    rates = []
    for _ in range(6):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        rates.append(nbytes / (start.elapsed_time(end) / 1e3) / GB)
    return statistics.median(rates[1:])


def run_source(model, source: str, inputs: dict, reference: dict, opts: Any, rate: float) -> list:
    """Every block swapped and stored on ``source``: one row per token count."""
    layout = model_configs.match(model).layout
    options = {} if source == "cpu" else {"donor_device": source}
    swap = apply_block_swap(model, layout=layout, device=opts.device, blocks_to_swap=8, **options)
    try:
        swapped_bytes = swap.plan.swapped_bytes
        stored = sorted({str(u.host.tensor.device) for u in swap.units})
        rows = []
        for tokens, kwargs in inputs.items():
            got = arch.timed(model, FAMILY, kwargs, opts, tokens)
            floor_ms = swapped_bytes / (rate * GB) * 1e3
            rows.append(
                {
                    "source": source,
                    "stored_on": stored,
                    "tokens": tokens,
                    "ms": round(got.timing.median_ms, 3),
                    "min_ms": round(got.timing.min_ms, 3),
                    "floor_ms": round(floor_ms, 3),
                    "ratio": round(got.timing.median_ms / floor_ms, 4),
                    "all_on_gpu_ms": round(reference[tokens].timing.median_ms, 3),
                    "equal_output": arch._equal(got.output, reference[tokens].output),
                    "swapped_bytes": swapped_bytes,
                    "allocation": swap.storage.describe() if swap.storage else "cpu,*",
                }
            )
        return rows
    finally:
        swap.remove()


def bars(results: dict) -> dict:
    rows = results["rows"]
    judged = results["mode"] == "gpu" and any(r["source"] != "cpu" for r in rows)
    small = min((r["tokens"] for r in rows), default=0)
    donor = [r for r in rows if r["source"] != "cpu"]
    by = {(r["source"], r["tokens"]): r for r in rows}
    faster = [
        r["ms"] < by[("cpu", r["tokens"])]["ms"]
        for r in donor
        if ("cpu", r["tokens"]) in by and r["tokens"] == small
    ]
    return {
        "floor": f"from a donor GPU at {small} tokens: ms <= {FLOOR_BAR} x floor_ms",
        "judged": judged,
        "floor_met": (
            all(r["ratio"] <= FLOOR_BAR for r in donor if r["tokens"] == small) if judged else None
        ),
        "faster_than_host_where_p2p_is_faster": (
            all(faster) if judged and results["p2p_gbps"] > results["h2d_gbps"] else None
        ),
        "all_equal_output": all(r["equal_output"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--donor", default="cuda:1", help="the donor GPU (default cuda:1)")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards, small rows")
    parser.add_argument("--cpu", action="store_true", help="smoke run, small dims, no bars")
    args = parser.parse_args(argv)
    if not args.comfyui:
        sys.exit("name the core tree: --comfyui PATH or COMFYUI_PATH")
    started = time.perf_counter()
    mode = "cpu" if args.cpu else "gpu"
    if not args.cpu and torch.cuda.device_count() < 2:
        sys.exit("a donor GPU needs a second CUDA device: use --cpu for the smoke run")
    comfy = arch.import_core(args.comfyui, args.cpu)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    donor = None if args.cpu else torch.device(args.donor)
    small = args.iters or (2 if args.cpu else 10)
    patcher, _ = arch.load(comfy, FAMILY, args.cpu, device, torch.bfloat16)
    model = patcher.model.diffusion_model
    arch._free(device)
    inputs = {}
    for i, shape in enumerate(SHAPES[mode]):
        g = torch.Generator("cpu").manual_seed(1 + i)
        kwargs, count = FAMILY.inputs(model, shape, TEXT[mode], g)
        inputs[count] = kwargs
    tokens = list(inputs)
    opts = arch.Options(
        cpu=args.cpu,
        device=device,
        dtype=torch.bfloat16,
        warmup=dict(zip(tokens, (1, 1) if args.cpu else (2, 1))),
        runs=dict(zip(tokens, (small, small if args.cpu else max(3, small // 3)))),
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    short = "cpu" if args.cpu else name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(ROOT, "benchmarks", "results", f"donor_{short}.json")
    unit = 256 * 2**20
    results: dict[str, Any] = {
        "device": name,
        "donor": None if donor is None else torch.cuda.get_device_name(donor),
        "mode": mode,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"core's Wan ({type(patcher.model).__name__}), 8 blocks, bf16, random",
        "h2d_gbps": round(arch.copy_rate_gbps(unit, device), 2),
        "p2p_gbps": None,
        "peer_access": None,
        "rows": [],
    }
    if donor is not None:
        results["peer_access"] = torch.cuda.can_device_access_peer(device.index, donor.index)
        results["p2p_gbps"] = round(copy_rate_gbps(unit, donor, device), 2)
    model.to(device)
    reference = {t: arch.timed(model, FAMILY, inputs[t], opts, t) for t in tokens}
    model.to("cpu")
    arch._free(device)
    sources = [("cpu", results["h2d_gbps"])]
    if donor is not None:
        sources.append((str(donor), results["p2p_gbps"]))
    for source, rate in sources:
        results["rows"].extend(run_source(model, source, inputs, reference, opts, rate))
        arch._free(device)
    results["bars"] = bars(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    for r in results["rows"]:
        print(
            f"{r['source']:>7} {r['tokens']:>6} {r['ms']:>9.2f} ms  floor {r['floor_ms']:>8.2f}"
            f"  x{r['ratio']:.3f}  equal {r['equal_output']}",
            flush=True,
        )
    print(f"wrote {output} in {results['seconds']:.0f}s; bars {results['bars']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
