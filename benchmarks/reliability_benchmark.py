"""Reliability on a GPU: a soak (100 forwards, 20 apply/remove and 10 load/unload cycles, 10
loads dropped without remove; with transfer compression 100 forwards, 10 apply/remove cycles
in auto mode and 5 compressed loads; streamed layer by layer 100 forwards and 10 apply/remove
cycles) with memory before and after, injected faults (slot OOM,
placement OOM, exceptions mid-forward, two models alternating, double apply) checked for
survival and correct output afterwards, and the bad-file corpus. Writes benchmarks/results/reliability_<gpu>.json.

    python benchmarks/reliability_benchmark.py [--output FILE]
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import wan_shapes  # noqa: E402

from comfyui_wan_blockswap.callbacks.checkpoint import (
    CheckpointError,
    open_checkpoint,
)  # noqa: E402
from comfyui_wan_blockswap.callbacks.lazy_loader import load_swapped  # noqa: E402
from writers import random_state, write_safetensors  # noqa: E402
from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap import (  # noqa: E402
    BlockSwapStateError,
    InsufficientMemoryError,
    apply_block_swap,
    min_vram_budget_gb,
    registered_host_bytes,
)
from comfyui_wan_blockswap.wan_blockswap.measure import rss_bytes  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.storage import return_freed_host_memory  # noqa: E402

GIB = 2**30
DIM, FFN, BLOCKS = 3072, 8192, 8  # Wan 2.2 5B-wide blocks: large enough for leaks to show


def memory(device) -> dict:
    """Host and device memory now. RSS twice: as read, then after ``malloc_trim(0)``: glibc
    keeps freed heap pages (the compressed cycles' packed buffers are malloc'd) and gives them
    back only when trimmed, so the first reading holds memory nothing of ours holds any more.
    Trimming here also trims for every later reading: each pass starts from a trimmed heap."""
    gc.collect()
    torch.cuda.synchronize(device)
    as_read = rss_bytes() / GIB
    return_freed_host_memory()
    return {
        "rss_gib": as_read,
        "rss_trimmed_gib": rss_bytes() / GIB,
        "pinned_gib": registered_host_bytes() / GIB,
        "cuda_gib": torch.cuda.memory_allocated(device) / GIB,
        "slots_gib": pooled_bytes() / GIB,
    }


SOAK_BAR = 1.01  # host RSS after a measured soak pass / before it


def soak_bar(baseline: dict, after: dict, later: list[dict]) -> dict:
    """The soak's RSS bar, as read and after malloc_trim, for the measured pass and each
    further one (a leak grows every pass; glibc's kept heap does not)."""
    ratio = {key: after[key] / baseline[key] for key in ("rss_gib", "rss_trimmed_gib")}
    return {
        "bar": f"host RSS after the measured soak pass within {SOAK_BAR - 1:.0%} of before it",
        "as_read": round(ratio["rss_gib"], 4),
        "trimmed": round(ratio["rss_trimmed_gib"], 4),
        "as_read_each_extra_pass": [round(m["rss_gib"] / baseline["rss_gib"], 4) for m in later],
        "trimmed_each_extra_pass": [
            round(m["rss_trimmed_gib"] / baseline["rss_trimmed_gib"], 4) for m in later
        ],
        "met_as_read": ratio["rss_gib"] <= SOAK_BAR,
        "met_trimmed": ratio["rss_trimmed_gib"] <= SOAK_BAR,
        "pinned_and_cuda_back": after["pinned_gib"] <= baseline["pinned_gib"]
        and after["cuda_gib"] <= baseline["cuda_gib"],
    }


def forward(model, x):
    with torch.inference_mode():
        return model(**x)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output")
    parser.add_argument("--extra-passes", type=int, default=1)
    args = parser.parse_args()
    device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device)
    overrides = dict(num_attention_heads=DIM // 128, ffn_dim=FFN)
    state = wan_shapes.random_state_dict(BLOCKS, **overrides)
    reference = wan_shapes.model_from(state, BLOCKS, **overrides).to(device)
    x = wan_shapes.inputs(1560, device)
    expected = forward(reference, x)
    model = wan_shapes.model_from(state, BLOCKS, **overrides)
    # ``model`` shares the state's memory; with a second reference to the weights, the first
    # remove() (which restores into fresh memory) would look like 2 GiB of growth.
    del state
    folder = tempfile.mkdtemp()
    path = os.path.join(folder, "wan.safetensors")
    write_safetensors(random_state(comfy_state_shapes(DIM, FFN, BLOCKS)), path)

    def soak() -> tuple[bool, dict]:
        """100 forwards, 20 apply/remove cycles with varied options, compressed cycles, 10
        load/unload cycles."""
        phases = {}
        swap = apply_block_swap(model, device=device, blocks_to_swap=6)
        equal = all(torch.equal(forward(model, x), expected) for _ in range(100))
        swap.remove()
        phases["after_100_forwards"] = memory(device)
        for cycle in range(20):
            swap = apply_block_swap(
                model, device=device, blocks_to_swap=1 + cycle % 8, prefetch_blocks=cycle % 3
            )
            equal &= torch.equal(forward(model, x), expected)
            swap.remove()
        phases["after_20_apply_remove"] = memory(device)
        swap = apply_block_swap(model, device=device, blocks_to_swap=6, transfer_compression=True)
        equal &= all(torch.equal(forward(model, x), expected) for _ in range(100))
        swap.remove()
        for cycle in range(10):  # auto decides at the third forward: switch or keep, then remove
            swap = apply_block_swap(
                model, device=device, blocks_to_swap=2 + cycle % 6, transfer_compression="auto"
            )
            equal &= all(torch.equal(forward(model, x), expected) for _ in range(4))
            swap.remove()
        for _ in range(5):
            lazy, lazy_swap, _ = load_swapped(
                path, device=device, blocks_to_swap=6, transfer_compression=True
            )
            forward(lazy, x)
            lazy_swap.remove(restore=False)
            del lazy
        phases["after_compressed_cycles"] = memory(device)
        floor = min_vram_budget_gb(model)
        swap = apply_block_swap(model, device=device, vram_budget_gb=floor + 0.1)
        equal &= all(torch.equal(forward(model, x), expected) for _ in range(100))
        swap.remove()
        for cycle in range(10):  # streamed: every layer in memory of its own, windows varied
            swap = apply_block_swap(
                model,
                device=device,
                vram_budget_gb=floor + 0.05 * cycle,
                transfer_compression=bool(cycle % 2),
            )
            equal &= all(torch.equal(forward(model, x), expected) for _ in range(3))
            swap.remove()
        phases["after_streamed_cycles"] = memory(device)
        for _ in range(10):
            lazy, lazy_swap, _ = load_swapped(path, device=device, blocks_to_swap=6)
            forward(lazy, x)
            lazy_swap.remove(restore=False)
            del lazy
            phases.setdefault("load_unload_rss_gib", []).append(rss_bytes() / GIB)
        for _ in range(10):  # dropped without remove(), as ComfyUI drops a replaced model
            lazy, lazy_swap, _ = load_swapped(path, device=device, blocks_to_swap=6)
            forward(lazy, x)
            del lazy, lazy_swap
            gc.collect()
        phases["after_10_load_drop"] = memory(device)
        return equal, phases

    # The first pass pays one-time costs (CUDA's lazily loaded kernels for each new code
    # path, allocator pools, cuBLAS handles); it is recorded, then the same soak is measured.
    started = time.perf_counter()
    first_before = memory(device)
    first_equal, first_phases = soak()
    first_after = memory(device)
    baseline = memory(device)
    soak_equal, phases = soak()
    after = memory(device)
    soak_equal &= first_equal
    pass_s = (time.perf_counter() - started) / 2
    print(json.dumps({"baseline": baseline, "after": after, "pass_s": round(pass_s, 1)}))
    # Further passes tell a per-pass leak (grows every pass) from late one-time costs.
    later = []
    for _ in range(args.extra_passes):
        equal, _ = soak()
        soak_equal &= equal
        later.append(memory(device))
        print(json.dumps({"extra_pass": later[-1]}), flush=True)
    # Diagnosis only: how much of any growth is freed heap that glibc has not returned yet.
    return_freed_host_memory()
    phases["rss_gib_after_malloc_trim"] = rss_bytes() / GIB

    faults = []

    def fault(label, inject):
        swap = apply_block_swap(model, device=device, blocks_to_swap=6, prefetch_blocks=1)
        try:
            survived = bool(inject(swap))
        except Exception as error:  # a fault that escapes is a failure, recorded
            survived = False
            print(f"{label}: {error!r}")
        correct = torch.equal(forward(model, x), expected)
        swap.remove()
        faults.append({"name": label, "survived": survived, "output_correct": bool(correct)})

    def slot_oom(swap):
        swap.release_vram()
        torch.cuda.empty_cache()  # else the freed slots' cached blocks satisfy the next try
        used = torch.cuda.memory_reserved(device)
        total = torch.cuda.get_device_properties(device).total_memory
        # room for the activations but not for two block slots
        headroom = swap.plan.slot_bytes * 3 // 2
        torch.cuda.set_per_process_memory_fraction((used + headroom) / total, device)
        try:
            forward(model, x)
            return False
        except InsufficientMemoryError:
            return True
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)

    def exception_mid_forward(swap):
        handle = model.blocks[4].ffn.register_forward_pre_hook(lambda m, a: 1 / 0)
        try:
            forward(model, x)
        except ZeroDivisionError:
            pass
        handle.remove()
        return not swap.scheduler.in_use

    def double_apply(swap):
        try:
            apply_block_swap(model, device=device, blocks_to_swap=2)
        except BlockSwapStateError:
            return True
        return False

    fault("slot allocation out of memory", slot_oom)
    fault("exception inside a block mid-forward", exception_mid_forward)
    fault("applying twice", double_apply)
    fault(
        "100 forwards with fresh inputs",
        lambda s: all(
            torch.isfinite(forward(model, wan_shapes.inputs(1560, device, seed=i))).all()
            for i in range(100)
        ),
    )

    bad = sorted(glob.glob(os.path.join(ROOT, "tests", "data", "bad_checkpoints", "*")))
    bad = [p for p in bad if not p.endswith(".json")]
    rejected = 0
    for bad_path in bad:
        try:
            with open_checkpoint(bad_path) as checkpoint:
                for record in checkpoint.records:
                    checkpoint.read(record)
        except CheckpointError:
            rejected += 1
        except Exception as error:
            print(f"{bad_path}: {error!r}")

    results = {
        "device": name,
        "torch": torch.__version__,
        "model": f"diffusers Wan, {BLOCKS} blocks of dim {DIM}, bf16",
        "soak": {
            "baseline": baseline,
            "after": after,
            "outputs_equal": bool(soak_equal),
            "first_pass": {"before": first_before, "after": first_after, "phases": first_phases},
            "after_each_extra_pass": later,
            "forwards": 100 + 20 + 100 + 40 + 5 + 10,
            "apply_remove_cycles": 20 + 1 + 10,
            "load_unload_cycles": 10 + 5,
            "phases": phases,
        },
        "soak_bar": soak_bar(baseline, after, later),
        "faults": faults,
        "bad_inputs": {"tried": len(bad), "rejected_cleanly": rejected},
        "seconds_per_soak_pass": round(pass_s, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    short = name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(ROOT, "benchmarks", "results", f"reliability_{short}.json")
    with open(output, "w") as handle:
        json.dump(results, handle, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
