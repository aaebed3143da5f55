"""Old engine against new, side by side in one process on one GPU (issue #17's "Same speed").

The old engine is a frozen copy of the package (``--old``, default ``.carry/engine_base``);
the new one is this checkout. Both swap the same model: ComfyUI core's own Wan class at
Wan 14B's block size (dim 5,120, ffn 13,824, 40 heads; 8 blocks, bf16, random weights drawn
on the GPU), built by core's loader the way ``architectures_benchmark.py`` builds its WAN21
family. Rows: 1,560 and 32,760 tokens (one and 21 latent frames of 60x104, text 512 tokens)
x plan (all 8 blocks swapped; half resident: 4 swapped; streamed: a budget a little above
``min_vram_budget_gb``, so every large layer streams) x raw or compressed transfers.

Each plan runs in rounds; a round applies one engine to the model, times both token counts
(warm-up first), and removes it. Rounds go old, new, new, old, ... so drift of clocks and
temperature cancels; a row's time is the median over its rounds' forwards. Peak VRAM is
``max_memory_allocated`` during the forwards minus what was allocated before ``apply`` (the
model then sits in host memory): resident weights, slots and activations. Bars, per row: new
within 1% of old in time and in peak VRAM, the same plan (swapped names, slot and window
bytes), and outputs bit-identical to each other and to the model all on the GPU.

    python benchmarks/engine_refactor_compare.py --comfyui PATH --deadline 240
        # writes benchmarks/results/engine_refactor_<gpu>.json
    python benchmarks/engine_refactor_compare.py --cpu --comfyui PATH --output /tmp/e.json

``--cpu`` is a smoke run with a small Wan (dims 256/512, 8 blocks, bf16 so compression packs
its layers) and a few tokens: no bar is judged. The JSON is rewritten after every plan, so
a cut run keeps what it measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.machinery
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
from types import ModuleType
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import architectures_benchmark as arch  # noqa: E402  (imports _pack: this checkout's package)

from comfyui_wan_blockswap import model_configs  # noqa: E402
from comfyui_wan_blockswap import wan_blockswap as new_engine  # noqa: E402

logger = logging.getLogger("engine_refactor_compare")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_PACKAGE = "old_comfyui_wan_blockswap"
PLANS = ("all swapped", "half resident", "streamed")
COMPRESSIONS = ("raw", "compressed")
SPEED_BAR = 1.01  # new_ms / old_ms
PEAK_TOLERANCE = 0.01  # |new peak / old peak - 1|
BLOCKS = 8
# What the engine benchmark gives a streamed plan above the least budget (about the peak
# of diffusers' leaf-level offloading); the CPU model's layers are far smaller.
STREAMED_WINDOW_GIB = {"gpu": 192 / 1024, "cpu": 2**-14}
# Latent (frames, height, width) per mode: 480p Wan 14B, 1 and 21 latent frames.
SHAPES = {"gpu": ((1, 60, 104), (21, 60, 104)), "cpu": ((1, 8, 8), (2, 8, 16))}
TEXT = {"gpu": 512, "cpu": 12}
# The plan's fields both engines must agree on (a field one engine lacks reads as None).
PLAN_FIELDS = (
    "kind",
    "swap_unit",
    "swapped",
    "resident",
    "num_slots",
    "slot_bytes",
    "window_bytes",
    "staging_bytes",
    "resident_bytes",
    "swapped_bytes",
    "compressed",
)

WAN = arch.FAMILIES["WAN21"]
# The engine benchmark's model: 8 Wan 14B blocks. On the CPU blocks wide enough that
# transfer compression packs their layers (it leaves tensors under 64k elements raw).
FAMILY = dataclasses.replace(
    WAN,
    real=dict(WAN.real, num_layers=BLOCKS),
    tiny=dict(WAN.tiny, dim=256, ffn_dim=512, num_heads=2, num_layers=BLOCKS),
)


# -- the two engines ---------------------------------------------------------------------


def import_old_engine(root: str) -> ModuleType:
    """The frozen copy's engine, as ``old_comfyui_wan_blockswap.wan_blockswap``.

    Its parent is a bare package over ``root`` whose ``__init__`` never runs (that would
    import ``nodes.py`` and ComfyUI's node API): the engine's relative imports, ``..`` ones
    included, resolve inside the copy, beside the new engine in this process.
    """
    root = os.path.abspath(root)
    if not os.path.isfile(os.path.join(root, "wan_blockswap", "__init__.py")):
        sys.exit(f"{root} holds no copy of the package (wan_blockswap/__init__.py)")
    if OLD_PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(OLD_PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [root]
        sys.modules[OLD_PACKAGE] = importlib.util.module_from_spec(spec)
    engine = importlib.import_module(OLD_PACKAGE + ".wan_blockswap")
    source = os.path.abspath(engine.apply_block_swap.__code__.co_filename)
    if not source.startswith(root + os.sep):
        raise RuntimeError(f"the old engine came from {source}, not from {root}")
    return engine


def layout_in(engine: ModuleType, layout: Any) -> Any:
    """``layout`` rebuilt, field by field, from ``engine``'s own layout classes (each engine
    gets the same record's layout in the types it knows; a field the older engine's class
    lacks, such as ``token_wise``, is left out)."""
    if dataclasses.is_dataclass(layout) and not isinstance(layout, type):
        cls = getattr(engine, type(layout).__name__)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        fields = [f.name for f in dataclasses.fields(layout) if f.init and f.name in known]
        return cls(**{name: layout_in(engine, getattr(layout, name)) for name in fields})
    if isinstance(layout, tuple):
        return tuple(layout_in(engine, v) for v in layout)
    return layout


def plan_summary(plan: Any) -> dict:
    return {name: arch._jsonable(getattr(plan, name, None)) for name in PLAN_FIELDS}


def plan_options(plan: str, compression: str, streamed_budget_gb: float) -> dict:
    """``apply_block_swap`` keyword options of one row (the rest are the defaults: one
    block prefetched, embeddings resident, non-blocking copies)."""
    options: dict[str, Any] = {"transfer_compression": compression == "compressed"}
    if plan == "all swapped":
        options["blocks_to_swap"] = BLOCKS
    elif plan == "half resident":
        options["blocks_to_swap"] = BLOCKS // 2
    else:
        options["vram_budget_gb"] = streamed_budget_gb
    return options


# -- measuring ---------------------------------------------------------------------------


def _allocated(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _equal(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@dataclasses.dataclass
class Side:
    """One engine's measurements of one plan, over its rounds, per token count."""

    samples: dict[int, list[float]]
    peak_gib: dict[int, float]
    equal_reference: dict[int, bool]
    output: dict[int, tuple[torch.Tensor, ...]]
    apply_s: list[float]
    plan: dict | None = None


