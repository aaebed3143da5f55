"""How much VRAM each block-swap setting saves on your machine, what it costs in speed, and
which setting to use on each GPU size.

    python test_performance.py                      # built-in small Wan model, a minute on CPU
    python test_performance.py --model-path wan2.1_t2v_14B_bf16.safetensors --frames 81
    python test_performance.py --model-path wan.gguf --test-all --height 480 --width 832

With ``--model-path`` it first prints advice per GPU size (8, 12, 16 and 24 GB) from the file's
real block sizes and the activation memory of the chosen frame size: the planner needs no GPU,
so this works on any machine (the figures are estimates and say so). Then, on a GPU (or with
``--device cpu``), each configuration loads the checkpoint lazily with its plan (swapped blocks
go from disk to pinned host memory), runs forwards, and records load time, peak VRAM, VRAM
saved, host RAM growth, ms per forward, slowdown, the transfer floor and the share of copy time
hidden behind compute; a legend under the table explains each column. Writes a JSON report and
a PNG chart. Ctrl-C stops the sweep and keeps what was measured.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import tempfile
import time

import torch

PACKAGE = "comfyui_wan_blockswap"


def _import_checkout() -> None:
    """This checkout as the package, where pip did not install it (a clone in ComfyUI's
    custom_nodes, say): imported by its path, never through ``sys.path``."""
    here = os.path.dirname(os.path.abspath(__file__))
    spec = importlib.util.spec_from_file_location(
        PACKAGE, os.path.join(here, "__init__.py"), submodule_search_locations=[here]
    )
    sys.modules[PACKAGE] = module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


try:
    import comfyui_wan_blockswap  # noqa: F401  (pip install -e . maps it to this checkout)
except ModuleNotFoundError as error:
    if error.name != PACKAGE:
        raise
    _import_checkout()

from safetensors.torch import save_file  # noqa: E402

from comfyui_wan_blockswap import perf_report  # noqa: E402
from comfyui_wan_blockswap.callbacks.checkpoint import (  # noqa: E402
    CheckpointError,
    open_checkpoint,
)
from comfyui_wan_blockswap.callbacks.lazy_loader import (  # noqa: E402
    load_swapped,
    read_file_model,
)
from comfyui_wan_blockswap.callbacks.skeleton import file_arch  # noqa: E402
from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap import (  # noqa: E402
    BlockSwapConfigError,
    InsufficientMemoryError,
    SwapConfig,
)
from comfyui_wan_blockswap.wan_blockswap.api import resolve_device  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.measure import (  # noqa: E402
    h2d_bandwidth_gbps,
    rss_bytes,
    time_forwards,
)
from comfyui_wan_blockswap.wan_blockswap.plan import GIB, plan_swap  # noqa: E402

DEFAULT_MODEL = dict(dim=768, ffn_dim=2048, num_layers=8, text_dim=512, freq_dim=256)
GPU_SIZES_GB = (8, 12, 16, 24)
TEXT_TOKENS = 64
WAN_FAMILIES = ("wan", "wan_vace")
BUILT_IN_NAME = "built-in small Wan (random weights)"
BUILT_IN_NOTE = (
    "Measuring a small built-in Wan model (8 blocks, random weights, about 0.3 GiB): it shows "
    "what swapping costs on this machine, not what a real model needs. For advice for a real "
    "model, pass its file, e.g.\n"
    "  python test_performance.py --model-path wan2.1_t2v_14B_bf16.safetensors "
    "--frames 81 --height 480 --width 832"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", help=".safetensors / .gguf / diffusers folder (Wan family)")
    parser.add_argument("--blocks-to-swap", type=int, help="measure this setting (and no swap)")
    parser.add_argument("--vram-budget-gb", type=float, help="measure the plan for this budget")
    parser.add_argument("--prefetch", type=int, default=1, help="prefetch_blocks (default 1)")
    parser.add_argument(
        "--test-all",
        action="store_true",
        help="sweep blocks_to_swap from 0 to all, and prefetch 0-2",
    )
    parser.add_argument("--frames", type=int, help="video frames (pixels; Wan VAE: 4x time)")
    parser.add_argument("--height", type=int, help="height in pixels (8x latent)")
    parser.add_argument("--width", type=int, help="width in pixels (8x latent)")
    parser.add_argument("--tokens", type=int, help="sequence length instead of a frame size")
    parser.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="compute dtype (default bf16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--transfer-compression",
        choices=["off", "on", "auto"],
        default="off",
        help="send bf16 weights losslessly packed (see README); default off",
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument("--iters", type=int, default=5, help="timed forwards per setting")
    parser.add_argument("--output", default="block_swap_performance_results.json")
    return parser.parse_args(argv)


def latent_shape(args: argparse.Namespace, default: tuple[int, int, int]):
    """(latent frames, latent height, latent width) from the CLI's frame size or tokens."""
    if args.tokens is not None:
        if args.tokens <= 0:
            raise BlockSwapConfigError(f"--tokens must be positive, got {args.tokens}")
        if args.tokens % 1560 == 0:  # whole 480p latent frames, as the benchmarks use
            return args.tokens // 1560, 60, 104
        return 1, 2, 2 * args.tokens  # patch 2x2: exactly ``tokens`` tokens
    frames, height, width = (
        given if given is not None else fallback
        for given, fallback in zip((args.frames, args.height, args.width), default)
    )
    for name, value in (("--frames", frames), ("--height", height), ("--width", width)):
        if value <= 0:
            raise BlockSwapConfigError(f"{name} must be positive, got {value}")
    if height % 16 or width % 16:
        raise BlockSwapConfigError(
            f"--height and --width must be multiples of 16, got {height}x{width}"
        )
    return (frames - 1) // 4 + 1, height // 8, width // 8


