"""Where a Wan-14B forward's VRAM goes beside its weights, in core's own model code.

    python benchmarks/activation_peak_probe.py --comfyui PATH --output OUT.json [--frames 81]

One WanModel of core (``comfy/ldm/wan/model.py``) with Wan-14B widths and ``--layers``
blocks, fp16 on the GPU, random weights, one forward at 832x480 and ``--frames`` frames
(batch 1, as core runs each conditioning when VRAM is short). For the forward and for each
submodule of the first block: the peak of torch's allocations above what was allocated when it
started. Then the same forward with the FFN applied to ``--ffn-chunks`` slices of the tokens
(an option this probe tries, not one the product has), its peak, and whether its output equals
the plain forward's bit for bit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import torch

GIB = 2**30


def build(layers: int) -> Any:
    import comfy.ldm.wan.model as wan
    import comfy.ops

    model = wan.WanModel(
        dim=5120,
        ffn_dim=13824,
        num_heads=40,
        num_layers=layers,
        text_dim=4096,
        device="cuda",
        dtype=torch.float16,
        operations=comfy.ops.disable_weight_init,
    )
    gen = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if tensor.is_floating_point():
                tensor.normal_(0, 0.02, generator=gen)
    return model.eval()


def inputs(frames: int, width: int, height: int) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(1)
    latent_frames = (frames - 1) // 4 + 1
    shape = (1, 16, latent_frames, height // 8, width // 8)
    return dict(
        x=torch.randn(shape, generator=gen, device="cuda", dtype=torch.float16),
        timestep=torch.tensor([500.0], device="cuda"),
        context=torch.randn((1, 512, 4096), generator=gen, device="cuda", dtype=torch.float16),
    )


def peaks_of(model: Any, args: dict) -> tuple[torch.Tensor, dict, int]:
    """The forward's output, the peak of each first-block submodule above what was
    allocated when the block started, and the whole forward's peak above its start."""
    absolute: dict[str, int] = {}
    block = model.blocks[0]
    block_start: dict[str, int] = {}
    hooks = [
        block.register_forward_pre_hook(
            lambda m, a: block_start.update(allocated=torch.cuda.memory_allocated())
        )
    ]
    for name, module in block.named_children():

        def pre(module: Any, inputs: Any) -> None:
            torch.cuda.reset_peak_memory_stats()

        def post(module: Any, inputs: Any, output: Any, name: str = name) -> None:
            absolute[name] = max(absolute.get(name, 0), torch.cuda.max_memory_allocated())

        hooks.append(module.register_forward_pre_hook(pre))
        hooks.append(module.register_forward_hook(post))
    with torch.inference_mode():
        out = model(**args)
    torch.cuda.synchronize()
    for hook in hooks:
        hook.remove()
    found = {name: peak - block_start["allocated"] for name, peak in absolute.items()}
    found["block (largest of its parts)"] = max(found.values())
    # the hooks reset the peak counter, so the whole forward's peak needs a forward of its own
    _, whole = whole_peak(model, args)
    return out, found, whole


def whole_peak(model: Any, args: dict) -> tuple[torch.Tensor, int]:
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        out = model(**args)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated() - before


def chunk_ffn(model: Any, chunks: int) -> None:
    """Each block's FFN on ``chunks`` slices of the tokens, written into one output."""
    for block in model.blocks:
        ffn = block.ffn
        plain = ffn.forward

        def forward(x: torch.Tensor, plain: Any = plain) -> torch.Tensor:
            out = None
            for part in torch.tensor_split(torch.arange(x.shape[1]), chunks):
                y = plain(x[:, part[0] : part[-1] + 1])
                if out is None:
                    out = torch.empty((*x.shape[:-1], y.shape[-1]), dtype=y.dtype, device=y.device)
                out[:, part[0] : part[-1] + 1] = y
            return out

        ffn.forward = forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", default=os.environ.get("COMFYUI_PATH"))
    parser.add_argument("--output", required=True)
    parser.add_argument("--frames", type=int, nargs="+", default=[81])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ffn-chunks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--size", type=int, nargs=2, default=[832, 480])
    args = parser.parse_args()
    sys.path.insert(0, args.comfyui)
    started = time.time()
    model = build(args.layers)
    weights = torch.cuda.memory_allocated()
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "core": args.comfyui,
        "model": f"core WanModel, dim 5120, ffn 13824, 40 heads, {args.layers} blocks, fp16",
        "weights_gib": round(weights / GIB, 3),
        "rows": [],
    }
    for frames in args.frames:
        data = inputs(frames, *args.size)
        whole_peak(model, data)  # warm-up: kernels, workspaces
        plain, parts, whole = peaks_of(model, data)
        row: dict[str, Any] = {
            "frames": frames,
            "tokens": int(data["x"].shape[2] * data["x"].shape[3] * data["x"].shape[4] / 4),
            "forward_peak_gib": round(whole / GIB, 3),
            "first_block_peaks_gib": {k: round(v / GIB, 3) for k, v in parts.items()},
            "ffn_chunked": [],
        }
        for chunks in args.ffn_chunks:
            chunk_ffn(model, chunks)
            out, peak = whole_peak(model, data)
            row["ffn_chunked"].append(
                {
                    "chunks": chunks,
                    "forward_peak_gib": round(peak / GIB, 3),
                    "equal_output": bool(torch.equal(out, plain)),
                    "max_abs_diff": (out.float() - plain.float()).abs().max().item(),
                }
            )
            for block in model.blocks:  # back to the plain FFN
                del block.ffn.forward
        result["rows"].append(row)
        print(json.dumps(row), flush=True)
    result["seconds"] = round(time.time() - started, 1)
    with open(args.output, "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
