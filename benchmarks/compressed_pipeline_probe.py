"""Does lossless transfer compression pay off inside a streaming pipeline? A probe, not engine
code: it streams the 80 projections of 8 Wan-14B blocks (64 attention 5120x5120, 16 FFN
13824x5120, bf16, 5.3 GiB) through two GPU slots, one matmul per projection on the compute
stream, and compares per-forward time:

- ``raw``: each projection copied into its slot (what the engine does today);
- ``packed_eager`` / ``packed_fused``: 1.5 bytes per weight copied into one of two staging
  buffers, decoded into the slot on a third stream (eager torch ops, or one fused kernel from
  ``torch.compile`` where Triton is available), so the copy engine never waits for a decode.

At 1,560 tokens the copies dominate (the bytes saved should show almost one for one); at
32,760 tokens compute dominates (the decode kernels must not slow the matmuls). Encoding
(``transfer_compression_probe.encode``) runs once, before timing. Every decoded weight is
checked bit for bit.

    python benchmarks/compressed_pipeline_probe.py [--output ...json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)
import transfer_compression_probe as codec  # noqa: E402

from comfyui_wan_blockswap.wan_blockswap.measure import time_forwards  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.storage import HostBuffer  # noqa: E402

DIM, FFN, BLOCKS = 5120, 13824, 8


def layer_shapes() -> list[tuple[int, int]]:
    per_block = [(DIM, DIM)] * 8 + [(FFN, DIM), (DIM, FFN)]
    return per_block * BLOCKS


class Layer:
    """One streamed projection: its raw and packed host bytes and its exceptions."""

    def __init__(self, shape: tuple[int, int], seed: int, device: torch.device) -> None:
        gen = torch.Generator().manual_seed(seed)
        weight = (torch.randn(shape, generator=gen) / shape[1] ** 0.5).to(torch.bfloat16)
        self.shape, self.n = shape, weight.numel()
        self.reference = weight
        self.raw = HostBuffer(2 * self.n, pin=True)
        self.raw.tensor.copy_(weight.view(torch.uint8).flatten())
        encoded = {  # encoded on the GPU: seconds instead of minutes for 80 layers
            k: (v.cpu() if torch.is_tensor(v) else v)
            for k, v in codec.encode(weight.to(device)).items()
        }
        self.lo = encoded["lo"]
        self.packed = HostBuffer(self.n + self.n // 2, pin=True)
        self.packed.tensor[: self.n].copy_(encoded["low"])
        self.packed.tensor[self.n :].copy_(encoded["nibbles"])
        self.table = codec.lookup_table(self.lo, device)
        self.index = encoded["exception_index"].to(device)
        self.high = encoded["exception_high"].to(device)

    def free(self) -> None:
        self.raw.free()
        self.packed.free()


def run(layers, tokens: int, mode: str, fused, device, repeats: int) -> float:
    slot_bytes = 2 * max(layer.n for layer in layers)
    slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
    staging = [torch.empty(3 * slot_bytes // 4, dtype=torch.uint8, device=device) for _ in range(2)]
    copy_stream, decode_stream = torch.cuda.Stream(device), torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)
    ready = [torch.cuda.Event() for _ in range(2)]
    freed = [torch.cuda.Event() for _ in range(2)]
    landed = [torch.cuda.Event() for _ in range(2)]
    decoded = [torch.cuda.Event() for _ in range(2)]
    inputs = {k: torch.randn(tokens, k, device=device, dtype=torch.bfloat16) for k in (DIM, FFN)}

    def load(i: int) -> None:
        layer, s = layers[i], i % 2
        out = slots[s][: 2 * layer.n]
        with torch.cuda.stream(copy_stream):
            copy_stream.wait_event(freed[s])
            if mode == "raw":
                out.copy_(layer.raw.tensor, non_blocking=True)
                ready[s].record(copy_stream)
                return
            copy_stream.wait_event(decoded[s])
            staged = staging[s][: layer.n + layer.n // 2]
            staged.copy_(layer.packed.tensor, non_blocking=True)
            landed[s].record(copy_stream)
        with torch.cuda.stream(decode_stream):
            decode_stream.wait_event(landed[s])
            low, nibbles = staged[: layer.n], staged[layer.n :]
            pairs = out.view(-1, 2)
            if mode == "packed_fused":
                fused(low, nibbles, layer.lo, out.view(torch.int16))
            else:
                codec.decode_eager(low, nibbles, layer.table, pairs)
            pairs[layer.index, 1] = layer.high
            decoded[s].record(decode_stream)
            ready[s].record(decode_stream)

    def forward() -> None:
        load(0)
        for i, layer in enumerate(layers):
            if i + 1 < len(layers):
                load(i + 1)
            compute.wait_event(ready[i % 2])
            weight = slots[i % 2][: 2 * layer.n].view(torch.bfloat16).view(layer.shape)
            torch.nn.functional.linear(inputs[layer.shape[1]], weight)
            freed[i % 2].record(compute)

    for i in (0, len(layers) - 1):  # decoded weights are exact
        load(i)
        torch.cuda.synchronize(device)
        got = slots[i % 2][: 2 * layers[i].n].view(torch.int16).cpu()
        assert torch.equal(got, layers[i].reference.view(torch.int16).flatten()), (mode, i)
        freed[i % 2].record(compute)
    return time_forwards(forward, device, warmup=1, iters=repeats).mean_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device("cuda")
    fused = torch.compile(codec.decode_fused, dynamic=True)
    layers = [Layer(shape, seed, device) for seed, shape in enumerate(layer_shapes())]
    raw_gib = sum(2 * layer.n for layer in layers) / 2**30
    rows = []
    for tokens, repeats in ((1560, 10), (32760, 3)):
        for mode in ("raw", "packed_eager", "packed_fused"):
            ms = run(layers, tokens, mode, fused, device, repeats)
            rows.append({"tokens": tokens, "mode": mode, "ms": ms})
            print(rows[-1], flush=True)
    for layer in layers:
        layer.free()
    name = torch.cuda.get_device_name(device)
    result = {
        "device": name,
        "torch": torch.__version__,
        "streamed_gib_raw": raw_gib,
        "exceptions": int(sum(layer.index.numel() for layer in layers)),
        "rows": rows,
    }
    short = name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", f"compressed_pipeline_{short}.json"
    )
    with open(output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