def wan_inputs(model, latent, dtype, device, seed: int = 0) -> dict:
    config = model.config
    if not hasattr(config, "text_dim"):
        raise BlockSwapConfigError(
            f"the performance script builds inputs for Wan models; {type(model).__name__} is not one"
        )
    gen = torch.Generator().manual_seed(seed)
    frames, height, width = latent
    x = {
        "hidden_states": torch.randn(1, config.in_channels, frames, height, width, generator=gen),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, TEXT_TOKENS, config.text_dim, generator=gen),
        "return_dict": False,
    }
    if getattr(config, "image_dim", None):
        x["encoder_hidden_states_image"] = torch.randn(1, 257, config.image_dim, generator=gen)
    if hasattr(config, "vace_layers"):
        x["control_hidden_states"] = torch.randn(
            1, config.vace_in_channels, frames, height, width, generator=gen
        )
    return {
        k: (
            v.to(device, dtype)
            if torch.is_tensor(v) and v.is_floating_point()
            else v.to(device) if torch.is_tensor(v) else v
        )
        for k, v in x.items()
    }


def write_default_model(folder: str, dtype: torch.dtype) -> str:
    """The built-in small Wan model in ComfyUI's file layout: random weights scaled by their
    fan-in, so activations stay finite through its blocks."""
    path = os.path.join(folder, "wan_small_comfyui.safetensors")
    gen = torch.Generator().manual_seed(0)
    state = {}
    for key, shape in comfy_state_shapes(**DEFAULT_MODEL).items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        state["model.diffusion_model." + key] = (
            torch.randn(shape, generator=gen) / fan_in**0.5
        ).to(dtype)
    save_file(state, path)
    return path


