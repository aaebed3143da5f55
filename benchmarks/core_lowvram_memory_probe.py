"""Where core's memory peaks at a 0% weight budget: per large leaf layer, the memory
allocated when it starts and the peak while it runs, for core lowvram (each weight cast to
the GPU inside the layer's forward) and for the model fully loaded (activations only).

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/core_lowvram_memory_probe.py

Writes ``benchmarks/results/core_lowvram_memory_<gpu>.json``.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfyui_benchmark import (  # noqa: E402
    DIM,
    FFN,
    ROOT,
    build_patcher,
    forward,
    import_comfy,
    make_inputs,
    pin_host_weights,
)

MIB = 2**20


def leaf_profile(module: torch.nn.Module, run, device) -> list[dict]:
    """Run once with hooks on every leaf holding at least 1 MiB."""
    rows: list[dict] = []
    hooks = []
    for name, leaf in module.named_modules():
        nbytes = sum(p.numel() * p.element_size() for p in leaf.parameters(recurse=False))
        if leaf._modules or nbytes < MIB:
            continue

        def pre(_m, _a, name=name, nbytes=nbytes):
            torch.cuda.synchronize(device)
            rows.append({"leaf": name, "weight_mib": nbytes / MIB})
            rows[-1]["allocated_before_mib"] = torch.cuda.memory_allocated(device) / MIB
            torch.cuda.reset_peak_memory_stats(device)

        def post(_m, _a, _o):
            torch.cuda.synchronize(device)
            rows[-1]["peak_during_mib"] = torch.cuda.max_memory_allocated(device) / MIB

        hooks.append(leaf.register_forward_pre_hook(pre))
        hooks.append(leaf.register_forward_hook(post))
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return rows


def main() -> None:
    comfy = import_comfy()
    device = comfy.model_management.get_torch_device()
    patcher = build_patcher(comfy, 8, DIM, FFN)
    pin_host_weights(patcher.model.diffusion_model)
    results = {"device": torch.cuda.get_device_name(device), "rows": {}}
    for tokens in (1560, 32760):
        inputs = make_inputs(tokens, device)
        for label, budget in (("core_full", 0), ("core_lowvram_0", 1)):
            with torch.inference_mode():
                patcher.patch_model(device, lowvram_model_memory=budget, load_weights=True)
            forward(patcher, inputs)  # warm-up
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device) / MIB
            rows = leaf_profile(
                patcher.model.diffusion_model, lambda: forward(patcher, inputs), device
            )
            results["rows"][f"{label}_{tokens}"] = {"allocated_at_start_mib": base, "leaves": rows}
            patcher.unpatch_model(patcher.offload_device, unpatch_weights=True)
            torch.cuda.empty_cache()
            top = max(rows, key=lambda r: r["peak_during_mib"])
            print(label, tokens, f"base {base:.0f} MiB, top {top}", flush=True)
    short = results["device"].lower().replace("nvidia ", "").split()[0]
    out = os.path.join(ROOT, "benchmarks", "results", f"core_lowvram_memory_{short}.json")
    with open(out, "w") as handle:
        json.dump(results, handle, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
