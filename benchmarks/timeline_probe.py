"""Where a streamed forward's time goes: profiles core's lowvram streaming and our node at one
weight budget (the comfyui benchmark's model and matching rule) and writes, per method, the
forward time, how long the copy engine was busy, and the largest gaps between copies with
the kernels that ran in them.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/timeline_probe.py [--fraction 0.25]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfyui_benchmark as bench  # noqa: E402

from comfyui_wan_blockswap.wan_blockswap.measure import time_forwards  # noqa: E402


def copy_timeline(prof: profile, forwards: int) -> dict:
    """Copy-engine busy time and the gaps between host-to-device copies."""
    events = [e for e in prof.events() if e.device_type.name == "CUDA"]
    copies = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if "Memcpy HtoD" in e.name or "memcpy" in e.name.lower() and "HtoD" in e.name
    )
    kernels = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in events if "Memcpy" not in e.name
    )
    if not copies:
        return {"copies": 0}
    busy = sum(end - start for start, end in copies)
    span = copies[-1][1] - copies[0][0]
    gaps = []
    for (s0, e0), (s1, e1) in zip(copies, copies[1:]):
        if s1 - e0 > 5:  # microseconds
            inside = [k[2][:60] for k in kernels if k[0] < s1 and k[1] > e0][:6]
            gaps.append({"gap_us": s1 - e0, "at_us": e0 - copies[0][0], "kernels": inside})
    gaps.sort(key=lambda g: -g["gap_us"])
    sizes = [end - start for start, end in copies]
    return {
        "copies": len(copies),
        "copies_per_forward": len(copies) / forwards,
        "busy_ms_per_forward": busy / 1e3 / forwards,
        "span_ms_per_forward": span / 1e3 / forwards,
        "gap_ms_per_forward": sum(g["gap_us"] for g in gaps) / 1e3 / forwards,
        "median_copy_us": sorted(sizes)[len(sizes) // 2],
        "largest_gaps": gaps[:25],
    }


def profiled(forward, device, forwards: int) -> tuple[dict, profile]:
    for _ in range(3):
        forward()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        timing = time_forwards(forward, device, warmup=0, iters=forwards)
    summary = copy_timeline(prof, forwards)
    summary["ms_per_forward"] = timing.mean_ms
    return summary, prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--tokens", type=int, default=1560)
    parser.add_argument("--forwards", type=int, default=4)
    parser.add_argument("--output", required=True)
    parser.add_argument("--trace-dir")
    parser.add_argument("--compression", choices=["off", "on"], default="off")
    args = parser.parse_args()
    comfy = bench.import_comfy()
    from conftest import load_pack

    pack = load_pack()
    device = comfy.model_management.get_torch_device()
    patcher = bench.build_patcher(comfy, 8, bench.DIM, bench.FFN)
    inputs = bench.make_inputs(args.tokens, device)
    full = bench.core_row(comfy, patcher, inputs, args.tokens, 1.0, 3, device)
    activations = full["peak_vram_gib"] - full["weights_on_gpu_gib"]
    result = {
        "device": torch.cuda.get_device_name(device),
        "fraction": args.fraction,
        "tokens": args.tokens,
        "transfer_compression": args.compression,
    }

    # core at the budget
    bench.pin_host_weights(patcher.model.diffusion_model)
    budget = max(1, int(args.fraction * patcher.model_size()))
    bench.reset_peak(device)
    with torch.inference_mode():
        patcher.patch_model(device, lowvram_model_memory=budget, load_weights=True)
    core, prof = profiled(lambda: bench.forward(patcher, inputs), device, args.forwards)
    core["peak_vram_gib"] = bench.peak_gib(device)
    if args.trace_dir:
        prof.export_chrome_trace(os.path.join(args.trace_dir, "core.json"))
    patcher.unpatch_model(patcher.offload_device, unpatch_weights=True)
    torch.cuda.empty_cache()
    result["core"] = core

    # ours at core's peak
    from comfyui_wan_blockswap.callbacks.comfy_adapter import remove_from_model
    from test_comfy_node import WIDGETS
    from comfyui_wan_blockswap.wan_blockswap import get_block_swap, min_vram_budget_gb

    widgets = dict(WIDGETS)
    floor = min_vram_budget_gb(patcher.model.diffusion_model)
    widgets.update(
        vram_budget_gb=max(core["peak_vram_gib"] - activations, floor),
        transfer_compression=args.compression,
    )
    swapped = pack.nodes.WanBlockSwapStream().apply(patcher, **widgets)[0]
    bench.reset_peak(device)
    comfy.model_management.load_models_gpu([swapped])
    plan = get_block_swap(patcher.model.diffusion_model).plan
    ours, prof = profiled(lambda: bench.forward(swapped, inputs), device, args.forwards)
    ours["peak_vram_gib"] = bench.peak_gib(device)
    ours["plan"] = plan.describe()
    ours["streamed_gib"] = plan.swapped_bytes / 2**30
    if args.trace_dir:
        prof.export_chrome_trace(os.path.join(args.trace_dir, "ours.json"))
    swapped.cleanup()
    comfy.model_management.unload_all_models()
    remove_from_model(patcher)
    gc.collect()
    result["ours"] = ours
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    for name in ("core", "ours"):
        r = result[name]
        print(
            name,
            {k: r[k] for k in r if k not in ("largest_gaps", "plan")},
            r.get("largest_gaps", [])[:5],
        )


if __name__ == "__main__":
    with torch.inference_mode():
        main()
