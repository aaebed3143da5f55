"""Engine benchmark: our block swap against all-on-GPU, diffusers group offloading and a naive
swap, side by side in one run, on the Wan-14B-shaped 8-block model.

    python benchmarks/engine_benchmark.py            # writes benchmarks/results/engine_<gpu>.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

import wan_shapes  # noqa: E402

from comfyui_wan_blockswap.wan_blockswap import apply_block_swap, min_vram_budget_gb  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.measure import (  # noqa: E402
    h2d_bandwidth_gbps,
    peak_gib,
    reset_peak,
    time_forwards,
)


def run_method(name, build, tokens, device, reference, iters, extra):
    """Build a method's model, time it, check its output, tear it down."""
    gc.collect()
    torch.cuda.empty_cache()
    reset_peak(device)
    model, teardown = build()
    x = wan_shapes.inputs(tokens, device)
    outputs = []

    def forward():
        with torch.inference_mode():
            outputs.append(model(**x)[0])
            del outputs[:-1]

    warmup = 1 if iters <= 3 else 2
    timing = time_forwards(forward, device, warmup=warmup, iters=iters)
    equal = bool(torch.equal(outputs[-1], reference)) if reference is not None else None
    row = {
        "method": name,
        "tokens": tokens,
        "ms": round(timing.median_ms, 2),
        "mean_ms": round(timing.mean_ms, 2),
        "min_ms": round(timing.min_ms, 2),
        "peak_vram_gib": round(peak_gib(device), 3),
        "equal_output": equal,
        **extra,
    }
    out = outputs[-1]
    del outputs, x
    teardown(model)
    print(json.dumps(row), flush=True)
    return row, out


