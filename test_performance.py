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
import gc
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
from comfyui_wan_blockswap.perf_advice import activation_gib  # noqa: E402
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
from comfyui_wan_blockswap.wan_blockswap.config import MAX_PREFETCH_BLOCKS  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.donor_storage import donor_free_memory  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.memory import available_host_bytes  # noqa: E402
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
# diffusers' Wan rotary embedding covers this many positions per latent axis (rope_max_seq_len)
MAX_AXIS = 1024
MAX_ITERS = 1000  # a median of more forwards tells nothing new; far more never ends
DEFAULT_ITERS = 5
DEFAULT_PREFETCH = 1
BUILT_IN_NOTE = (
    "Measuring a small built-in Wan model (8 blocks, random weights, about 0.3 GiB): it shows "
    "what swapping costs on this machine, not what a real model needs. For advice for a real "
    "model, pass its file, e.g.\n"
    "  python test_performance.py --model-path wan2.1_t2v_14B_bf16.safetensors "
    "--frames 81 --height 480 --width 832"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:
        """One line, as the script's own errors (argparse's usage block hides it)."""
        self.exit(2, f"error: {message} (see --help)\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    # the docstring's first paragraph: its first line alone stops mid-sentence
    description = __doc__.split("\n\n")[0].replace("\n", " ")
    parser = _Parser(description=description)
    parser.add_argument("--model-path", help=".safetensors / .gguf / diffusers folder (Wan family)")
    parser.add_argument("--blocks-to-swap", type=int, help="measure this setting (and no swap)")
    parser.add_argument("--vram-budget-gb", type=float, help="measure the plan for this budget")
    # None where not given: an option that would be ignored is refused, which needs to know
    parser.add_argument("--prefetch", type=int, help="prefetch_blocks (default 1)")
    parser.add_argument(
        "--test-all",
        action="store_true",
        help="sweep blocks_to_swap from 0 to all, and prefetch 0-2",
    )
    parser.add_argument("--frames", type=int, help="video frames, 4k+1 (Wan VAE: 4x time)")
    parser.add_argument("--height", type=int, help="height in pixels, a multiple of 16")
    parser.add_argument("--width", type=int, help="width in pixels, a multiple of 16")
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
        help="send bf16 weights losslessly packed (see README; needs bf16); default off",
    )
    parser.add_argument(
        "--donor-device",
        help="where swapped blocks are stored: cpu (pinned host memory, the default) or "
        "cuda:N, another GPU (copies go peer to peer)",
    )
    parser.add_argument(
        "--donor-allocation",
        help="swapped blocks over several stores, e.g. 'cuda:1,8gb;cpu,*' (bytes, %% of the "
        "swapped bytes, or * for the rest)",
    )
    parser.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda if available)")
    parser.add_argument(
        "--iters", type=int, help=f"timed forwards per setting, 1..{MAX_ITERS} (default 5)"
    )
    parser.add_argument("--output", default="block_swap_performance_results.json")
    return parser.parse_args(argv)


def latent_shape(args: argparse.Namespace, default: tuple[int, int, int]):
    """(latent frames, latent height, latent width) from the CLI's frame size or tokens."""
    if args.tokens is not None:
        return token_grid(args.tokens)
    frames, height, width = (
        given if given is not None else fallback
        for given, fallback in zip((args.frames, args.height, args.width), default)
    )
    most = {"--frames": 4 * (MAX_AXIS - 1) + 1, "--height": 16 * MAX_AXIS, "--width": 16 * MAX_AXIS}
    for name, value in (("--frames", frames), ("--height", height), ("--width", width)):
        if value <= 0:
            raise BlockSwapConfigError(f"{name} must be positive, got {value}")
        if value > most[name]:
            raise BlockSwapConfigError(
                f"{name} must be at most {most[name]} (the Wan model's rotary embedding covers "
                f"{MAX_AXIS} latent positions per axis), got {value}"
            )
    if (frames - 1) % 4:  # never a silent rounding to the latent's frame count
        lower = frames - (frames - 1) % 4
        raise BlockSwapConfigError(
            f"--frames must be 4k+1 (1, 5, 9, ... 81: the Wan VAE packs 4 frames into each "
            f"latent frame after the first), got {frames}; use {lower} or {lower + 4}"
        )
    if height % 16 or width % 16:
        raise BlockSwapConfigError(
            f"--height and --width must be multiples of 16, got {height}x{width}"
        )
    return (frames - 1) // 4 + 1, height // 8, width // 8


