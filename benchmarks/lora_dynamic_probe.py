"""Which weights a LoRA'd Wan layer computes with: core alone and through WAN BlockSwap, in a
dynamic-VRAM server and a static one.

The 100-prompt session found node prompts with a LoRA a little away (0.010-0.012 in the latent)
from core alone under dynamic VRAM, and from core alone with static loading too, while the same
prompts in a static server are bit-identical to core. This finds where: a probe node loads
the MODEL it gets as KSampler would (``load_models_gpu``) and saves, for LoRA'd layers the node
keeps on the GPU, the weight stored on the layer and the weight its forward casts
(``comfy.ops.cast_bias_weight``), with what the layer and its patcher carry. Then the three
arms are compared bit for bit:

- ``core_dynamic``: UNETLoader -> LoRA -> probe, dynamic VRAM (the GPU's default);
- ``ours_dynamic``: UNETLoader -> LoRA -> WAN BlockSwap -> probe, the same server;
- ``core_static``: UNETLoader -> LoRA -> probe, a ``--disable-dynamic-vram`` server;
- ``ours_static``: the node in that server.

``--cpu`` runs the static server alone on the CPU (dynamic VRAM is GPU-only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_server as cs  # noqa: E402

MODEL, LORA = "wan_probe.safetensors", "probe_lora.safetensors"
# the node swaps 3 of 8 blocks, spread (1, 4 and 7, as the session's 3-block prompt): 5 stays
# on the GPU, 1 is swapped (its layer holds a placeholder outside the forward)
BLOCKS, LORA_BLOCKS, SWAPPED = 8, [1, 5, 7], 3
KEYS = [
    f"diffusion_model.blocks.{b}.{name}.weight"
    for b in (5, 1)
    for name in ("self_attn.q", "self_attn.o", "ffn.2")
]

_PROBE_NODE = r"""
import json
import os

import torch
from safetensors.torch import save_file

import comfy.model_management as mm
import comfy.ops
import comfy.utils

KEYS = %(keys)r


def _patch_summary(patches):
    out = []
    for patch in patches or []:
        strength, value = patch[0], patch[1]
        inner = getattr(value, "weights", value)
        tensors = [t for t in (inner if isinstance(inner, (tuple, list)) else [inner])
                   if isinstance(t, torch.Tensor)]
        out.append({"strength": strength, "kind": type(value).__name__,
                    "tensors": [[str(t.dtype), str(t.device)] for t in tensors]})
    return out


class LoraWeightProbe:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "label": ("STRING", {"default": "probe"})}}

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "probe"
    CATEGORY = "testing"

    def probe(self, model, label):
        out_dir = os.environ["LORA_PROBE_DIR"]
        mm.load_models_gpu([model])
        device = model.load_device
        info = {
            "patcher": type(model).__name__,
            "dynamic": bool(getattr(model, "is_dynamic", lambda: False)()),
            # (older cores have no such choice: fp32)
            "lora_compute_dtype": str(getattr(mm, "lora_compute_dtype", lambda d: "fp32")(device)),
            "keys": {},
        }
        tensors = {}
        root = model.model.diffusion_model
        for key in KEYS:
            module = comfy.utils.get_attr(root, key[len("diffusion_model."):-len(".weight")])
            weight = module.weight
            record = {
                "module": type(module).__module__ + "." + type(module).__qualname__,
                "weight": None if weight is None else [str(weight.dtype), str(weight.device),
                                                        weight.numel()],
                "comfy_cast_weights": getattr(module, "comfy_cast_weights", None),
                "weight_function": [type(f).__name__ for f in getattr(module, "weight_function", [])],
                "has_v": hasattr(module, "_v"),
                "patches": _patch_summary(model.patches.get(key)),
                "backup": key in getattr(model, "backup", {}),
            }
            if weight is not None and weight.numel():
                tensors[key + ".stored"] = weight.detach().to("cpu").contiguous().clone()
            x = torch.zeros(1, module.in_features, device=device, dtype=torch.bfloat16)
            uncast = getattr(comfy.ops, "uncast_bias_weight", None)
            try:
                if uncast is not None:
                    w, b, stream = comfy.ops.cast_bias_weight(module, x, offloadable=True)
                else:  # an older core: no offloaded casts
                    w, b = comfy.ops.cast_bias_weight(module, x)
                tensors[key + ".cast"] = w.detach().to("cpu").contiguous().clone()
                if uncast is not None:
                    uncast(module, w, b, stream)
            except Exception as error:
                record["cast_error"] = repr(error)
            info["keys"][key] = record
        save_file(tensors, os.path.join(out_dir, label + ".safetensors"))
        with open(os.path.join(out_dir, label + ".json"), "w") as handle:
            json.dump(info, handle, indent=1, default=str)
        return {}


