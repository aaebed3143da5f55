"""A long mixed session in a real ComfyUI server: prompts with and without WAN BlockSwap, with
and without a LoRA, Wan 2.2 A14B's two experts in one prompt, changed settings, /interrupt
mid-sampling, /free, and bad widget values.

    python benchmarks/comfyui_session.py --comfyui PATH [--cpu] [--prompts 100]
        [--results benchmarks/results/reliability_cpu.json] [--output OUT.json]
        [--warmup] [--probe [--tracemalloc]] [--trim]

Every prompt's output is checked against core alone: a prompt without the node, or with it,
must give the latent that core alone gives for the same models, seed and LoRA (bit for bit);
an A14B prompt loads a high-noise and a low-noise model (two files) and samples with each in
turn (KSamplerAdvanced's start/end steps, as the Wan 2.2 template does), the node on both;
an interrupted prompt must end interrupted and the next one work; a bad widget value must fail
that prompt with our message and leave the server serving. Host RSS, locked host memory and
the server's VRAM (NVML) are read at the start, after every 10 prompts and after each /free.

``--results`` adds the session to a results file shared by runs (``sessions``, one per core
and device; a rerun replaces its own), keeping whatever else the file holds. ``--warmup`` runs
each kind of prompt once before the start reading (one-time costs: lazily imported modules,
first-use caches). ``--probe`` adds where the memory is at each reading (anonymous and file
pages, glibc's heap in use and kept free, live CPU tensors, objects by type; ``--tracemalloc``:
Python allocations by source line since the start) from a test-only route in the server.
``--trim`` adds the RSS after glibc's malloc_trim(0) at each reading (see memory()).
``--static-reference`` (a dynamic-VRAM core on a GPU) checks node prompts with a LoRA against
core alone in a second server with static loading: [Note: LoRA under dynamic VRAM].
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from typing import Any, NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_server as cs  # noqa: E402

MODEL = "wan_session.safetensors"
HIGH = "wan22_session_high_noise.safetensors"  # Wan 2.2 A14B's two experts: two files
LOW = "wan22_session_low_noise.safetensors"
LORA = "wan_session_lora.safetensors"
AUTO = "auto (free VRAM now)"
CUSTOM = "custom (use the widgets)"
STEPS = 4
# An interrupted prompt samples longer, so the /interrupt lands mid-way: on the CPU 8 steps of
# the tiny model are time enough; on an H100 a whole prompt took about a second, and 17 of the
# 20 interrupts of two current-core sessions arrived after sampling had finished, all 3 of a
# legacy one too (reliability_h100.json, "missed"). With 64 steps a legacy session's three landed
# on an H100 in session 19; a current one's were still sent late, from a miscount of its bars
# (see _progress)
INTERRUPT_STEPS = {"cpu": 8, "gpu": 64}


class Step(NamedTuple):
    kind: str  # plain (core alone), node, interrupt, bad_widget
    model: str = "wan"  # "wan": one model; "a14b": the two experts, one after the other
    node: dict | tuple[dict, dict] | None = None  # widgets; for a14b one for both or (high, low)
    lora: bool = False  # on the model (on both experts)
    free_after: bool = False  # then /free


def _custom(**widgets: Any) -> dict:
    return {"preset": CUSTOM, **widgets}


# One cycle of 20 prompts, repeated: with the readings every 10 prompts, each reading of a
# cycle comes at the same point of the plan as in the other cycles (comparable readings).
PLAN: list[Step] = [
    Step("plain"),
    Step("node", node={"preset": AUTO}),
    Step("plain", "a14b"),
    Step("node", "a14b", _custom(blocks_to_swap=4)),
    Step("node", node=_custom(blocks_to_swap=4), lora=True),
    Step("plain", lora=True),
    Step("interrupt", node=_custom(blocks_to_swap=6)),
    Step("node", "a14b", _custom(blocks_to_swap=6, prefetch_blocks=2), lora=True),
    Step("plain", "a14b", lora=True),
    Step("bad_widget", node=_custom(blocks_to_swap=200)),
    Step("node", node=_custom(blocks_to_swap=6, prefetch_blocks=2), free_after=True),
    Step("node", node=_custom(blocks_to_swap=3, transfer_compression="on"), lora=True),
    Step("interrupt", "a14b", _custom(blocks_to_swap=4), lora=True),  # in the low-noise half
    Step("plain"),
    Step(
        "node", "a14b", ({"preset": AUTO}, _custom(blocks_to_swap=8, transfer_compression="auto"))
    ),
    Step("node", node={"preset": AUTO}, lora=True),
    Step("bad_widget", "a14b", (_custom(blocks_to_swap=4), _custom(blocks_to_swap=200))),
    Step("node", "a14b", _custom(blocks_to_swap=8)),
    Step("plain", lora=True),
    Step("plain"),
]


def warmup_plan() -> list[Step]:
    """Each kind of prompt of PLAN once (kind, model, LoRA, transfer compression)."""
    seen, steps = set(), []
    for step in PLAN:
        nodes = step.node if isinstance(step.node, tuple) else (step.node,)
        compression = any((n or {}).get("transfer_compression", "off") != "off" for n in nodes)
        key = (step.kind, step.model, step.lora, compression)
        if key not in seen:
            seen.add(key)
            steps.append(step._replace(free_after=False))
    return steps


def memory(server: cs.Server, probe: bool = False, trim: bool = False, **probe_args: Any) -> dict:
    """RSS, locked/pinned host memory and VRAM of the server (read from outside, as is, once
    its worker is idle); with ``probe``, where the memory is (the test route, after a GC);
    with ``trim``, then glibc's malloc_trim(0) and the RSS again: without the heap memory that
    is free but kept (glibc returns it to the system only where it lies at the heap's top, so
    the RSS as is swings with where the last chunks happen to lie)."""
    idle = server.wait_idle()
    pid = server.process.pid
    status = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmLck", "VmPin"):
                status[key] = int(value.split()[0]) * 1024
    reading: dict[str, Any] = {
        "rss_gib": round(status.get("VmRSS", 0) / cs.GIB, 4),
        "pinned_gib": round((status.get("VmLck", 0) + status.get("VmPin", 0)) / cs.GIB, 4),
        "vram_gib": round(cs.process_vram(pid) / cs.GIB, 4),
    }
    if not idle:
        reading["worker_busy"] = True  # read anyway, but not after the worker was done
    if probe or trim:
        report = server.memory_report(trim=trim, **probe_args)
        for holder, nbytes in report.get("pinned", {}).items():  # not in VmLck (CUDA's pins)
            reading[f"pinned_{holder}_gib"] = round(nbytes / cs.GIB, 4)
        if "heap" in report:
            reading["heap_in_use_gib"] = round(report["heap"].get("in_use", 0) / cs.GIB, 4)
        if "status_after_trim" in report:
            reading["rss_trimmed_gib"] = round(report["status_after_trim"]["VmRSS"] / cs.GIB, 4)
        if probe:
            reading["probe"] = report
    return reading


def _progress(text: str) -> tuple[int, int]:
    """How many sampler progress bars ``text`` (the server's log) started, and the step the
    last one reached. A bar starts at a 0/N mark after none or after a mark of another step:
    current core draws each bar's 0/N twice, the second time with "Model Initializing" after
    it (counted as two bars, every interrupt of a v0.33 session on an H100 was sent too late:
    comfyui_dynamic_h100/session19_session30_v033.json)."""
    marks = [(int(done), int(total)) for done, total in re.findall(r"(\d+)/(\d+) \[", text)]
    starts = sum(
        done == 0 and (index == 0 or marks[index - 1] != (done, total))
        for index, (done, total) in enumerate(marks)
    )
    return starts, (marks[-1][0] if marks else 0)


def interrupt_mid_sampling(server: cs.Server, bar: int) -> tuple[Any, dict]:
    """An ``on_running`` for Server.queue: /interrupt once the ``bar``-th sampler of the prompt
    has done a step (the second sampler: A14B's low-noise model); notes where it landed."""
    where: dict[str, Any] = {}
    start = os.path.getsize(server.log_path)  # before the prompt is queued

    def on_running(server: cs.Server) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and server.alive:
            with open(server.log_path, errors="replace") as handle:
                handle.seek(start)
                text = handle.read()
            bars, step = _progress(text)
            if bars > bar or "Prompt executed" in text:
                break  # too late: it ran past that sampler
            if bars == bar and step >= 1:
                server.interrupt()
                where["at"] = f"sampler {bar}, step {step}"
                return
            time.sleep(0.02)
        where["at"] = "missed"

    return on_running, where


def run(
    comfyui: str,
    workdir: str,
    prompts: int,
    cpu: bool,
    extra_args: tuple = (),
    warmup: bool = False,
    probe: bool = False,
    trace: bool = False,
    trim: bool = False,
    static_reference: bool = False,
) -> dict:
    # the probe's routes: readings wait for the worker to be idle (a /free done, say)
    server = cs.Server(
        comfyui, workdir, (("--cpu",) if cpu else ()) + tuple(extra_args), probe=True
    )
    probe = probe or trace
    dims = dict(dim=256, ffn_dim=512) if cpu else dict(dim=1536, ffn_dim=8960)  # Wan 1.3B widths
    blocks = 8
    cs.write_wan(os.path.join(server.models, MODEL), blocks, **dims)
    cs.write_wan(os.path.join(server.models, HIGH), blocks, seed=1, **dims)
    cs.write_wan(os.path.join(server.models, LOW), blocks, seed=2, **dims)
    cs.write_lora(os.path.join(server.loras, LORA), dims["dim"], dims["ffn_dim"], blocks=[1, 5, 7])
    frames, size = (5, (64, 64)) if cpu else (9, (320, 192))
    defaults = cs.node_defaults()
    events: list[dict] = []
    readings: list[dict] = []
    references: dict[tuple[str, int, bool], Any] = {}
    # [Note: LoRA under dynamic VRAM] core's dynamic VRAM applies a LoRA at each cast in the
    # compute dtype, and rounds it into the resident copy only once the layer stays resident,
    # so its outputs with a LoRA depend on residency; core's static loader (which loads the
    # node's private model) patches once and keeps the result in the model dtype, as the node
    # does ([Note: patched weights in the model dtype] in callbacks/comfy_private.py). Node
    # prompts with a LoRA are then checked against core alone in a --disable-dynamic-vram
    # server: the same kernels.
    static_refs: dict[tuple[str, int, bool], Any] = {}

    def prompt_for(step: Step, seed: int, prefix: str) -> dict:
        device = "cpu" if cpu else "gpu"
        steps = INTERRUPT_STEPS[device] if step.kind == "interrupt" else STEPS
        nodes = step.node if isinstance(step.node, tuple) else (step.node, step.node)
        high, low = (None if n is None else {**defaults, **n} for n in nodes)
        lora = (LORA, 0.8) if step.lora else None
        shape = dict(frames=frames, width=size[0], height=size[1], steps=steps, seed=seed)
        # cfg 1: one conditioning, no batching decision that depends on free VRAM
        if step.model == "a14b":
            return cs.wan22_a14b_workflow(
                HIGH, LOW, **shape, switch_step=steps // 2, cfg=1.0, node_high=high,
                node_low=low, lora=lora, prefix=prefix,
            )  # fmt: skip
        return cs.wan_workflow(MODEL, **shape, cfg=1.0, node=high, lora=lora, prefix=prefix)

    def latent(prefix: str) -> Any:
        return _latent(server, prefix)

    def play(step: Step, index: int, prefix: str) -> dict:
        seed = 1 + index % 2
        event: dict[str, Any] = {"index": index, "kind": step.kind, "model": step.model}
        event["lora"] = step.lora
        if step.node is not None:
            event["node"] = step.node
        started = time.time()
        if step.kind == "interrupt":
            on_running, where = interrupt_mid_sampling(server, 2 if step.model == "a14b" else 1)
            result = server.queue(prompt_for(step, seed, prefix), on_running=on_running)
            # it may have finished before the interrupt landed: either is correct
            event["ok"] = result["status"] in ("interrupted", "success")
            event["interrupted_at"] = where.get("at")
        elif step.kind == "bad_widget":
            result = server.queue(prompt_for(step, seed, prefix))
            # our message (BlockSwapConfigError), in the prompt's error, not core's validation
            event["ok"] = result["status"] == "error" and "BlockSwapConfigError" in result.get(
                "error", ""
            )
        else:
            result = server.queue(prompt_for(step, seed, prefix))
            out = latent(prefix) if result["status"] == "success" else None
            reference = references[(step.model, seed, step.lora)]
            if step.kind == "node" and step.lora and static_refs:
                reference = static_refs[(step.model, seed, step.lora)]
                event["reference"] = "core alone, static loading"
            event["ok"] = out is not None and bool((out == reference).all())
            if out is not None and not event["ok"]:
                event["max_abs_diff"] = (out.float() - reference.float()).abs().max().item()
        event["status"] = result["status"]
        if result.get("error"):
            event["error"] = result["error"][:300]
        event["seconds"] = round(time.time() - started, 2)
        if not server.alive:
            event["ok"] = False
            event["crashed"] = True
        return event

    started = time.time()
    if static_reference:
        static_refs.update(_static_references(comfyui, workdir, server, prompt_for))
    with server:
        # core alone first: the outputs every later prompt must give
        references.update(_core_alone(server, prompt_for, "ref"))
        warmup_events = []
        if warmup:
            for index, step in enumerate(warmup_plan()):
                warmup_events.append(play(step, index, f"w{index}"))
        server.free()
        readings.append(
            {"after": "start", **memory(server, probe, trim, start=True, tracemalloc=trace)}
        )
        session_started = time.time()
        for index in range(prompts):
            step = PLAN[index % len(PLAN)]
            events.append(play(step, index, f"p{index}"))
            if not server.alive:
                break
            if step.free_after:
                server.free()
                readings.append(
                    {"after": f"free after {index + 1} prompts", **memory(server, probe, trim)}
                )
            if (index + 1) % 10 == 0:
                readings.append({"after": f"{index + 1} prompts", **memory(server, probe, trim)})
        if server.alive:
            server.free()
            readings.append({"after": "free", **memory(server, probe, trim)})
        session_seconds = time.time() - session_started
    start, end = readings[0], readings[-1]
    dynamic_vs_static = {
        f"{model} seed {seed}{' lora' if lora else ''}": (
            (references[key].float() - static_refs[key].float()).abs().max().item()
        )
        for key in static_refs
        for model, seed, lora in [key]
    }
    failed = [e for e in warmup_events + events if not e["ok"]]
    return {
        "prompts": len(events),
        "failures": len(failed),
        "failed": failed,
        "memory": readings,
        "rss_after_free_vs_start": round(end["rss_gib"] / max(start["rss_gib"], 1e-9), 4),
        **(
            {
                "rss_trimmed_after_free_vs_start": round(
                    end["rss_trimmed_gib"] / start["rss_trimmed_gib"], 4
                ),
                "heap_in_use_after_free_vs_start": round(
                    end["heap_in_use_gib"] / start["heap_in_use_gib"], 4
                ),
            }
            if trim
            else {}
        ),
        **({"core_dynamic_vs_static_max_abs_diff": dynamic_vs_static} if static_refs else {}),
        "warmup": [e["kind"] + ("/" + e["model"]) for e in warmup_events] if warmup else None,
        "seconds": round(time.time() - started, 1),  # references and warm-up included
        "session_seconds": round(session_seconds, 1),
        "events": events,
        "warmup_events": warmup_events,
    }


def _latent(server: cs.Server, prefix: str) -> Any:
    from safetensors.torch import load_file

    path = cs.latest_latent(server, prefix)
    return None if path is None else load_file(path)["latent_tensor"]


def _static_references(comfyui: str, workdir: str, source: cs.Server, prompt_for: Any) -> dict:
    """Core alone's outputs with static loading (``--disable-dynamic-vram``), from the same
    files: see [Note: LoRA under dynamic VRAM]. The same warm-up and prompts as the session's
    own references."""
    import shutil

    server = cs.Server(
        comfyui,
        os.path.join(workdir, "static"),
        source.args + ("--disable-dynamic-vram",),
        probe=True,
    )
    for folder, target in ((source.models, server.models), (source.loras, server.loras)):
        os.makedirs(target, exist_ok=True)
        for name in os.listdir(folder):
            shutil.copy(os.path.join(folder, name), os.path.join(target, name))
    with server:
        return _core_alone(server, prompt_for, "static")


def _core_alone(server: cs.Server, prompt_for: Any, label: str) -> dict:
    """Core alone's latents for every model, seed and LoRA the session uses. A warm-up prompt
    first: on a GPU, core's very first prompt after start came out a little different from
    later ones (dynamic VRAM, H200: up to 0.012 at cfg 1)."""
    server.queue(prompt_for(Step("plain"), 999, "warmup"))
    refs = {}
    for model in ("wan", "a14b"):
        for seed in (1, 2):
            for lora in (False, True):
                prefix = f"{label}_{model}_{seed}_{int(lora)}"
                result = server.queue(prompt_for(Step("plain", model, lora=lora), seed, prefix))
                assert result["status"] == "success", result
                refs[(model, seed, lora)] = _latent(server, prefix)
    return refs


def cpu_name() -> str:
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def add_session(path: str, session: dict, device: str, torch_version: str) -> None:
    """Put ``session`` into the results file at ``path`` (``sessions``: one per core and
    device, a rerun replacing its own), keeping the file's other fields."""
    data: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as handle:
            data = json.load(handle)
    data.setdefault("device", device)
    data.setdefault("torch", torch_version)
    sessions = [
        s
        for s in data.get("sessions", [])
        if (s.get("core"), s.get("device")) != (session["core"], session["device"])
    ]
    data["sessions"] = sessions + [session]
    with open(path, "w") as handle:
        json.dump(data, handle, indent=2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--output", default=None, help="write this session alone here")
    parser.add_argument("--results", default=None, help="add this session to this file")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--warmup", action="store_true")
    parser.add_argument("--probe", action="store_true")
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--trim", action="store_true", help="RSS after malloc_trim(0) too")
    parser.add_argument("--core", default=None, help="a label for the core (default: its path)")
    parser.add_argument("--keep-log", default=None, help="copy the server's log here")
    parser.add_argument("--server-arg", action="append", default=[], help="passed to main.py")
    parser.add_argument(
        "--static-reference",
        action="store_true",
        help="check node prompts with a LoRA against core alone with static loading "
        "(a second server with --disable-dynamic-vram): see [Note: LoRA under dynamic VRAM]",
    )
    args = parser.parse_args()
    if not (args.output or args.results):
        parser.error("give --output, --results or both")
    import torch

    with tempfile.TemporaryDirectory() as workdir:
        try:
            result = run(
                args.comfyui, workdir, args.prompts, args.cpu, tuple(args.server_arg),
                warmup=args.warmup, probe=args.probe, trace=args.tracemalloc, trim=args.trim,
                static_reference=args.static_reference,
            )  # fmt: skip
        finally:
            if args.keep_log:
                import shutil

                shutil.copy(os.path.join(workdir, "server.log"), args.keep_log)
    device = f"cpu ({cpu_name()})" if args.cpu else torch.cuda.get_device_name(0)
    session = {
        "core": args.core or os.path.basename(os.path.abspath(args.comfyui)),
        "device": device,
        "torch": torch.__version__,
        "server_args": (["--cpu"] if args.cpu else []) + args.server_arg,
        **result,
    }
    if args.output:
        with open(args.output, "w") as handle:
            json.dump(session, handle, indent=2)
    if args.results:
        add_session(args.results, session, device, torch.__version__)
    brief = {k: v for k, v in session.items() if k not in ("events", "warmup_events")}
    brief["memory"] = [{k: v for k, v in r.items() if k != "probe"} for r in brief["memory"]]
    print(json.dumps(brief, indent=2))
    return 0 if result["failures"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