def run_plan(
    model: torch.nn.Module,
    engines: dict[str, ModuleType],
    layouts: dict[str, Any],
    options: dict,
    inputs: dict[int, dict],
    reference: dict[int, arch.Timed],
    opts: arch.Options,
    rounds: int,
    hold: bool = True,
) -> dict[str, Side]:
    """Both engines on ``model`` with ``options``, in rounds old, new, new, old, ...; with
    ``hold`` the new engine's scheduler holds copies at the forward's edge."""
    sides = {
        name: Side(
            {t: [] for t in inputs}, {t: 0.0 for t in inputs}, {t: True for t in inputs}, {}, []
        )
        for name in engines
    }
    for r in range(rounds):
        for name in ("old", "new") if r % 2 == 0 else ("new", "old"):
            side = sides[name]
            arch._free(opts.device)
            before = _allocated(opts.device)
            started = time.perf_counter()
            swap = engines[name].apply_block_swap(
                model, layout=layouts[name], device=opts.device, **options
            )
            side.apply_s.append(round(time.perf_counter() - started, 2))
            if name == "new":
                swap.scheduler.hold_at_forward_edge = hold
            try:
                side.plan = plan_summary(swap.plan)
                for tokens, kwargs in inputs.items():
                    got = arch.timed(model, FAMILY, kwargs, opts, tokens)
                    side.samples[tokens].extend(got.timing.samples_ms)
                    peak = max(got.peak_gib - before / 2**30, 0.0)
                    side.peak_gib[tokens] = max(side.peak_gib[tokens], peak)
                    side.equal_reference[tokens] &= _equal(got.output, reference[tokens].output)
                    side.output[tokens] = got.output
            finally:
                swap.remove()
    return sides