NODE_CLASS_MAPPINGS = {"LoraWeightProbe": LoraWeightProbe}
"""


def prompt(label: str, node: dict | None) -> dict:
    graph: dict[str, Any] = {
        "1": cs.unet_loader(MODEL),
        "2": {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": ["1", 0], "lora_name": LORA, "strength_model": 0.8},
        },
    }
    model = ["2", 0]
    if node is not None:
        graph["3"] = {"class_type": "WanBlockSwapStream", "inputs": {"model": model, **node}}
        model = ["3", 0]
    graph["9"] = {"class_type": "LoraWeightProbe", "inputs": {"model": model, "label": label}}
    return graph


def run_server(comfyui: str, workdir: str, args: tuple, arms: dict, out_dir: str) -> dict:
    server = cs.Server(comfyui, workdir, args, env={"LORA_PROBE_DIR": out_dir})
    node_dir = os.path.join(server.base, "custom_nodes", "lora_weight_probe")
    os.makedirs(node_dir, exist_ok=True)
    with open(os.path.join(node_dir, "__init__.py"), "w") as handle:
        handle.write(_PROBE_NODE % {"keys": KEYS})
    cpu = "--cpu" in args
    dims = dict(dim=256, ffn_dim=512) if cpu else dict(dim=1536, ffn_dim=8960)
    cs.write_wan(os.path.join(server.models, MODEL), BLOCKS, **dims)
    cs.write_lora(os.path.join(server.loras, LORA), dims["dim"], dims["ffn_dim"], LORA_BLOCKS)
    statuses = {}
    with server:
        for label, node in arms.items():
            result = server.queue(prompt(label, node))
            statuses[label] = {"status": result["status"], "error": result.get("error", "")[:2000]}
    return statuses


def compare(out_dir: str, labels: list[str]) -> dict:
    from safetensors.torch import load_file

    loaded = {
        label: load_file(os.path.join(out_dir, label + ".safetensors"))
        for label in labels
        if os.path.exists(os.path.join(out_dir, label + ".safetensors"))
    }
    out: dict[str, Any] = {}
    for i, a in enumerate(loaded):
        for b in list(loaded)[i + 1 :]:
            pair = {}
            for name in sorted(set(loaded[a]) | set(loaded[b])):
                left, right = loaded[a].get(name), loaded[b].get(name)
                if left is None or right is None:
                    continue
                if left.shape != right.shape:
                    pair[name] = f"shapes {list(left.shape)} and {list(right.shape)}"
                    continue
                pair[name] = (
                    "equal"
                    if torch_equal(left, right)
                    else f"differs: max {(left.float() - right.float()).abs().max().item():.3g}"
                )
            # each arm's cast weight against every other's stored or cast one
            for key in KEYS:
                for x in ("stored", "cast"):
                    for y in ("stored", "cast"):
                        left = loaded[a].get(f"{key}.{x}")
                        right = loaded[b].get(f"{key}.{y}")
                        if x != y and left is not None and right is not None:
                            pair[f"{key} {a}.{x} vs {b}.{y}"] = (
                                "equal" if torch_equal(left, right) else "differs"
                            )
            out[f"{a} vs {b}"] = pair
    return out


def torch_equal(a: Any, b: Any) -> bool:
    import torch

    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--output", required=True)
    args = parser.parse_args(argv)
    node = {**cs.node_defaults(), "preset": "custom (use the widgets)"}
    node["blocks_to_swap"] = SWAPPED
    arms_here = {"core": None, "ours": node}
    result: dict[str, Any] = {"keys": KEYS, "lora_blocks": LORA_BLOCKS, "swapped": SWAPPED}
    with tempfile.TemporaryDirectory() as workdir:
        out_dir = os.path.join(workdir, "probe")
        os.makedirs(out_dir)
        servers = {"static": ("--disable-dynamic-vram",)}
        if args.cpu:
            servers = {"static": ("--cpu",)}
        else:
            servers = {"dynamic": (), **servers}
        labels = []
        for kind, server_args in servers.items():
            arms = {f"{name}_{kind}": n for name, n in arms_here.items()}
            labels += list(arms)
            result[f"{kind}_statuses"] = run_server(
                args.comfyui, os.path.join(workdir, kind), server_args, arms, out_dir
            )
        result["layers"] = {
            label: json.load(open(os.path.join(out_dir, label + ".json")))
            for label in labels
            if os.path.exists(os.path.join(out_dir, label + ".json"))
        }
        result["comparisons"] = compare(out_dir, labels)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=1)
    for pair, entries in result["comparisons"].items():
        print(pair)
        for name, verdict in entries.items():
            print("   ", name, verdict)
    return 0


if __name__ == "__main__":
    sys.exit(main())
