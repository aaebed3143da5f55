"""Load benchmark: lazy loading of a Wan-14B-shaped checkpoint (bf16, fp8, GGUF Q8_0 and Q4_K)
against a naive load (whole file into RAM, then to the GPU) and accelerate's
``load_checkpoint_and_dispatch``. Every load runs in a fresh process so peak RSS is its own.

    python benchmarks/load_benchmark.py [--blocks 8] [--dir /tmp/wbs_load]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from comfyui_wan_blockswap.wan_blockswap.measure import rss_bytes  # noqa: E402

GIB = 2**30
FORMATS = {
    "bf16": "wan_bf16.safetensors",
    "fp8": "wan_fp8.safetensors",
    "q8_0": "wan_q8_0.gguf",
    "q4_k": "wan_q4_k.gguf",
    "bf16_diffusers": "wan_bf16_diffusers.safetensors",
    "fp8_diffusers": "wan_fp8_diffusers.safetensors",
}


def drop_page_cache(path: str) -> bool:
    """Evict ``path`` (only) from the page cache. Dropping every cache would also evict the
    Python libraries and count re-reading them (0.2 s here) as load time; "cold" means the
    checkpoint is not cached."""
    try:
        os.sync()  # dirty pages cannot be dropped
        with open(path, "rb") as handle:
            os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except (OSError, AttributeError):
        return False


def read_bandwidth(path: str) -> float:
    """Sequential read rate of ``path`` in GB/s (1e9), into one reused buffer."""
    buffer = bytearray(64 * 2**20)
    view = memoryview(buffer)
    start = time.perf_counter()
    total = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            n = handle.readinto(view)
            if not n:
                break
            total += n
    return total / (time.perf_counter() - start) / 1e9


def read_bandwidth_parallel(path: str, threads: int = 8) -> float:
    """Read rate of ``path`` in GB/s with ``threads`` threads, each reading one contiguous
    part through its own descriptor (how the loader reads): shows whether the disk rewards
    parallel reads beyond what one sequential reader gets."""
    from concurrent.futures import ThreadPoolExecutor

    size = os.path.getsize(path)
    part = -(-size // threads)

    def read_part(index: int) -> int:
        buffer = bytearray(64 * 2**20)
        view = memoryview(buffer)
        done, offset, end = 0, index * part, min(size, (index + 1) * part)
        with open(path, "rb", buffering=0) as handle:
            while offset < end:
                n = os.preadv(handle.fileno(), [view[: min(len(view), end - offset)]], offset)
                if not n:
                    break
                offset += n
                done += n
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(read_part, range(threads)))
    return total / (time.perf_counter() - start) / 1e9


def cold_median(args: argparse.Namespace, fmt: str, path: str) -> dict | None:
    """Our cold load, ``args.cold_repeats`` times, each paired with a cold single-thread read
    of the file just before it; the row of the median load/read ratio, with every pair."""
    pairs = []
    for _ in range(args.cold_repeats):
        if not drop_page_cache(path):
            return None
        gbps = read_bandwidth(path)
        row = run_child(args, fmt, "wan_blockswap", "cold", forward=False)
        if row is None:
            return None
        row["read_gbps"] = gbps
        row["x_read_time"] = row["load_s"] / (row["file_gib"] * GIB / 1e9 / gbps)
        pairs.append(row)
    pairs.sort(key=lambda r: r["x_read_time"])
    row = dict(pairs[len(pairs) // 2])
    row["cold_repeats"] = [
        {key: r[key] for key in ("load_s", "read_gbps", "x_read_time")} for r in pairs
    ]
    return row


def summarize(results: dict) -> dict:
    """The issue's bars, checked on this run's rows (read time from this run's bandwidth)."""
    bars: dict[str, list[str] | str] = {"peak_vram": [], "peak_rss": [], "load_time": []}
    forward = {}
    for row in results["rows"]:
        if row.get("read_gbps"):
            row["read_time_s"] = row["file_gib"] * GIB / 1e9 / row["read_gbps"]
            row["x_read_time"] = row["load_s"] / row["read_time_s"]
        if row["method"] != "wan_blockswap":
            continue
        tag = f"{row['format']} {row['cache']}"
        vram_bar = (row["resident_gib"] + row["block_gib"]) * 1.05
        rss_bar = (row["swapped_gib"] + row["block_gib"]) * 1.05
        bars["peak_vram"].append(
            f"{tag} {row['peak_vram_gib']:.3f} <= {vram_bar:.3f}: "
            + ("met" if row["peak_vram_gib"] <= vram_bar else "MISSED")
        )
        bars["peak_rss"].append(
            f"{tag} {row['peak_rss_gib']:.3f} <= {rss_bar:.3f}: "
            + ("met" if row["peak_rss_gib"] <= rss_bar else "MISSED")
        )
        if row.get("read_gbps"):
            read_s = row["read_time_s"]
            bars["load_time"].append(
                f"{tag} {row['load_s']:.3f} s = {row['x_read_time']:.3f} x {read_s:.3f} s: "
                + ("met" if row["x_read_time"] <= 1.2 else "MISSED")
            )
        if "forward_ms" in row:
            forward[row["format"]] = row["forward_ms"]
    for fmt, limit in (("q8_0", 0.6), ("fp8", 0.55)):
        if fmt in forward and "bf16" in forward:
            ratio = forward[fmt] / forward["bf16"]
            bars[f"{fmt}_forward"] = (
                f"{forward[fmt]:.1f} / {forward['bf16']:.1f} = {ratio:.3f} <= {limit}: "
                + ("met" if ratio <= limit else "MISSED")
            )
    return bars


def write_files(folder: str, blocks: int, formats: tuple[str, ...]) -> dict:
    from writers import random_state, to_fp8, write_gguf, write_safetensors
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    os.makedirs(folder, exist_ok=True)
    shapes = comfy_state_shapes(5120, 13824, blocks)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    state = {k: v.cpu() for k, v in random_state(shapes, device=device).items()}
    sizes = {}
    start = time.perf_counter()
    for name, values in (("bf16", state), ("fp8", to_fp8(state))):
        if name in formats:  # ComfyUI layout for us, diffusers names for accelerate
            sizes[name] = write_safetensors(values, os.path.join(folder, FORMATS[name]))
            sizes[name + "_diffusers"] = write_safetensors(
                convert_wan_transformer_to_diffusers(dict(values)),
                os.path.join(folder, FORMATS[name + "_diffusers"]),
                prefix="",
            )
    for name, qtype in (("q8_0", "Q8_0"), ("q4_k", "Q4_K")):
        if name in formats:
            sizes[name] = write_gguf(
                state, os.path.join(folder, FORMATS[name]), qtype, quantize=False
            )
    print(
        f"wrote checkpoints in {time.perf_counter() - start:.0f}s: "
        + ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in sizes.items()),
        flush=True,
    )
    return sizes


