"""Where a compressed forward's time goes (engine, Wan-14B-shaped model, all blocks swapped):
GPU ms and host ms per forward, raw vs compressed, and the profiler's top operators.

    python benchmarks/compression_engine_probe.py --output ...json

It compares raw transfers with compressed ones at two staging-buffer counts and two decode-stream
priorities (module settings it overrides per run); results in
``benchmarks/results/compression_engine_probe_h100.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

import wan_shapes  # noqa: E402

from comfyui_wan_blockswap.wan_blockswap import (
    apply_block_swap,
    compressed_transfer,
    streams,
)  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.measure import time_forwards  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=1560)
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    device = torch.device("cuda")
    state = wan_shapes.random_state_dict(args.blocks)
    x = wan_shapes.inputs(args.tokens, device)
    result = {"device": torch.cuda.get_device_name(device), "rows": []}
    variants = [(False, 2, -1), (True, 2, 0), (True, 2, -1), (True, 3, -1)]
    for compress, buffers, priority in variants:
        compressed_transfer.STAGING_BUFFERS = buffers
        streams.DECODE_STREAM_PRIORITY = priority
        streams._decode_streams.clear()
        model = wan_shapes.model_from(state, args.blocks)
        started = time.perf_counter()
        swap = apply_block_swap(
            model, device=device, blocks_to_swap=args.blocks, transfer_compression=compress
        )
        apply_s = time.perf_counter() - started

        def forward():
            with torch.inference_mode():
                model(**x)

        timing = time_forwards(forward, device, warmup=2, iters=5)
        torch.cuda.synchronize()
        started = time.perf_counter()
        forward()
        host_ms = (time.perf_counter() - started) * 1e3
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            forward()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
        cuda_table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12)
        row = {
            "compress": compress,
            "staging_buffers": buffers,
            "decode_priority": priority,
            "apply_s": apply_s,
            "gpu_ms": timing.mean_ms,
            "host_ms": host_ms,
            "copied_gib": sum(u.copy_nbytes for u in swap.units) / 2**30,
            "pieces": sum(len(u.transfer.pieces) for u in swap.units if u.transfer),
        }
        print(row, flush=True)
        row["cpu_table"], row["cuda_table"] = table, cuda_table
        result["rows"].append(row)
        swap.remove()
        del model
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