def rows_of(
    plan: str, compression: str, sides: dict[str, Side], reference: dict[int, arch.Timed], cpu: bool
) -> list[dict]:
    old, new = sides["old"], sides["new"]
    same_plan = old.plan == new.plan
    rows = []
    for tokens in old.samples:
        old_ms = statistics.median(old.samples[tokens])
        new_ms = statistics.median(new.samples[tokens])
        ratio = new_ms / old_ms
        old_peak, new_peak = old.peak_gib[tokens], new.peak_gib[tokens]
        peak_ratio = new_peak / old_peak if old_peak > 0 else None
        equal = (
            _equal(old.output[tokens], new.output[tokens])
            and old.equal_reference[tokens]
            and new.equal_reference[tokens]
        )
        met = None
        if not cpu:
            met = bool(
                ratio <= SPEED_BAR
                and peak_ratio is not None
                and abs(peak_ratio - 1) <= PEAK_TOLERANCE
                and equal
                and same_plan
            )
        rows.append(
            {
                "tokens": tokens,
                "plan": plan,
                "compression": compression,
                "old_ms": round(old_ms, 3),
                "new_ms": round(new_ms, 3),
                "ratio": round(ratio, 4),
                "old_peak_gib": round(old_peak, 4),
                "new_peak_gib": round(new_peak, 4),
                "peak_ratio": None if peak_ratio is None else round(peak_ratio, 4),
                "equal_output": equal,
                "old_equal_reference": old.equal_reference[tokens],
                "new_equal_reference": new.equal_reference[tokens],
                "same_plan": same_plan,
                "plan_kind": new.plan["kind"],
                "met": met,
                "old_min_ms": round(min(old.samples[tokens]), 3),
                "new_min_ms": round(min(new.samples[tokens]), 3),
                "old_mean_ms": round(statistics.fmean(old.samples[tokens]), 3),
                "new_mean_ms": round(statistics.fmean(new.samples[tokens]), 3),
                "samples": len(old.samples[tokens]),
                "all_on_gpu_ms": round(reference[tokens].timing.median_ms, 3),
            }
        )
    return rows


# -- the run -----------------------------------------------------------------------------


def bars(results: dict) -> dict:
    """Every row against the bars; ``all_met`` also needs every plan measured."""
    judged = results["mode"] == "gpu"
    rows = results["rows"]
    missing = [name for name, c in results["configs"].items() if c["status"] != "ok"]
    return {
        "speed": f"new_ms <= {SPEED_BAR} x old_ms",
        "peak": f"new peak VRAM within {PEAK_TOLERANCE:.0%} of old",
        "output": "old == new == all-on-GPU output, bit for bit; the same plan",
        "judged": judged,
        "failed": [
            {k: r[k] for k in ("tokens", "plan", "compression", "ratio", "peak_ratio")}
            for r in rows
            if r["met"] is False
        ],
        "not_measured": missing,
        "all_equal_output": bool(rows) and all(r["equal_output"] and r["same_plan"] for r in rows),
        "all_met": (all(r["met"] for r in rows) and bool(rows) and not missing) if judged else None,
    }


