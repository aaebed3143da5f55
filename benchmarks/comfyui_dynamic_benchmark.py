"""WAN BlockSwap against today's ComfyUI (dynamic VRAM) at equal free VRAM, in a real server.

    python benchmarks/comfyui_dynamic_benchmark.py --comfyui PATH --output OUT.json
        [--blocks 8 40] [--frames 81 1] [--free 12 7 4] [--arms ...] [--floor-blocks 40]

Per arm one real ComfyUI server (v0.33 or newer) with this pack; workflows go through /prompt:
UNETLoader -> [WAN BlockSwap] -> KSampler -> SaveLatent, Wan-14B-shaped random bf16 weights
(5120 wide, 13824 FFN), 832x480, random conditioning from a test node (no text encoder).

- Free VRAM: a second process holds the rest of the GPU, so core, dynamic VRAM and our node
  see the same limit; ``free_gib`` is what the server may use in all, its CUDA context
  included (as if the card had that much free before the server started).
- Peak VRAM from NVML (dynamic VRAM's pages do not show in torch's statistics): the device's
  peak use minus the holder's and the idle baseline. Peak host RSS of the server process.
- Steady-state s/it: ComfyUI's own progress-bar rate, over ``--prompts`` prompts with
  different seeds (ComfyUI caches identical prompts), after a cfg-1 prompt and ``--warmups``
  cfg-5 ones (which load and plan: their times are kept as ``warmup_s_each``); cfg 5.
  Its two decimals are 0.6% at 1.6 s/it, so the same prompts' execution times (the server's
  "Prompt executed in") are kept too, as ``prompt_s_each``.
- Outputs: the first prompt of every row runs at cfg 1 with one seed, and its latent is
  compared with core's default at the same shape and free VRAM: core's own output moves with
  the free VRAM (at cfg 1, 12 against 7 GiB differed by up to 0.014 on an H100). (At cfg > 1
  core also decides from the free VRAM whether the two conditionings run as one batch, which
  changes the numbers a little: core alone at 12 and 7 GiB free differed by up to 0.1.)
- The least free VRAM each arm runs at, in 0.5 GiB steps down from the top of the range
  (one prompt of one step each) until a prompt fails.
- ``log``: the server's plan and load lines of the row's prompts (ours and core's "loaded
  completely/partially"), since the server log itself may not come back from a GPU machine.

Arms: ``core_dynamic`` (core's default), ``core_legacy`` (``--disable-dynamic-vram``),
``ours_default`` (our node, default widgets), ``ours_auto`` (preset auto), and others in
``ARMS``; the experiment arms (``ours_no_chunks``, ``ours_margin_1_3``, ``ours_unpacked``,
``ours_whole_hidden``, ``ours_no_lookahead``: the node on a copy of the pack with a constant or
two changed) run only when ``--arms`` names them. Results are written after every row, so a
run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_server as cs  # noqa: E402

AUTO = "auto (free VRAM now)"
ARMS: dict[str, dict[str, Any]] = {
    "core_dynamic": dict(args=(), node=None),
    "core_legacy": dict(args=("--disable-dynamic-vram",), node=None),
    "ours_default": dict(args=(), node={}),  # a new node's widgets (preset auto)
    "ours_auto": dict(args=(), node={"preset": AUTO, "transfer_compression": "auto"}),
    # the previous default: 20 blocks swapped, whatever the card
    "ours_20_blocks": dict(args=(), node={"preset": "custom (use the widgets)"}),
    # every block through two fixed slots (no streamed layers): what auto's plan is measured by
    "ours_all_blocks": dict(
        args=(), node={"preset": "custom (use the widgets)", "blocks_to_swap": "all"}
    ),
    # Experiments: the default node on a copy of the pack with constants changed
    # (comfy_server.install_pack). Token chunks cost 0.67% of an 81-frame forward, 1.5% on
    # top of streaming, outside the server (results/streamed_overhead_h100.json)
    "ours_no_chunks": dict(
        args=(),
        node={},
        pack_patches={
            "wan_blockswap/config.py": ("DEFAULT_CHUNK_TOKENS = 8192", "DEFAULT_CHUNK_TOKENS = 0")
        },
    ),
    # auto keeps 1.6x a forward's allocated peak (comfy_auto.MEASURED_MARGIN): at 81 frames
    # with 7 GiB free, 5.06 GiB for a forward whose allocated peak was 2.9
    "ours_margin_1_3": dict(
        args=(),
        node={},
        pack_patches={
            "callbacks/comfy_auto.py": ("MEASURED_MARGIN = 1.6", "MEASURED_MARGIN = 1.3")
        },
    ),
    # fixed slots of layer units one unit per slot, as before session 26 ([Note: packed slots])
    "ours_unpacked": dict(
        args=(),
        node={},
        pack_patches={
            "wan_blockswap/packed_slots.py": (
                "PACK_LAYER_SLOTS = True",
                "PACK_LAYER_SLOTS = False",
            )
        },
    ),
    # token-wise parts run whole where the timed compute hides the larger plan's copies
    # ([Note: copies hidden behind compute] in callbacks/copy_headroom.py)
    "ours_whole_hidden": dict(
        args=(),
        node={},
        pack_patches={
            "callbacks/copy_headroom.py": (
                "RUN_WHOLE_WHERE_COPIES_HIDE = False",
                "RUN_WHOLE_WHERE_COPIES_HIDE = True",
            )
        },
    ),
    # the node before session 29: compressed layer plans in two slots (one layer ahead), and
    # fewest bytes deciding between whole blocks and the interleaved plan; session 29 turned
    # both on ([Note: look-ahead of compressed layer plans] in callbacks/compressed_lookahead.py)
    "ours_no_lookahead": dict(
        args=(),
        node={},
        pack_patches={
            "callbacks/compressed_lookahead.py": (
                "DEEPEN_COMPRESSED_LOOKAHEAD = True",
                "DEEPEN_COMPRESSED_LOOKAHEAD = False",
            ),
            "wan_blockswap/plan.py": (
                "PREFER_SPREAD_WITHIN = 0.01\n",
                "PREFER_SPREAD_WITHIN = 0.0\n",
            ),
        },
    ),
}


def _experiment(arm: str) -> bool:
    """An arm that runs a changed copy of the pack (only when ``--arms`` names it)."""
    return bool(ARMS[arm].get("pack_patches"))


# Rows whose steps are too fast for the progress bar's rate (1 frame): s/it is the difference
# of the server's own execution times of prompts with FAST_STEPS[1] and FAST_STEPS[0] steps.
FAST_FRAMES = 1
FAST_STEPS = (4, 16)
FAST_PAIRS = 3  # at least this many prompts of each step count (the least of each is used)
LEFTOVER = 512 * 2**20  # VRAM a server may keep after /free before a row restarts it
GIB = cs.GIB
NEED = re.compile(r"a forward of .* needed (\d+\.\d+) GiB")
SEEDS = iter(range(1000, 10**9))
# The server's lines that say what was planned and loaded, kept in each row: a run's server
# log may not come back from the device (it returns a few files), and the plan explains a time
KEPT_LOG = re.compile(
    r"(\[(INFO|WARNING|ERROR)\] *)?(wan_blockswap|transfer_compression|loaded (completely|partially))"
)
ANSI = re.compile(r"\x1b\[[0-9;]*m")
MAX_KEPT_LINES = 40


def kept_log_lines(text: str) -> list[str]:
    """The plan and load lines of a prompt's log, without colours or progress bars."""
    lines = []
    for line in ANSI.sub("", text).replace("\r", "\n").splitlines():
        found = KEPT_LOG.search(line)
        if found:
            lines.append(line[found.start() :].strip()[:300])
    return lines