def token_grid(tokens: int) -> tuple[int, int, int]:
    """A latent of exactly ``tokens`` tokens (2x2 patches), at most ``MAX_AXIS`` patches
    along each axis: whole 480p frames for multiples of 1560 (as the benchmarks use), else
    the widest row that divides it."""
    if tokens <= 0:
        raise BlockSwapConfigError(f"--tokens must be positive, got {tokens}")
    if tokens % 1560 == 0 and tokens // 1560 <= MAX_AXIS:
        return tokens // 1560, 60, 104
    if tokens <= MAX_AXIS**3:
        for width in range(min(tokens, MAX_AXIS), 0, -1):
            if tokens % width:
                continue
            rest = tokens // width
            height = next(h for h in range(min(rest, MAX_AXIS), 0, -1) if rest % h == 0)
            if rest // height <= MAX_AXIS:
                return rest // height, 2 * height, 2 * width
    nearby = min(max(1, round(tokens / 1560)), MAX_AXIS) * 1560
    raise BlockSwapConfigError(
        f"--tokens {tokens} does not fit a latent of at most {MAX_AXIS} patches along each "
        f"axis (the Wan model's rotary embedding); use a multiple of 1560 (480p frames) such "
        f"as {nearby}, or a number with smaller factors"
    )


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
    donors = _donor_options(args)
    for options in runs:
        if options.get("blocks_to_swap") != 0:
            options.update(donors)
            if mode:
                options["transfer_compression"] = mode
    return runs


def _donor_options(args: argparse.Namespace, device: torch.device | None = None) -> dict:
    """``--donor-device`` / ``--donor-allocation`` as swap options, checked (both at once, a
    bad device or string, or with ``device`` a donor GPU this machine lacks: refused with the
    engine's message, naming the option)."""
    options = {
        name: value
        for name, value in (
            ("donor_device", args.donor_device),
            ("donor_allocation", args.donor_allocation),
        )
        if value is not None
    }
    try:
        config = SwapConfig(**options)
        if device is not None:  # before the baseline is loaded and timed
            donor_free_memory(config, device)
    except BlockSwapConfigError as error:
        flags = " / ".join("--" + name.replace("_", "-") for name in options)
        raise BlockSwapConfigError(f"{flags}: {error}") from None
    return options


