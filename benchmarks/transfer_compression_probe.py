"""Would lossless compression of bf16 weights shorten streaming? A probe, not engine code.

A bf16 weight is one low byte (7 mantissa bits and the exponent's last bit, incompressible)
and one high byte (sign and the exponent's top 7 bits). Weights of one layer span few
binades, so the high byte takes few values: the sign and 8 consecutive exponent values fit in
4 bits, anything outside the window is stored as an exception. That sends 1.5 bytes per
weight instead of 2 (-25%), and decoding on the GPU is elementwise. This measures, on layers
shaped like Wan-14B's (random weights scaled like trained ones):

- the compressed size and how many exceptions there are;
- the host-to-device time of the compressed bytes against the raw ones;
- the GPU decode time, eager (chunked, a 256-entry lookup table) and, where Triton is
  available, one fused kernel from ``torch.compile``; each checked bit for bit.

    python benchmarks/transfer_compression_probe.py [--output benchmarks/results/...json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

from comfyui_wan_blockswap.wan_blockswap.measure import time_forwards  # noqa: E402
from comfyui_wan_blockswap.wan_blockswap.storage import HostBuffer  # noqa: E402

CHUNK = 8 * 2**20  # weights decoded per eager step (bounds the temporaries)


def encode(weight: torch.Tensor) -> dict:
    pairs = weight.contiguous().view(torch.uint8).view(-1, 2)  # little-endian: low, high
    low, high = pairs[:, 0].contiguous(), pairs[:, 1]
    exponent = (high & 127).to(torch.int64)
    counts = torch.bincount(exponent, minlength=128)
    window = counts.unfold(0, 8, 1).sum(1)  # weights covered by each 8-value window
    lo = int(window.argmax())
    outside = (exponent < lo) | (exponent > lo + 7)
    code = ((high >> 7) << 3) | (exponent - lo).clamp(0, 7).to(torch.uint8)
    nibbles = code[0::2] | (code[1::2] << 4)
    where = outside.nonzero().flatten()
    return {
        "lo": lo,
        "low": low,
        "nibbles": nibbles.contiguous(),
        "exception_index": where,
        "exception_high": high[where].contiguous(),
    }


def lookup_table(lo: int, device) -> torch.Tensor:
    codes = torch.arange(256)
    even, odd = codes & 15, codes >> 4
    high = lambda c: ((c & 8) << 4) | ((c & 7) + lo)  # noqa: E731
    return (high(even) | (high(odd) << 8)).to(torch.int16).to(device)


def decode_eager(low, nibbles, table, out_pairs) -> None:
    n = low.numel()
    for start in range(0, n, CHUNK):
        stop = min(n, start + CHUNK)
        highs = torch.index_select(table, 0, nibbles[start // 2 : stop // 2].to(torch.int32))
        out_pairs[start:stop, 1].copy_(highs.view(torch.uint8))
        out_pairs[start:stop, 0].copy_(low[start:stop])


def decode_fused(low, nibbles, lo: int, out16) -> None:
    even, odd = nibbles & 15, nibbles >> 4
    high_even = (((even & 8) << 4) | ((even & 7) + lo)).to(torch.int16)
    high_odd = (((odd & 8) << 4) | ((odd & 7) + lo)).to(torch.int16)
    low16 = low.to(torch.int16)
    out16[0::2] = (high_even << 8) | low16[0::2]
    out16[1::2] = (high_odd << 8) | low16[1::2]


def gpu_ms(work) -> float:
    """Mean GPU milliseconds of ``work`` over 10 back-to-back calls after one warm-up."""
    return time_forwards(work, torch.device("cuda"), warmup=1, iters=10).mean_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device("cuda")
    fused = None
    try:
        fused = torch.compile(decode_fused, dynamic=False)
    except Exception as error:  # a probe: report, go on
        print("no torch.compile:", error)
    rows = []
    for name, (rows_, cols) in {
        "attention_5120x5120": (5120, 5120),
        "ffn_13824x5120": (13824, 5120),
    }.items():
        gen = torch.Generator().manual_seed(0)
        weight = (torch.randn(rows_, cols, generator=gen) / cols**0.5).to(torch.bfloat16)
        started = time.perf_counter()
        encoded = encode(weight)
        encode_s = time.perf_counter() - started
        n = weight.numel()
        packed = n + n // 2 + encoded["exception_index"].numel() * 9
        host_raw = HostBuffer(2 * n, pin=True)
        host_raw.tensor.copy_(weight.view(torch.uint8).flatten())
        host_packed = HostBuffer(n + n // 2, pin=True)
        host_packed.tensor[:n].copy_(encoded["low"])
        host_packed.tensor[n:].copy_(encoded["nibbles"])
        dev_raw = torch.empty(2 * n, dtype=torch.uint8, device=device)
        dev_packed = torch.empty(n + n // 2, dtype=torch.uint8, device=device)
        raw_ms = gpu_ms(lambda: dev_raw.copy_(host_raw.tensor, non_blocking=True))
        packed_ms = gpu_ms(lambda: dev_packed.copy_(host_packed.tensor, non_blocking=True))
        low, nibbles = dev_packed[:n], dev_packed[n:]
        out = torch.empty(n, dtype=torch.bfloat16, device=device)
        pairs = out.view(torch.uint8).view(-1, 2)
        table = lookup_table(encoded["lo"], device)
        index = encoded["exception_index"].to(device)
        high = encoded["exception_high"].to(device)

        def eager() -> None:
            decode_eager(low, nibbles, table, pairs)
            pairs[index, 1] = high

        eager_ms = gpu_ms(eager)
        exact_eager = torch.equal(out.cpu().view(torch.int16), weight.view(torch.int16).flatten())
        row = {
            "layer": name,
            "weights": n,
            "ratio": packed / (2 * n),
            "exceptions": encoded["exception_index"].numel(),
            "window_lo": encoded["lo"],
            "encode_cpu_s": encode_s,
            "h2d_raw_ms": raw_ms,
            "h2d_packed_ms": packed_ms,
            "decode_eager_ms": eager_ms,
            "exact_eager": exact_eager,
        }
        if fused is not None:
            try:
                out.zero_()
                out16 = out.view(torch.int16)
                started = time.perf_counter()
                fused(low, nibbles, encoded["lo"], out16)
                torch.cuda.synchronize()
                row["compile_s"] = time.perf_counter() - started

                def fused_step() -> None:
                    fused(low, nibbles, encoded["lo"], out16)
                    pairs[index, 1] = high

                row["decode_fused_ms"] = gpu_ms(fused_step)
                row["exact_fused"] = torch.equal(
                    out.cpu().view(torch.int16), weight.view(torch.int16).flatten()
                )
            except Exception as error:
                row["fused_error"] = repr(error)[:300]
        rows.append(row)
        print(row, flush=True)
        host_raw.free()
        host_packed.free()
    name = torch.cuda.get_device_name(device)
    short = name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(
        ROOT, "benchmarks", "results", f"transfer_compression_{short}.json"
    )
    with open(output, "w") as handle:
        json.dump({"device": name, "torch": torch.__version__, "rows": rows}, handle, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