# -- children: one load each ----------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    import wan_shapes
    from diffusers import WanTransformer3DModel

    from comfyui_wan_blockswap.callbacks.lazy_loader import load_swapped
    from comfyui_wan_blockswap.wan_blockswap.measure import time_forwards

    device = torch.device("cuda")
    torch.empty(1, device=device)  # CUDA context before the baseline
    baseline = rss_bytes()
    torch.cuda.reset_peak_memory_stats(device)
    row = {"format": args.format, "method": args.method, "cache": args.cache}
    start = time.perf_counter()
    if args.method == "wan_blockswap":
        model, swap, report = load_swapped(args.path, device=device, prefetch_blocks=1)
        torch.cuda.synchronize()
        row["load_s"] = time.perf_counter() - start
        row.update(
            resident_gib=report.resident_bytes / GIB,
            block_gib=report.block_bytes / GIB,
            swapped_gib=report.swapped_bytes / GIB,
            phases_s=report.phases,
        )
    elif args.method == "naive":
        state = _read_all(args.path)
        state = {k: v.to(device) for k, v in state.items()}
        torch.cuda.synchronize()
        row["load_s"] = time.perf_counter() - start
        row["resident_gib"] = sum(v.numel() * v.element_size() for v in state.values()) / GIB
        model = None
    else:  # accelerate: blocks dispatched to the CPU, the rest to the GPU, like our plan
        from accelerate import init_empty_weights, load_checkpoint_and_dispatch

        with init_empty_weights():
            model = WanTransformer3DModel(**{**wan_shapes.WAN14B_CONFIG, "num_layers": args.blocks})
        device_map = {name: 0 for name, _ in model.named_children() if name != "blocks"}
        device_map.update({name: 0 for name, _ in model.named_parameters(recurse=False)})
        device_map.update({f"blocks.{i}": "cpu" for i in range(args.blocks)})
        model = load_checkpoint_and_dispatch(
            model, args.path, device_map=device_map, dtype=torch.bfloat16
        )
        torch.cuda.synchronize()
        row["load_s"] = time.perf_counter() - start
        row["resident_gib"] = torch.cuda.memory_allocated(device) / GIB
    row["peak_vram_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    row["peak_rss_gib"] = (rss_bytes("VmHWM") - baseline) / GIB
    row["baseline_rss_gib"] = baseline / GIB
    if args.forward and args.method == "wan_blockswap":
        x = wan_shapes.inputs(1560, device)

        def forward():
            with torch.inference_mode():
                model(**x)

        row["forward_ms"] = time_forwards(forward, device, warmup=2, iters=8).median_ms
    print("ROW " + json.dumps(row), flush=True)


def _read_all(path: str) -> dict:
    if path.endswith(".gguf"):
        from comfyui_wan_blockswap.callbacks.checkpoint import open_checkpoint

        with open_checkpoint(path) as checkpoint:
            return {name: checkpoint.read(name) for name in checkpoint.records}
    from safetensors.torch import load_file

    return load_file(path)


# -- parent -----------------------------------------------------------------------------------


def run_child(args, fmt: str, method: str, cache: str, forward: bool) -> dict | None:
    path = os.path.join(args.dir, FORMATS[fmt])
    if cache == "cold" and not drop_page_cache(path):
        return None
    command = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        "--format",
        fmt,
        "--method",
        method,
        "--path",
        path,
        "--cache",
        cache,
        "--blocks",
        str(args.blocks),
    ]
    if forward:
        command.append("--forward")
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    rows = [line[4:] for line in result.stdout.splitlines() if line.startswith("ROW ")]
    if result.returncode or not rows:
        print(f"{fmt}/{method}/{cache} failed:\n{result.stderr[-3000:]}", flush=True)
        return None
    row = json.loads(rows[-1])
    row["file_gib"] = os.path.getsize(path) / GIB
    print(
        json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", default="/tmp/wbs_load")
    parser.add_argument("--blocks", type=int, default=8)
    parser.add_argument("--output", default=None)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--format")
    parser.add_argument("--method")
    parser.add_argument("--path")
    parser.add_argument("--cache", default="warm")
    parser.add_argument("--forward", action="store_true")
    parser.add_argument("--formats", nargs="+", default=["bf16", "fp8", "q8_0", "q4_k"])
    parser.add_argument(
        "--cold-repeats",
        type=int,
        default=3,
        help="cold loads of ours, each right after a cold read of the file; the median pair "
        "is the row (this disk's cold rate drifts by 20%% between reads seconds apart)",
    )
    parser.add_argument("--methods", nargs="+", default=["wan_blockswap", "naive", "accelerate"])
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    start = time.time()
    write_files(args.dir, args.blocks, tuple(args.formats))
    results = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "model": f"Wan-14B-shaped, {args.blocks} blocks, ComfyUI key layout",
        "read_gbps": {},
        "rows": [],
    }
    name = results["device"].lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(ROOT, "benchmarks", "results", f"load_{name}.json")

    def save(results: dict) -> None:  # after every format: a cut-off run keeps what it has
        with open(output, "w") as handle:
            json.dump(results, handle, indent=2)

    plan = [(fmt, method) for fmt in args.formats for method in ("wan_blockswap", "naive")]
    plan += [(f + "_diffusers", "accelerate") for f in args.formats if f in ("bf16", "fp8")]
    for fmt, method in plan:
        if method not in args.methods:
            continue
        save(results)
        path = os.path.join(args.dir, FORMATS[fmt])
        if fmt not in results["read_gbps"]:
            cold = drop_page_cache(path)
            results["read_gbps"][fmt] = {
                "cold" if cold else "first": read_bandwidth(path),
                "warm": read_bandwidth(path),
            }
            if drop_page_cache(path):
                results["read_gbps"][fmt]["cold_8_threads"] = read_bandwidth_parallel(path)
        for cache in ("cold", "warm"):
            forward = method == "wan_blockswap" and fmt != "q4_k" and cache == "warm"
            if cache == "cold" and method == "wan_blockswap" and args.cold_repeats > 1:
                row = cold_median(args, fmt, path)
            else:
                row = run_child(args, fmt, method, cache, forward=forward)
                if row:
                    row["read_gbps"] = results["read_gbps"][fmt].get(cache)
            if row:
                results["rows"].append(row)
    results["bars"] = summarize(results)
    save(results)
    print(json.dumps(results["bars"], indent=1), flush=True)
    print(f"wrote {output} in {time.time() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