def measure(path, options, latent, dtype, device, iters, baseline_ms, bandwidth, progress=False):
    """Load with ``options``, time forwards, tear down; one row of the report."""
    rss0 = rss_bytes()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    model, swap, report = load_swapped(
        path, device=device, compute_dtype=dtype, progress=progress, **options
    )
    load_s = time.perf_counter() - start
    row = {
        "options": options,
        "blocks_to_swap": sum(1 for n in swap.plan.swapped if n.startswith("blocks.")),
        "prefetch": options.get("prefetch_blocks", 1),
        "swap_unit": swap.plan.swap_unit,
        "load_s": load_s,
        "weights_on_device_gib": swap.plan.gpu_weight_bytes / GIB,
        "swapped_gib": swap.plan.swapped_bytes / GIB,
        "host_ram_increase_gib": (rss_bytes() - rss0) / GIB,
        "peak_vram_load_gib": None,
        "peak_vram_forward_gib": None,
    }
    if device.type == "cuda":
        row["peak_vram_load_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        torch.cuda.reset_peak_memory_stats(device)
    try:
        x = wan_inputs(model, latent, dtype, device)

        def forward():
            with torch.inference_mode():
                model(**x)

        row["ms"] = time_forwards(forward, device, warmup=2, iters=iters).median_ms
        if device.type == "cuda":
            row["peak_vram_forward_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    finally:
        swap.remove(restore=False)
        del model
    row["floor_ms"] = (swap.plan.swapped_bytes / (bandwidth * 1e9) * 1e3) if bandwidth else None
    if baseline_ms is not None:
        row["slowdown"] = row["ms"] / baseline_ms
        if row["floor_ms"]:
            exposed = max(0.0, row["ms"] - baseline_ms)
            row["copy_hidden_share"] = max(0.0, 1 - exposed / row["floor_ms"])
    return row


def settings(args, num_blocks: int) -> list[dict]:
    runs = _swap_settings(args, num_blocks)
    mode = {"off": False, "on": True}.get(args.transfer_compression, args.transfer_compression)
    for options in runs:
        if mode and options.get("blocks_to_swap") != 0:
            options["transfer_compression"] = mode
    return runs


def _swap_settings(args, num_blocks: int) -> list[dict]:
    if args.test_all:
        return [dict(blocks_to_swap=0)] + [
            dict(blocks_to_swap=n, prefetch_blocks=p)
            for n in range(1, num_blocks + 1)
            for p in (0, 1, 2)
        ]
    runs = [dict(blocks_to_swap=0)]
    if args.blocks_to_swap is not None:
        runs.append(dict(blocks_to_swap=args.blocks_to_swap, prefetch_blocks=args.prefetch))
    elif args.vram_budget_gb is not None:
        runs.append(dict(vram_budget_gb=args.vram_budget_gb, prefetch_blocks=args.prefetch))
    else:
        runs += [
            dict(blocks_to_swap=n, prefetch_blocks=args.prefetch)
            for n in (num_blocks // 2, num_blocks)
        ]
    return runs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        return run(args)
    except (BlockSwapConfigError, CheckpointError, InsufficientMemoryError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace) -> int:
    _check_output(args.output)
    device = resolve_device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    if args.prefetch < 0 or args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        raise BlockSwapConfigError("--prefetch and --blocks-to-swap must be >= 0")
    SwapConfig(prefetch_blocks=args.prefetch)  # validates the range up front
    if args.blocks_to_swap is not None and args.vram_budget_gb is not None:
        raise BlockSwapConfigError(
            "give --blocks-to-swap or --vram-budget-gb, not both (a budget picks the blocks)"
        )
    if args.iters < 1:
        raise BlockSwapConfigError(f"--iters must be at least 1, got {args.iters}")
    with tempfile.TemporaryDirectory() as folder:
        if args.model_path:
            if not os.path.exists(args.model_path):
                raise CheckpointError(f"--model-path {args.model_path} does not exist")
            path, model_name = args.model_path, os.path.basename(args.model_path)
            latent = latent_shape(args, (81, 480, 832))
        else:
            print(BUILT_IN_NOTE, file=sys.stderr)
            path, model_name = write_default_model(folder, dtype), BUILT_IN_NAME
            latent = latent_shape(args, (5, 128, 128))
        # the header alone, nothing allocated yet; advice is for a GPU, which computes in bf16
        # unless told otherwise
        _check_is_wan(path, model_name)
        file_model = read_file_model(path, file_model_dtype(args, device, dtype))
        num_blocks = sum(1 for b in file_model.sizes.blocks if b.role == "main")
        _check_against_model(args, num_blocks, file_model)
        bandwidth = None
        if device.type == "cuda":
            bandwidth = h2d_bandwidth_gbps(256 * 2**20, device)
        report = perf_report.new_report(
            device, dtype, model_name, file_model.arch.name, num_blocks, latent, bandwidth
        )
        if args.model_path:
            report["advice"] = perf_report.advice_section(
                file_model, latent, file_model_dtype(args, device, dtype), GPU_SIZES_GB
            )
        if args.model_path and device.type == "cpu" and args.device is None:
            report["measured"] = False
            print(
                "no CUDA device here, so nothing was timed (a real model's forwards take long "
                "on a CPU); pass --device cpu to time them anyway",
                file=sys.stderr,
            )
            perf_report.finish(report, args.output, GPU_SIZES_GB)
            return 0
        measure_all(args, report, path, latent, dtype, device, bandwidth)
    perf_report.finish(report, args.output, GPU_SIZES_GB)
    return 0


def measure_all(args, report, path, latent, dtype, device, bandwidth) -> None:
    """Every setting of the sweep, in order; Ctrl-C keeps what was measured."""
    runs = settings(args, report["num_blocks"])
    bar = perf_report.ProgressBar(len(runs))
    baseline_ms = None
    try:
        for options in runs:
            bar.step(str(options))
            row = measure(
                path,
                options,
                latent,
                dtype,
                device,
                args.iters,
                baseline_ms,
                bandwidth,
                progress=bool(args.model_path),  # real checkpoints take a while
            )
            if options == dict(blocks_to_swap=0):
                baseline_ms = row["ms"]
                row["slowdown"] = 1.0
                base_weights = row["weights_on_device_gib"]
            row["vram_saved_gib"] = base_weights - row["weights_on_device_gib"]
            report["results"].append(row)
    except KeyboardInterrupt:
        report["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    bar.close()


def file_model_dtype(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    """The dtype the advice plans weights in: a GPU's (bf16) unless one was asked for."""
    return dtype if device.type == "cuda" or args.dtype else torch.bfloat16


def _check_is_wan(path: str, name: str) -> None:
    """This script builds Wan inputs: any other model gets told so, by name, before anything
    is built."""
    with open_checkpoint(path) as checkpoint:
        arch = file_arch(checkpoint)
    family = arch.family if arch is not None else None
    if family not in WAN_FAMILIES:
        what = f"a {arch.family} model" if arch is not None else "no model this script knows"
        raise CheckpointError(
            f"{name} holds {what}; this script measures Wan 2.1/2.2 and VACE files (it builds "
            f"their inputs). Other models swap through the ComfyUI node or the library "
            f"(apply_block_swap)"
        )


def _check_output(output: str) -> None:
    """The report's folder must exist and be writable before anything is measured."""
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise BlockSwapConfigError(
            f"--output {output}: the folder {folder} does not exist; create it or choose another"
        )
    if not os.access(folder, os.W_OK):
        raise BlockSwapConfigError(f"--output {output}: the folder {folder} is not writable")


def _check_against_model(args: argparse.Namespace, num_blocks: int, file_model) -> None:
    """Options that depend on the model, checked from its header before the first forward."""
    if args.blocks_to_swap is not None and args.blocks_to_swap > num_blocks:
        raise BlockSwapConfigError(
            f"--blocks-to-swap must be in 0..{num_blocks} for this model "
            f"({num_blocks} blocks), got {args.blocks_to_swap}"
        )
    if args.vram_budget_gb is not None:  # the planner is pure: a budget below it fails now
        plan_swap(file_model.sizes, SwapConfig(vram_budget_gb=args.vram_budget_gb))


if __name__ == "__main__":
    sys.exit(main())