STREAMED_WINDOW_GIB = 192 / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1560, 32760])
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--skip", nargs="*", default=[], help="methods to skip")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()

    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    t0 = time.time()
    state = wan_shapes.random_state_dict(args.blocks)
    block_bytes = sum(
        v.numel() * v.element_size() for k, v in state.items() if k.startswith("blocks.0.")
    )
    swapped_bytes = block_bytes * args.blocks
    pinned = h2d_bandwidth_gbps(block_bytes, device, pinned=True)
    pageable = h2d_bandwidth_gbps(block_bytes, device, pinned=False)
    print(
        f"{name}: block {block_bytes / 1e6:.1f} MB, pinned {pinned:.1f} GB/s, "
        f"pageable {pageable:.1f} GB/s, setup {time.time() - t0:.1f}s",
        flush=True,
    )
    results = {
        "device": name,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": f"diffusers WanTransformer3DModel, Wan-14B-shaped, {args.blocks} blocks, bf16",
        "block_mb": round(block_bytes / 1e6, 1),
        "h2d_gbps": round(pinned, 2),
        "h2d_pageable_gbps": round(pageable, 2),
        "floor_ms": {},
        "all_on_gpu_ms": {},
        "rows": [],
    }

    def cpu_model():
        return wan_shapes.model_from(state, args.blocks)

    def drop(model):
        del model

    for tokens in args.tokens:
        floor = swapped_bytes / (pinned * 1e9) * 1e3
        results["floor_ms"][str(tokens)] = round(floor, 2)
        iters = args.iters if tokens <= 1560 else max(4, args.iters // 2)

        def gpu_build():
            return cpu_model().to(device), drop

        row, reference = run_method(
            "all_on_gpu",
            gpu_build,
            tokens,
            device,
            None,
            iters,
            {"resident_fraction": 1.0, "prefetch": None},
        )
        row["equal_output"] = True
        results["rows"].append(row)
        results["all_on_gpu_ms"][str(tokens)] = row["ms"]
        planned = [0]

        def ours(name, fraction, prefetch, **options):
            """Time our swap with ``options`` on a fresh CPU model; its row gets ratios to
            the transfer floor of the swapped share and to all-on-GPU."""

            def build():
                model = cpu_model()
                handle = apply_block_swap(model, device=device, prefetch_blocks=prefetch, **options)
                planned[0] = handle.plan.gpu_weight_bytes
                return model, lambda m: handle.remove()

            extra = {"resident_fraction": fraction, "prefetch": prefetch}
            row, _ = run_method(name, build, tokens, device, reference, iters, extra)
            row["x_floor"] = round(row["ms"] / (floor * (1 - fraction)), 3)
            row["x_all_on_gpu"] = round(row["ms"] / results["all_on_gpu_ms"][str(tokens)], 3)
            row["planned_weights_gib"] = round(planned[0] / 2**30, 3)
            results["rows"].append(row)

        for fraction in (0.0, 0.25, 0.5, 0.75):
            for prefetch in (1, 2):
                swap_count = args.blocks - round(fraction * args.blocks)
                ours("wan_blockswap", fraction, prefetch, blocks_to_swap=swap_count)
        ours("wan_blockswap_layers", 0.0, 2, swap_unit="layer")

        # Lossless transfer compression sends 1.5 bytes per bf16 weight: below the raw floor
        # where copies dominate, a little slower where compute does.
        for fraction in (0.0, 0.5) if "compressed" not in args.skip else ():
            swap_count = args.blocks - round(fraction * args.blocks)
            ours(
                "wan_blockswap_compressed",
                fraction,
                1,
                blocks_to_swap=swap_count,
                transfer_compression=True,
            )

        # Streamed layer by layer (a budget below every slot plan), outside the blocks too,
        # with a 192 MiB window: about the peak of diffusers' leaf-level offloading.
        streamed_budget = min_vram_budget_gb(cpu_model()) + STREAMED_WINDOW_GIB
        for compression in (False, True) if "streamed" not in args.skip else ():
            ours(
                "wan_blockswap_streamed" + ("_compressed" if compression else ""),
                0.0,
                1,
                vram_budget_gb=streamed_budget,
                transfer_compression=compression,
            )

        for offload_type in ("leaf_level", "block_level"):
            if offload_type in args.skip:
                continue

            def diffusers_build(offload_type=offload_type):
                from diffusers.hooks import apply_group_offloading

                model = cpu_model()
                apply_group_offloading(
                    model,
                    onload_device=device,
                    offload_device=torch.device("cpu"),
                    offload_type=offload_type,
                    num_blocks_per_group=1 if offload_type == "block_level" else None,
                    use_stream=True,
                    non_blocking=True,
                )
                return model, drop

            row, _ = run_method(
                f"diffusers_group_offload_{offload_type}",
                diffusers_build,
                tokens,
                device,
                reference,
                iters if offload_type == "leaf_level" else max(3, iters // 2),
                {"resident_fraction": 0.0, "prefetch": None},
            )
            results["rows"].append(row)

        if "naive" not in args.skip:

            def naive_build():
                model = cpu_model()
                blocks = model.blocks
                model.blocks = torch.nn.ModuleList()
                model.to(device)
                model.blocks = blocks

                def move_in(module, args):
                    module.to(device)

                def move_out(module, args, output):
                    module.to("cpu")

                for block in blocks:
                    block.register_forward_pre_hook(move_in)
                    block.register_forward_hook(move_out)
                return model, drop

            row, _ = run_method(
                "naive_swap",
                naive_build,
                tokens,
                device,
                reference,
                2,
                {"resident_fraction": 0.0, "prefetch": None},
            )
            results["rows"].append(row)

    results["model_gib"] = round(
        sum(v.numel() * v.element_size() for v in state.values()) / 2**30, 3
    )
    results["peak_vram_check"] = peak_vram_check(results)
    short = name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"engine_{short}.json"
    )
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"wrote {output} in {time.time() - t0:.0f}s")


def peak_vram_check(results: dict) -> dict:
    """Each of our rows' peak against its plan: planned weights plus the activations (the
    all-on-GPU peak minus every weight) of the same token count."""
    rows = []
    for tokens, full in {
        r["tokens"]: r for r in results["rows"] if r["method"] == "all_on_gpu"
    }.items():
        activations = full["peak_vram_gib"] - results["model_gib"]
        for row in results["rows"]:
            if row["tokens"] != tokens or "planned_weights_gib" not in row:
                continue
            expected = row["planned_weights_gib"] + activations
            rows.append(
                {
                    "tokens": tokens,
                    "method": row["method"],
                    "resident_fraction": row["resident_fraction"],
                    "prefetch": row["prefetch"],
                    "expected_peak_gib": round(expected, 3),
                    "measured_peak_gib": row["peak_vram_gib"],
                    "ratio": round(row["peak_vram_gib"] / expected, 4),
                }
            )
    return {"derived": "planned weights + (all-on-GPU peak - model weights)", "rows": rows}


if __name__ == "__main__":
    main()