def _swap_settings(args, num_blocks: int) -> list[dict]:
    if args.test_all:
        return [dict(blocks_to_swap=0)] + [
            dict(blocks_to_swap=n, prefetch_blocks=p)
            for n in range(1, num_blocks + 1)
            for p in (0, 1, 2)
        ]
    prefetch = DEFAULT_PREFETCH if args.prefetch is None else args.prefetch
    runs = [dict(blocks_to_swap=0)]
    if args.blocks_to_swap:  # 0 is the baseline itself: measured once
        runs.append(dict(blocks_to_swap=args.blocks_to_swap, prefetch_blocks=prefetch))
    elif args.vram_budget_gb is not None:
        runs.append(dict(vram_budget_gb=args.vram_budget_gb, prefetch_blocks=prefetch))
    elif args.blocks_to_swap is None:
        runs += [
            dict(blocks_to_swap=n, prefetch_blocks=prefetch) for n in (num_blocks // 2, num_blocks)
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
    except KeyboardInterrupt:  # outside the sweep (which keeps what it measured): nothing to keep
        print("\ninterrupted", file=sys.stderr)
        return 130


def run(args: argparse.Namespace) -> int:
    check_options(args)
    device = _device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    # a real model's forwards take long on a CPU: without CUDA only its advice is printed,
    # unless --device cpu asks for timings
    measuring = not (args.model_path and device.type == "cpu" and args.device is None)
    _check_measuring_options(args, dtype, measuring)
    if measuring:
        _donor_options(args, device)
    if args.model_path:
        latent = latent_shape(args, (81, 480, 832))
    else:
        latent = latent_shape(args, (5, 128, 128))
    with tempfile.TemporaryDirectory() as folder:
        if args.model_path:
            path, model_name = args.model_path, os.path.basename(args.model_path)
        else:
            path, model_name = write_default_model(folder, dtype), BUILT_IN_NAME
        # the header alone, nothing allocated yet; advice is for a GPU, which computes in bf16
        # unless told otherwise
        _check_is_wan(path, model_name)
        file_model = read_file_model(path, file_model_dtype(args, device, dtype))
        num_blocks = sum(1 for b in file_model.sizes.blocks if b.role == "main")
        _check_against_model(args, num_blocks, file_model)
        if measuring:
            _check_activations(args, file_model, latent, dtype, device)
        if not args.model_path:  # after every check: an error stays the one line printed
            print(BUILT_IN_NOTE, file=sys.stderr)
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
        if not measuring:
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
    """Every setting of the sweep, in order; Ctrl-C keeps what was measured. A setting that runs
    out of device memory (no swapping on a small card, say) is recorded as such and the sweep
    goes on; only when none ran is it an error."""
    runs = settings(args, report["num_blocks"])
    bar = perf_report.ProgressBar(len(runs))
    baseline_ms = base_weights = None
    try:
        for options in runs:
            bar.step(str(options))
            try:
                row = measure(
                    path,
                    options,
                    latent,
                    dtype,
                    device,
                    DEFAULT_ITERS if args.iters is None else args.iters,
                    baseline_ms,
                    bandwidth,
                    progress=bool(args.model_path),  # real checkpoints take a while
                )
            except torch.OutOfMemoryError:
                report["results"].append(_out_of_memory_row(options, device))
                continue
            if options == dict(blocks_to_swap=0):
                baseline_ms = row["ms"]
                row["slowdown"] = 1.0
                base_weights = row["weights_on_device_gib"]
            if base_weights is not None:
                row["vram_saved_gib"] = base_weights - row["weights_on_device_gib"]
            report["results"].append(row)
    except KeyboardInterrupt:
        report["interrupted"] = True
        print("\ninterrupted: writing what was measured", file=sys.stderr)
    bar.close()
    if runs and not any("ms" in row for row in report["results"]) and not report.get("interrupted"):
        raise InsufficientMemoryError(
            f"every setting ran out of {device} memory: use a smaller latent (--frames, "
            f"--height, --width or --tokens) or swap more (--blocks-to-swap, --vram-budget-gb)"
        )


def _out_of_memory_row(options: dict, device: torch.device) -> dict:
    """A setting the device could not hold; what it allocated is given back first."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    print(f"\n{options}: out of {device} memory, skipped", file=sys.stderr)
    return {
        "options": options,
        "blocks_to_swap": options.get("blocks_to_swap"),
        "status": "out of memory",
    }


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


def check_options(args: argparse.Namespace) -> None:
    """Every check that needs neither the model nor the device, before anything is loaded:
    each bad value or contradictory pair is refused by name, never ignored or replaced."""
    if args.model_path is not None and not args.model_path.strip():
        raise BlockSwapConfigError(
            "--model-path is empty: name a .safetensors or .gguf file or a diffusers folder, "
            "or leave the option out to measure the built-in small model"
        )
    if args.model_path and not os.path.exists(args.model_path):
        raise CheckpointError(f"--model-path {args.model_path} does not exist")
    _check_output(args.output, args.model_path)
    if args.test_all:
        sweep = ("--blocks-to-swap", "--vram-budget-gb", "--prefetch")
        _refuse_with(args, "--test-all", sweep, "it sweeps every setting")
    if args.blocks_to_swap is not None and args.vram_budget_gb is not None:
        raise BlockSwapConfigError(
            "give --blocks-to-swap or --vram-budget-gb, not both (a budget picks the blocks)"
        )
    if args.tokens is not None:
        size = ("--frames", "--height", "--width")
        _refuse_with(args, "--tokens", size, "the tokens set the latent's size")
    if args.blocks_to_swap is not None and args.blocks_to_swap < 0:
        raise BlockSwapConfigError(
            f"--blocks-to-swap must be 0 or more (blocks kept in host memory), got "
            f"{args.blocks_to_swap}"
        )
    if args.prefetch is not None and not 0 <= args.prefetch <= MAX_PREFETCH_BLOCKS:
        raise BlockSwapConfigError(
            f"--prefetch must be in 0..{MAX_PREFETCH_BLOCKS}, got {args.prefetch} (1 is "
            f"enough to hide copies behind compute)"
        )
    budget = args.vram_budget_gb
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise BlockSwapConfigError(
            f"--vram-budget-gb must be a positive number of GiB, got {budget}"
        )
    _donor_options(args)
    if args.blocks_to_swap == 0:
        inert = ("--prefetch", "--transfer-compression", "--donor-device", "--donor-allocation")
        _refuse_with(args, "--blocks-to-swap 0", inert, "nothing is swapped")
    if args.iters is not None and not 1 <= args.iters <= MAX_ITERS:
        raise BlockSwapConfigError(f"--iters must be in 1..{MAX_ITERS}, got {args.iters}")


# Options whose value is a default when not given: "given" means given with a value that
# does something.
_INERT = {"--transfer-compression": "off"}


def _given(args: argparse.Namespace, option: str) -> bool:
    value = getattr(args, option.lstrip("-").replace("-", "_"))
    return value is not None and value is not False and value != _INERT.get(option)


def _refuse_with(args: argparse.Namespace, option: str, others: tuple[str, ...], why: str) -> None:
    """``option`` makes each of ``others`` meaningless: refuse any that was given."""
    for other in others:
        if _given(args, other):
            raise BlockSwapConfigError(
                f"{other} has no effect with {option} ({why}): leave one of them out"
            )


def _device(name: str | None) -> torch.device:
    """``--device``, with the option named in its errors."""
    try:
        device = resolve_device(name)
    except BlockSwapConfigError as error:
        raise BlockSwapConfigError(f"--device {name}: {error}") from None
    if device.type == "cuda" and device.index >= torch.cuda.device_count():
        raise BlockSwapConfigError(
            f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}"
        )
    return device


def _check_measuring_options(args: argparse.Namespace, dtype: torch.dtype, measuring: bool) -> None:
    """Options of the timed runs: refused where nothing is timed, and compression where the
    weights it packs (bf16) are not what the run computes in."""
    timing = (
        "--blocks-to-swap",
        "--vram-budget-gb",
        "--prefetch",
        "--test-all",
        "--iters",
        "--donor-device",
        "--donor-allocation",
    )
    for option in timing + ("--transfer-compression",):
        if not measuring and _given(args, option):
            raise BlockSwapConfigError(
                f"{option} sets what is timed, but without CUDA a real model's forwards are "
                f"not timed: add --device cpu to time them on the CPU, or leave {option} out "
                f"for the advice alone"
            )
    if _given(args, "--transfer-compression") and dtype != torch.bfloat16:
        name = str(dtype).replace("torch.", "")
        raise BlockSwapConfigError(
            f"--transfer-compression packs bf16 weights, but this run computes in {name}"
            f"{'' if args.dtype else ' (the default here)'}: add --dtype bf16, or leave "
            f"--transfer-compression out"
        )


def _check_output(output: str, model_path: str | None = None) -> None:
    """The report's folder must exist and be writable before anything is measured, and the
    report must not land on a folder or on the model."""
    if not output.strip():
        raise BlockSwapConfigError(
            "--output is empty: name the report's .json file, e.g. --output results.json"
        )
    if os.path.isdir(output) or output.endswith(("/", os.sep)):
        raise BlockSwapConfigError(
            f"--output {output} is a folder: name a file in it, e.g. --output "
            f"{os.path.join(output, 'block_swap_performance_results.json')}"
        )
    folder = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(folder):
        raise BlockSwapConfigError(
            f"--output {output}: the folder {folder} does not exist; create it or choose another"
        )
    if not os.access(folder, os.W_OK):
        raise BlockSwapConfigError(f"--output {output}: the folder {folder} is not writable")
    for written in (output, perf_report.chart_path(output)):
        if os.path.exists(written) and not os.access(written, os.W_OK):
            raise BlockSwapConfigError(f"--output {output}: {written} is not writable")
        if model_path and os.path.exists(written) and os.path.samefile(written, model_path):
            raise BlockSwapConfigError(
                f"--output {output} would overwrite --model-path {model_path} "
                f"(the report{' chart' if written != output else ''} is written there): "
                f"choose another --output"
            )


def _check_activations(args, file_model, latent, dtype: torch.dtype, device) -> None:
    """One forward's activations must fit in the device's memory: a frame size off by orders
    of magnitude is refused by name here, not by the allocator mid-forward (estimate)."""
    frames, height, width = latent
    tokens = frames * (height // 2) * (width // 2)
    need = activation_gib(file_model, tokens, dtype.itemsize) * GIB
    if device.type == "cuda":
        available, where = torch.cuda.mem_get_info(device)[1], f"{device} has in all"
    else:
        available, where = available_host_bytes(), "of RAM are available"
    if available is None or need <= available:
        return
    size = "--tokens" if args.tokens is not None else "--frames, --height and --width"
    raise InsufficientMemoryError(
        f"{size}: a forward of {tokens:,} tokens needs about {need / GIB:,.1f} GiB of "
        f"activations (an estimate), but {available / GIB:.1f} GiB {where}: use a smaller "
        f"latent (fewer frames, a lower resolution or fewer tokens)"
    )


def _check_against_model(args: argparse.Namespace, num_blocks: int, file_model) -> None:
    """Options that depend on the model, checked from its header before the first forward."""
    if args.blocks_to_swap is not None and args.blocks_to_swap > num_blocks:
        raise BlockSwapConfigError(
            f"--blocks-to-swap must be in 0..{num_blocks} for this model "
            f"({num_blocks} blocks), got {args.blocks_to_swap}"
        )
    if args.vram_budget_gb is not None:  # the planner is pure: a budget below it fails now
        try:
            plan_swap(file_model.sizes, SwapConfig(vram_budget_gb=args.vram_budget_gb))
        except (BlockSwapConfigError, InsufficientMemoryError) as error:
            raise type(error)(f"--vram-budget-gb {args.vram_budget_gb}: {error}") from None


if __name__ == "__main__":
    sys.exit(main())