# Wan 14B text-to-video, or image-to-video: its cross-attention has image keys and values
# (k_img, v_img: six projections, larger than the FFN, so the block's layers stay apart, see
# [Note: grouped parts] in wan_blockswap/units.py) and its input takes 20 more channels (core
# fills them with zeros without an image; without a CLIP vision output the image attention
# runs over the text tokens)
MODELS: dict[str, dict[str, int]] = {"t2v": {}, "i2v": dict(in_dim=36, image_dim=1280)}


def model_file(blocks: int, model: str = "t2v") -> str:
    kind = "" if model == "t2v" else f"{model}_"
    return f"wan14b_{kind}{blocks}blocks.safetensors"


def _count(text: str) -> int:
    """A whole number of at least 0 (argparse type)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def run_config(
    server: cs.Server,
    hog: cs.VramHog | None,
    arm: str,
    blocks: int,
    frames: int,
    free_gib: float,
    prompts: int,
    steps: int,
    shape: tuple[int, int],
    idle_used: int,
    model: str = "t2v",
    warmups: int = 1,
) -> dict:
    """``prompts`` prompts of one configuration; one row. ``warmups``: cfg-5 prompts before
    the timed ones where whole prompts are timed (a fast row's are fixed: see below)."""
    width, height = shape
    row: dict[str, Any] = dict(arm=arm, blocks=blocks, frames=frames, free_gib=free_gib)
    if model != "t2v":
        row["model"] = model
    server.free()
    hog_vram = 0
    if hog is not None:
        server_vram = cs.process_vram(server.process.pid)
        # VRAM the server kept after /free would raise its limit above free_gib (the holder
        # cannot take it): start it afresh and say so
        if server_vram > server.idle_vram + LEFTOVER:
            row["kept_after_free_gib"] = round((server_vram - server.idle_vram) / GIB, 3)
            row["kept_after_free_report"] = server.cuda_report()
            server.stop()
            server.start()
            server.idle_vram = server_vram = cs.process_vram(server.process.pid)
        hog.leave_free(int(free_gib * GIB) - server_vram)
        hog_vram = cs.process_vram(hog.process.pid)
    server.cuda_report(reset_peaks=True)  # a failure report's peaks are this row's
    node = ARMS[arm]["node"]
    if node is not None and node.get("blocks_to_swap") == "all":
        node = {**node, "blocks_to_swap": blocks}
    rates, peaks_vram, peaks_process, peaks_rss, latents = [], [], [], [], []
    prompt_times: list[float] = []
    warmup_times: list[float] = []  # what the first prompts cost: loads, plans, re-plans
    rss_each: list[list[float]] = []  # per prompt: peak RSS (GiB), seconds into the prompt
    gpu_each: list[dict | None] = []  # per prompt: the GPU's clock and heat while computing
    status, error = "ok", ""
    # prompt 0: cfg 1 (compared with core); prompt 1 (to ``warmups``): cfg 5, a warm-up (a
    # plan from a first measurement, core's cond batching; with transfer_compression auto a
    # 2-step 81-frame warm-up ends before auto decides, so its re-plan lands in the next
    # prompt: session 29's first timed prompt took 1.42x core's); the rest timed. A fast row
    # warms up twice: auto's plan for the batched conditionings, measured in the first
    # warm-up, loads in the next prompt (session 17: 5.4 s for a 4-step prompt that otherwise
    # takes 0.4), and its rate is the difference of two short prompts' times, so it takes
    # FAST_PAIRS pairs of them
    fast = frames <= FAST_FRAMES and prompts > 1
    first_timed = 3 if fast else 1 + warmups
    timed: dict[int, list[float]] = {}
    needs: list[float] = []
    kept: list[str] = []
    if prompts == 1:  # a floor probe: the one cfg-1 prompt
        total = 1
    else:
        total = first_timed + (2 * max(FAST_PAIRS, prompts - 1) if fast else prompts - 1)
    for index in range(total):
        prefix = f"{arm}_{blocks}_{frames}_{free_gib}_{index}".replace(".", "p")
        if fast and index >= first_timed:
            prompt_steps = FAST_STEPS[(index - first_timed) % 2]
        else:
            prompt_steps = steps
        prompt = cs.wan_workflow(
            model_file(blocks, model),
            frames=frames,
            width=width,
            height=height,
            steps=prompt_steps,
            seed=1 if index == 0 else next(SEEDS),  # never a prompt ComfyUI has cached
            cfg=1.0 if index == 0 else 5.0,
            node=None if node is None else {**cs.node_defaults(), **node},
            prefix=prefix,
        )
        with cs.Sampler(server.process.pid) as sampler:
            result = server.queue(prompt, timeout=900)
        peaks_vram.append(max(0, sampler.peak_device - hog_vram - idle_used) / GIB)
        peaks_rss.append(sampler.peak_rss / GIB)
        # which prompt peaks (a re-plan's or a steady one's), and when in it
        rss_each.append([round(sampler.peak_rss / GIB, 3), round(sampler.peak_rss_at, 1)])
        gpu_each.append(sampler.gpu_state())
        peaks_process.append(sampler.peak_process / GIB)
        needs.extend(float(n) for n in NEED.findall(result.get("log", "")))
        for line in kept_log_lines(result.get("log", "")):
            if line not in kept and len(kept) < MAX_KEPT_LINES:
                kept.append(line)
        if result["status"] != "success":
            status = "oom" if "out of memory" in result.get("error", "").lower() else "error"
            error = result.get("error", "")[:500]
            # torch's peaks over the row, to tell activations from the allocator's split
            # pieces; read after core's own OOM handling (it unloads every model and empties
            # the cache), so only the peaks and counts describe the failure, not the current
            # allocated/reserved/free figures
            row["failure_report"] = server.cuda_report()
            break
        if fast and index >= first_timed and result.get("executed_s") is not None:
            timed.setdefault(prompt_steps, []).append(result["executed_s"])
        rate = cs.seconds_per_iteration(result.get("log", ""))
        if 0 < index < first_timed and result.get("executed_s") is not None:
            warmup_times.append(round(result["executed_s"], 3))
        if rate is not None and index >= first_timed and not fast:
            rates.append(rate)
            # the prompt's whole time too: tqdm's rate has two decimals, 0.6% at 1.6 s/it
            if result.get("executed_s") is not None:
                prompt_times.append(round(result["executed_s"], 3))
        latents.append(cs.latest_latent(server, prefix))
    if fast and all(timed.get(n) for n in FAST_STEPS):
        short, long = (min(timed[n]) for n in FAST_STEPS)  # the least of each: no stragglers
        rates = [(long - short) / (FAST_STEPS[1] - FAST_STEPS[0])]
        row["executed_s"] = {str(n): [round(t, 3) for t in timed[n]] for n in FAST_STEPS}
        row["rate_method"] = "difference of the least execution times, %d and %d steps" % (
            FAST_STEPS
        )
    if needs:
        row["measured_need_gib"] = max(needs)
    row.update(
        s_per_it=round(sum(rates) / len(rates), 4) if rates else None,
        s_per_it_each=[round(r, 4) for r in rates],
        prompt_s_each=prompt_times,
        warmup_s_each=warmup_times,
        peak_vram_gib=round(max(peaks_vram), 3) if peaks_vram else None,
        peak_vram_process_gib=round(max(peaks_process), 3) if peaks_process else None,
        peak_rss_gib=round(max(peaks_rss), 3) if peaks_rss else None,
        peak_rss_each=rss_each,
        gpu_state_each=gpu_each,
        status=status,
        error=error,
        latent=latents[0] if latents else None,
        log=kept,
    )
    return row


def compare(latent: str | None, reference: str | None) -> dict:
    if latent is None or reference is None:
        return {"equal_to_core": None}
    from safetensors.torch import load_file

    a, b = load_file(latent)["latent_tensor"], load_file(reference)["latent_tensor"]
    diff = (a.float() - b.float()).abs().max().item()
    return {"equal_to_core": bool(diff == 0.0), "max_abs_diff": diff}


def server_env(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings as an environment for the servers.

    Raises:
        ValueError: an entry without ``=`` or with an empty key.
    """
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--server-env takes KEY=VALUE, got {pair!r}")
        env[key] = value
    return env


def floor_search(
    server: cs.Server,
    hog: cs.VramHog,
    arm: str,
    blocks: int,
    frames: int,
    shape: tuple[int, int],
    idle_used: int,
    levels: list[float],
    deadline: float,
    model: str = "t2v",
) -> dict:
    """The least free VRAM at which one prompt of one step succeeds: each of ``levels``,
    highest first, until one fails."""
    tries, rows, ok_at = {}, [], None
    for level in sorted(levels, reverse=True):
        if time.time() > deadline:
            tries[level] = "not_run"
            continue
        row = run_config(
            server, hog, arm, blocks, frames, level, 1, 1, shape, idle_used, model
        )  # fmt: skip
        tries[level] = row["status"]
        rows.append({k: v for k, v in row.items() if k != "latent"})
        if row["status"] != "ok":
            break
        ok_at = level
    return {"arm": arm, "blocks": blocks, "frames": frames, "least_free_gib": ok_at,
            "tries": tries, "rows": rows}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--workdir", default=None)
    parser.add_argument(
        "--arms", nargs="+", choices=list(ARMS), default=[a for a in ARMS if not _experiment(a)]
    )
    parser.add_argument("--blocks", nargs="+", type=int, default=[8])
    parser.add_argument(
        "--model", choices=list(MODELS), default="t2v",
        help="Wan 14B text- or image-to-video shapes (i2v: rows say model=i2v)",
    )  # fmt: skip
    parser.add_argument("--frames", nargs="+", type=int, default=[81, 1])
    parser.add_argument("--free", nargs="*", type=float, default=[12, 7, 4])
    parser.add_argument(
        "--pairs", nargs="*", default=None,
        help="FRAMES:FREE_GIB rows to run, in this order (default: every --frames x --free)",
    )  # fmt: skip
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument(
        "--warmups",
        type=_count,
        default=1,
        help="cfg-5 prompts before the timed ones in rows timed by whole prompts (81 frames)",
    )
    parser.add_argument("--steps", type=int, default=4, help="steps per prompt")
    parser.add_argument("--floor-blocks", type=int, nargs="*", default=[])
    parser.add_argument("--floor-frames", type=int, default=81)
    parser.add_argument("--floor-range", type=float, nargs=2, default=[1.0, 8.0])
    parser.add_argument(
        "--floor-levels", type=float, nargs="*", default=None,
        help="try these free levels (GiB), highest first (default: --floor-range in 0.5 GiB steps)",
    )  # fmt: skip
    parser.add_argument(
        "--deadline", type=float, default=1e9, help="seconds; rows after it: not_run"
    )
    parser.add_argument("--size", type=int, nargs=2, default=[832, 480], help="width height")
    parser.add_argument("--cpu", action="store_true", help="a tiny smoke run on the CPU")
    parser.add_argument(
        "--server-env", nargs="*", default=[], metavar="KEY=VALUE",
        help="environment for every server (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, "
        "say: is a floor the activations or the allocator's fragments?)",
    )  # fmt: skip
    parser.add_argument(
        "--server-arg", action="append", default=[], metavar="ARG",
        help="one more main.py argument for every server (repeatable): --enable-triton-backend, "
        "say, for a fused rope in every arm",
    )  # fmt: skip
    args = parser.parse_args()
    try:
        env = server_env(args.server_env)
    except ValueError as error:
        parser.error(str(error))
    started = time.time()
    workdir = args.workdir or tempfile.mkdtemp(prefix="comfy_dyn_")
    shape = tuple(args.size)
    device = "cpu"
    result: dict[str, Any] = {"rows": [], "floors": [], "setup": vars(args)}

    def save() -> None:
        with open(args.output, "w") as handle:
            json.dump(result, handle, indent=2)

    hog = None
    idle_used = 0
    if not args.cpu:
        import torch

        device = torch.cuda.get_device_name(0)
        idle_used = cs.device_used()
    result["device"] = device
    models = os.path.join(workdir, "base", "models", "diffusion_models")
    os.makedirs(models, exist_ok=True)
    dims = dict(dim=256, ffn_dim=512) if args.cpu else dict(dim=5120, ffn_dim=13824)
    for blocks in sorted(set(args.blocks + args.floor_blocks)):
        path = os.path.join(models, model_file(blocks, args.model))
        if not os.path.exists(path):
            t0 = time.time()
            size = cs.write_wan(path, blocks, **dims, **MODELS[args.model])
            result.setdefault("files", {})[model_file(blocks, args.model)] = {
                "bytes": size,
                "write_s": round(time.time() - t0, 1),
            }
    references: dict[tuple[int, int, float], str] = {}
    # An arm named twice runs twice, each time in a new server: core, ours, ours, core cancels
    # a drift that is linear in time (the GPU warming up) from the comparison (session 25)
    rounds: dict[str, int] = {}
    for arm in args.arms:
        rounds[arm] = rounds.get(arm, 0) + 1
        arm_round = rounds[arm]
        # probe: /free returns before the worker has unloaded (a static model's weights take
        # seconds to copy back), so wait for the worker, not for NVML to look steady
        server = cs.Server(
            args.comfyui,
            workdir,
            ARMS[arm]["args"] + tuple(args.server_arg) + (("--cpu",) if args.cpu else ()),
            env=env,
            probe=True,
            pack_patches=ARMS[arm].get("pack_patches"),
        )
        if not args.cpu and hog is None:
            hog = cs.VramHog()
        try:
            server.start()
            server.idle_vram = cs.process_vram(server.process.pid)
            if args.pairs:
                pairs = [(int(f), float(g)) for f, g in (p.split(":") for p in args.pairs)]
            else:
                pairs = [(f, g) for f in args.frames for g in sorted(args.free, reverse=True)]
            for blocks in args.blocks:
                for frames, free_gib in pairs:
                    if time.time() - started > args.deadline:
                        row = dict(
                            arm=arm,
                            blocks=blocks,
                            frames=frames,
                            free_gib=free_gib,
                            status="not_run",
                        )
                    else:
                        row = run_config(
                            server, hog, arm, blocks, frames, free_gib,
                            args.prompts, args.steps, shape, idle_used, args.model,
                            args.warmups,
                        )  # fmt: skip
                    # core's own output moves with free VRAM (12 against 7 GiB differed by 0.014
                    # on the H100, session 16: comfyui_dynamic_h100.json), so each row is
                    # compared with core's at the same free VRAM
                    row["round"] = arm_round
                    key = (blocks, frames, free_gib)
                    if arm == "core_dynamic" and row.get("latent") and key not in references:
                        references[key] = row["latent"]
                    row.update(compare(row.get("latent"), references.get(key)))
                    result["rows"].append(row)
                    save()
                    print(json.dumps({k: v for k, v in row.items() if k != "latent"}), flush=True)
            for blocks in args.floor_blocks:
                if time.time() - started > args.deadline or hog is None:
                    result["floors"].append(dict(arm=arm, blocks=blocks, status="not_run"))
                    continue
                levels = args.floor_levels or [
                    x / 2
                    for x in range(int(args.floor_range[0] * 2), int(args.floor_range[1] * 2) + 1)
                ]  # 0.5 GiB steps
                floor = floor_search(
                    server, hog, arm, blocks, args.floor_frames, shape, idle_used,
                    levels, started + args.deadline, args.model,
                )  # fmt: skip
                result["floors"].append(floor)
                save()
                print(json.dumps(floor), flush=True)
            if hog is not None:  # what the server keeps after /free at the end of the arm
                server.free()
                kept = cs.process_vram(server.process.pid) - server.idle_vram
                name = arm if arm_round == 1 else f"{arm}#{arm_round}"
                result.setdefault("after_free", {})[name] = {
                    "kept_gib": round(kept / GIB, 3),
                    "report": server.cuda_report() if kept > LEFTOVER else None,
                }
                save()
        finally:
            server.stop()
    if hog is not None:
        hog.close()
    result["seconds"] = round(time.time() - started, 1)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