def write(results: dict, path: str) -> None:
    results["bars"] = bars(results)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(results, handle, indent=2)
    os.replace(tmp, path)


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "NO")
        peak = "-" if r["peak_ratio"] is None else f"{r['peak_ratio']:.4f}"
        print(
            f"{r['tokens']:>6} {r['plan']:<14}{r['compression']:<11}{r['old_ms']:>10.2f}"
            f"{r['new_ms']:>10.2f}{r['ratio']:>8.4f}{r['old_peak_gib']:>9.3f}"
            f"{r['new_peak_gib']:>9.3f}{peak:>8}  {str(r['equal_output']):<6}{met}",
            flush=True,
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"), help="core tree")
    parser.add_argument("--old", default=os.path.join(ROOT, ".carry", "engine_base"))
    parser.add_argument("--output", default=None)
    parser.add_argument(
        "--iters", type=int, default=None, help="timed forwards per engine at 1,560 tokens"
    )
    parser.add_argument("--rounds", type=int, default=2, help="applies per engine and plan")
    parser.add_argument(
        "--deadline", type=float, default=None, help="seconds; plans that would end later: not_run"
    )
    parser.add_argument("--plans", nargs="+", choices=PLANS, default=list(PLANS))
    parser.add_argument(
        "--compression", nargs="+", choices=COMPRESSIONS, default=list(COMPRESSIONS)
    )
    parser.add_argument("--cpu", action="store_true", help="smoke run, small dims, no bars")
    parser.add_argument(
        "--hold-at-forward-edge",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the new engine's scheduler queues only the next forward's first unit between "
        "forwards, its default (against the old engine, which does not); "
        "--no-hold-at-forward-edge: the new engine in the old order",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.comfyui:
        sys.exit("name the core tree: --comfyui PATH or COMFYUI_PATH")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # core logs at INFO
    started = time.perf_counter()
    if not args.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA device: use --cpu for the smoke run")
    mode = "cpu" if args.cpu else "gpu"
    old_engine = import_old_engine(args.old)
    engines = {"old": old_engine, "new": new_engine}
    comfy = arch.import_core(args.comfyui, args.cpu)
    device = torch.device("cpu") if args.cpu else torch.device("cuda", torch.cuda.current_device())
    if args.cpu:
        torch.set_num_threads(1)  # small matmuls: OpenMP hand-off costs more than the work
    # Iterations are split over the rounds: 10 and 4 forwards per engine by default.
    small = args.iters or (2 if args.cpu else 10)
    large = small if args.cpu else max(3, round(small * 0.3))
    per_round = [math.ceil(n / args.rounds) for n in (small, large)]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    short = "cpu" if args.cpu else name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"engine_refactor_{short}.json"
    )

    patcher, config = arch.load(comfy, FAMILY, args.cpu, device, torch.bfloat16)
    model = patcher.model.diffusion_model
    arch._free(device)  # the weights were drawn on the GPU: give that memory back
    build_s = time.perf_counter() - started
    record = model_configs.match(model)
    if record is None:
        raise RuntimeError(f"no architecture record matches {type(model).__name__}")
    # like for like: the new engine without token chunks, which the old one may not have
    # (they change the units and the activations, [Note: token chunks])
    plain = dataclasses.replace(
        record.layout,
        block_lists=tuple(
            dataclasses.replace(bl, token_wise=()) for bl in record.layout.block_lists
        ),
    )
    layouts = {"new": plain, "old": layout_in(old_engine, plain)}
    inputs, tokens = {}, []
    for i, shape in enumerate(SHAPES[mode]):
        g = torch.Generator("cpu").manual_seed(1 + i)
        kwargs, count = FAMILY.inputs(model, shape, TEXT[mode], g)
        inputs[count] = kwargs
        tokens.append(count)
    opts = arch.Options(
        cpu=args.cpu,
        device=device,
        dtype=torch.bfloat16,
        warmup=dict(zip(tokens, (1, 1) if args.cpu else (2, 1))),
        runs=dict(zip(tokens, per_round)),
    )
    window = STREAMED_WINDOW_GIB[mode]
    streamed_budget = new_engine.min_vram_budget_gb(model, record.layout) + window
    results = {
        "device": name,
        "mode": mode,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "core": {
            "path": os.path.abspath(args.comfyui),
            "version": arch._core_version(args.comfyui),
        },
        "old": os.path.abspath(args.old),
        "model": f"core's Wan ({type(patcher.model).__name__}), {BLOCKS} blocks, bf16, random",
        "config": arch._jsonable(config),
        "record": record.name,
        "tokens": tokens,
        "text_tokens": TEXT[mode],
        "rounds": args.rounds,
        "new_holds_at_forward_edge": args.hold_at_forward_edge,
        "iters_per_round": dict(zip(map(str, tokens), per_round)),
        "warmup_per_round": {str(t): n for t, n in opts.warmup.items()},
        "streamed_budget_gb": round(streamed_budget, 4),
        "build_s": round(build_s, 1),
        "all_on_gpu": {},
        "configs": {},
        "rows": [],
    }

    # the reference: the model all on the GPU, once per token count
    model.to(device)
    reference = {t: arch.timed(model, FAMILY, inputs[t], opts, t) for t in tokens}
    model.to("cpu")
    for t in tokens:
        results["all_on_gpu"][str(t)] = {
            "ms": round(reference[t].timing.median_ms, 3),
            "peak_gib": round(reference[t].peak_gib, 4),
        }
    write(results, output)
    print(f"{name}: built in {build_s:.0f}s; old engine from {results['old']}", flush=True)
    print(
        f"{'tokens':>6} {'plan':<14}{'transfers':<11}{'old ms':>10}{'new ms':>10}{'ratio':>8}"
        f"{'old GiB':>9}{'new GiB':>9}{'peak':>8}  equal met",
        flush=True,
    )

    spent: list[float] = []  # seconds per plan, to tell whether the next one fits
    for plan in args.plans:
        for compression in args.compression:
            key = f"{plan}, {compression}"
            elapsed = time.perf_counter() - started
            expected = statistics.fmean(spent) if spent else 0.0
            if args.deadline is not None and elapsed + expected > args.deadline:
                results["configs"][key] = {
                    "status": "not_run",
                    "reason": f"deadline {args.deadline:.0f}s: {elapsed:.0f}s spent, "
                    f"a plan takes {expected:.0f}s",
                }
                write(results, output)
                continue
            options = plan_options(plan, compression, streamed_budget)
            plan_started = time.perf_counter()
            try:
                sides = run_plan(
                    model,
                    engines,
                    layouts,
                    options,
                    inputs,
                    reference,
                    opts,
                    args.rounds,
                    hold=args.hold_at_forward_edge,
                )
                rows = rows_of(plan, compression, sides, reference, args.cpu)
                info = {
                    "status": "ok",
                    "options": options,
                    "same_plan": sides["old"].plan == sides["new"].plan,
                    "plans": {n: s.plan for n, s in sides.items()},
                    "apply_s": {n: s.apply_s for n, s in sides.items()},
                }
                if not info["same_plan"]:
                    logger.error("%s: the engines planned differently: %s", key, info["plans"])
                if plan == "streamed" and sides["new"].plan["kind"] != "streamed":
                    raise RuntimeError(f"budget {streamed_budget:.4f} GiB did not stream")
            except Exception as error:  # recorded; the other plans still run
                logger.error("%s failed:\n%s", key, traceback.format_exc())
                info = {"status": "error", "error": f"{type(error).__name__}: {error}"[:2000]}
                rows = []
            arch._free(device)
            spent.append(time.perf_counter() - plan_started)
            info["seconds"] = round(spent[-1], 1)
            results["configs"][key] = info
            results["rows"].extend(rows)
            write(results, output)
            print_rows(rows)

    results["seconds"] = round(time.perf_counter() - started, 1)
    write(results, output)
    summary = results["bars"]
    print(
        f"equal outputs and plans: {summary['all_equal_output']}; all bars met: "
        f"{summary['all_met']}; wrote {output} in {results['seconds']:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
