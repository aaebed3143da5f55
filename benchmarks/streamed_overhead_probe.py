"""Where the node's 81-frame forward loses time against core, outside the server.

In the server on an H100 (session 18, 8 Wan-14B blocks, 81 frames of 480p) ours ran at 1.024x
core's s/it with 7 GiB free, every layer streamed through a 0.40 GiB window, and at 1.009x with
12 GiB free, 0.88 GiB of weights in layer slots; forwards took about 860 ms where compute
needs about 820 and the raw copies 119. This probe takes the server, the sampler and the
other prompts away: core's own Wan class (8 blocks of Wan-14B's widths, bf16, random weights,
built by core's loader as ``engine_refactor_compare.py`` builds it), one forward of 32,760
tokens, and each arm applied, timed and removed in turn, in rounds:

- ``gpu``: every weight on the GPU, no engine (the time to beat);
- ``chunks only``: nothing swapped, the FFN in chunks of ``chunk_tokens``;
- ``least + 0.61 block``: a budget 0.61 blocks (0.40 GiB) above the least one, which streams
  every large layer through that window, with and without chunks (``chunk_tokens=0``);
- ``least + 3 blocks``: the planner's choice for 3 blocks more (a wider window, or slots);
- ``all - 1.35 blocks``: 1.35 blocks' worth of weights (0.88 GiB) fewer than all, which the
  planner puts in layer slots.
The JSON names each arm's plan.

Every arm's output is compared with ``gpu``'s. A row's time is the median over its rounds'
timed forwards; rounds alternate the arms' order, so drift cancels.

    python benchmarks/streamed_overhead_probe.py --comfyui PATH
        # writes benchmarks/results/streamed_overhead_<gpu>.json
    python benchmarks/streamed_overhead_probe.py --cpu --comfyui PATH --output /tmp/s.json

``--cpu`` is a smoke run: the small Wan (dims 256/512), 128 tokens, cut into chunks of 64.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from engine_refactor_compare import FAMILY, TEXT  # noqa: E402

from comfyui_wan_blockswap import model_configs  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap import (  # noqa: E402
    SwapConfig,
    packed_slots,
    apply_block_swap,
    min_vram_budget_gb,
    plan_for,
)
from comfyui_wan_blockswap.wan_blockswap.engine import measure_model  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.model_sizes import unit_layout  # noqa: E402

GIB = 2**30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = {"gpu": (21, 60, 104), "cpu": (2, 8, 32)}  # latent frames, height, width
CHUNK_TOKENS = {"gpu": 8192, "cpu": 64}
# arm -> its budget, in blocks of the model, and chunk_tokens where not the default
ARMS: dict[str, dict[str, Any]] = {
    "gpu": {},
    "chunks only": dict(resident=True),
    "least + 0.61 block": dict(window_blocks=0.61),
    "least + 0.61 block, no chunks": dict(window_blocks=0.61, chunk_tokens=0),
    "least + 3 blocks": dict(window_blocks=3.0),
    "all - 1.35 blocks": dict(swapped_blocks=1.35),
    # session 25: the look-ahead. Streamed plans now prefetch a block's worth of bytes ahead;
    # "one layer ahead" puts back what they did before (one unit ahead of the one in use)
    "least + 0.61 block, no chunks, one layer ahead": dict(
        window_blocks=0.61, chunk_tokens=0, one_layer_ahead=True
    ),
    "least + 2 blocks, no chunks": dict(window_blocks=2.0, chunk_tokens=0),
    "least + 2 blocks, no chunks, one layer ahead": dict(
        window_blocks=2.0, chunk_tokens=0, one_layer_ahead=True
    ),
    # session 26: packed slots. Every block's layers through two fixed slots, packed ([Note:
    # packed slots]) or one unit per slot; "cross-attention apart" drops the record's grouped
    # parts, as i2v (and t2v with the FFN run whole) keep them apart ([Note: grouped parts])
    "all swapped, layer slots": dict(layer_slots=True),
    "all swapped, layer slots, one unit per slot": dict(layer_slots=True, unpacked=True),
    "all swapped, layer slots, cross-attention apart": dict(layer_slots=True, apart=True),
    "all swapped, layer slots, cross-attention apart, one unit per slot": dict(
        layer_slots=True, apart=True, unpacked=True
    ),
}


def config_for(model: torch.nn.Module, layout: Any, arm: dict, chunk_tokens: int) -> SwapConfig:
    """The config that gives ``arm``'s plan for ``model`` (raw copies, as auto sends at 81
    frames)."""
    chunks = arm.get("chunk_tokens", chunk_tokens)
    sizes = measure_model(model, unit_layout(layout, chunks))[1]
    block = max(b.nbytes for b in sizes.blocks)
    if arm.get("resident"):
        return SwapConfig(blocks_to_swap=0, chunk_tokens=chunks)
    if arm.get("layer_slots"):
        return SwapConfig(swap_unit="layer", prefetch_blocks=1, chunk_tokens=chunks)
    if "window_blocks" in arm:
        least = SwapConfig(vram_budget_gb=min_vram_budget_gb(model, layout), chunk_tokens=chunks)
        budget = plan_for(model, least, layout).resident_bytes + arm["window_blocks"] * block
    else:
        total = sizes.other_bytes + sum(b.nbytes for b in sizes.blocks)
        budget = total - arm["swapped_blocks"] * block
    return SwapConfig(vram_budget_gb=budget / GIB, chunk_tokens=chunks)


def run_arm(model: Any, layout: Any, name: str, inputs: dict, opts: Any, chunks: int) -> dict:
    """``name``'s forwards, timed, and its plan; the engine removed after."""
    arm = ARMS[name]
    swap = None
    if arm.get("apart"):  # the record's grouped parts as layers of their own
        lists = tuple(dataclasses.replace(b, grouped=()) for b in layout.block_lists)
        layout = dataclasses.replace(layout, block_lists=lists)
    if arm:
        packing = packed_slots.PACK_LAYER_SLOTS
        packed_slots.PACK_LAYER_SLOTS = packing and not arm.get("unpacked")
        try:
            swap = apply_block_swap(
                model, config_for(model, layout, arm, chunks), layout=layout, device=opts.device
            )
        finally:
            packed_slots.PACK_LAYER_SLOTS = packing
        if arm.get("one_layer_ahead"):  # any unit ahead fills the look-ahead
            swap.scheduler.provider.lookahead_bytes = 1
    else:
        model.to(opts.device)
    try:
        got = arch.timed(model, FAMILY, inputs, opts, "row")
        plan = None if swap is None else swap.plan
        return {
            "samples_ms": list(got.timing.samples_ms),
            "output": got.output,
            "plan": None if plan is None else plan.kind,
            "provider": None if swap is None else type(swap.scheduler.provider).__name__,
            "units": 0 if swap is None else len(swap.units),
            "swapped_gib": 0.0 if plan is None else round(plan.swapped_bytes / GIB, 3),
            "window_gib": 0.0 if plan is None else round(plan.window_bytes / GIB, 3),
            "chunked_calls": 0 if swap is None else swap.chunked_calls(),
            "peak_gib": round(got.peak_gib, 3),
        }
    finally:
        if swap is not None:
            swap.remove()
        model.to("cpu")
        arch._free(opts.device)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--output", default=None)
    parser.add_argument("--rounds", type=int, default=None, help="default 3 (GPU), 1 (--cpu)")
    parser.add_argument("--iters", type=int, default=None, help="timed forwards per arm and round")
    parser.add_argument("--cpu", action="store_true", help="smoke run: small dims, few tokens")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    args = parser.parse_args(argv)
    if not args.comfyui:
        sys.exit("name the core tree: --comfyui PATH or COMFYUI_PATH")
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu for the smoke run")
    started = time.perf_counter()
    mode = "cpu" if args.cpu else "gpu"
    comfy = arch.import_core(args.comfyui, args.cpu)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", 0)
    patcher, _ = arch.load(comfy, FAMILY, args.cpu, device, torch.bfloat16)
    model = patcher.model.diffusion_model.to("cpu")
    layout = model_configs.match(model).layout
    arch._free(device)
    g = torch.Generator("cpu").manual_seed(1)
    inputs, tokens = FAMILY.inputs(model, SHAPE[mode], TEXT[mode], g)
    iters = args.iters or (1 if args.cpu else 4)
    opts = arch.Options(
        cpu=args.cpu,
        device=device,
        dtype=torch.bfloat16,
        warmup={"row": 1 if args.cpu else 2},
        runs={"row": iters},
    )
    chunks = CHUNK_TOKENS[mode]
    rounds = args.rounds or (1 if args.cpu else 3)
    arms = ["gpu"] + [a for a in args.arms if a != "gpu"]  # the reference runs always
    found: dict[str, list[dict]] = {name: [] for name in arms}
    for index in range(rounds):
        order = arms if index % 2 == 0 else list(reversed(arms))
        for name in order:
            found[name].append(run_arm(model, layout, name, inputs, opts, chunks))
            print(f"round {index} {name}: {found[name][-1]['samples_ms']}", flush=True)
    reference = found["gpu"][-1]["output"]
    gpu_ms = statistics.median(ms for run in found["gpu"] for ms in run["samples_ms"])
    rows = []
    for name, runs in found.items():
        median = statistics.median(ms for run in runs for ms in run["samples_ms"])
        last = runs[-1]
        rows.append(
            {
                "arm": name,
                "ms": round(median, 2),
                "ratio_to_gpu": round(median / gpu_ms, 4),
                "rounds_ms": [round(statistics.median(r["samples_ms"]), 2) for r in runs],
                "plan": last["plan"],
                "provider": last["provider"],
                "units": last["units"],
                "swapped_gib": last["swapped_gib"],
                "window_gib": last["window_gib"],
                "chunked_calls": last["chunked_calls"],
                "peak_gib": last["peak_gib"],
                "equal_output": arch._equal(last["output"], reference),
                "max_abs_diff": arch._max_abs_diff(last["output"], reference),
            }
        )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    short = "cpu" if args.cpu else name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"streamed_overhead_{short}.json"
    )
    results = {
        "device": name,
        "mode": mode,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"core's Wan ({type(patcher.model).__name__}), 8 blocks, bf16, random",
        "tokens": tokens,
        "chunk_tokens": chunks,
        "rounds": rounds,
        "timed_forwards_per_round": iters,
        "rows": rows,
        "seconds": round(time.perf_counter() - started, 1),
    }
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    for row in rows:
        print(
            f"{row['arm']:>30} {row['ms']:>9.2f} ms  x{row['ratio_to_gpu']:.4f}  "
            f"{row['plan']} swapped {row['swapped_gib']} GiB window {row['window_gib']} GiB  "
            f"equal {row['equal_output']}",
            flush=True,
        )
    print(f"wrote {output} in {results['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
