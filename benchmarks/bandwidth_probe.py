"""Can host-to-device streaming go faster than one copy engine at a time? Measures GB/s for
the layer sizes the engine streams (50 and 135 MiB, Wan-14B attention and FFN projections),
from huge-page host memory registered as the engine registers it:

- ``one_stream``: back-to-back ``copy_`` calls on one stream (what the engine does);
- ``two_streams``: the same bytes split over two streams (two copy engines at once);
- ``sm_read``: a GPU kernel reading the mapped host memory itself (zero-copy, no copy engine);
- ``one_stream+sm_read``: half by copy engine, half by kernel, concurrently.

    python benchmarks/bandwidth_probe.py [--output benchmarks/results/bandwidth_<gpu>.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import _pack  # noqa: E402,F401  (this checkout as comfyui_wan_blockswap)

from comfyui_wan_blockswap.wan_blockswap.storage import HostBuffer  # noqa: E402

MIB = 2**20
TOTAL = 2048 * MIB  # bytes moved per measurement


class _MappedHost:
    """Exposes registered host memory as a CUDA tensor (UVA: the host address is valid on the
    device for memory registered as mapped), so a kernel can read it over PCIe."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {
            "shape": (tensor.numel() // 4,),
            "typestr": "<i4",
            "data": (tensor.data_ptr(), False),
            "version": 3,
        }


def timed(device: torch.device, work) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize(device)
    start.record()
    work()
    end.record()
    torch.cuda.synchronize(device)
    return TOTAL / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output")
    args = parser.parse_args()
    device = torch.device("cuda")
    host = HostBuffer(TOTAL, pin=True)
    host.tensor.fill_(1)
    target = torch.empty(TOTAL, dtype=torch.uint8, device=device)
    mapped = torch.as_tensor(_MappedHost(host.tensor), device=device)
    target32 = target.view(torch.int32)
    streams = [torch.cuda.Stream(device), torch.cuda.Stream(device)]
    rows = []
    for piece_mib in (50, 135, 512):
        piece = piece_mib * MIB
        count = TOTAL // piece

        def one_stream() -> None:
            with torch.cuda.stream(streams[0]):
                for i in range(count):
                    target[i * piece : (i + 1) * piece].copy_(
                        host.tensor[i * piece : (i + 1) * piece], non_blocking=True
                    )
            torch.cuda.current_stream().wait_stream(streams[0])

        def two_streams() -> None:
            half = piece // 2
            for i in range(count):
                for s, stream in enumerate(streams):
                    lo = i * piece + s * half
                    with torch.cuda.stream(stream):
                        target[lo : lo + half].copy_(host.tensor[lo : lo + half], non_blocking=True)
            for stream in streams:
                torch.cuda.current_stream().wait_stream(stream)

        def sm_read() -> None:
            words = piece // 4
            for i in range(count):
                torch.bitwise_or(
                    mapped[i * words : (i + 1) * words],
                    0,
                    out=target32[i * words : (i + 1) * words],
                )

        def mixed() -> None:
            half = piece // 2
            for i in range(count):
                lo = i * piece
                with torch.cuda.stream(streams[0]):
                    target[lo : lo + half].copy_(host.tensor[lo : lo + half], non_blocking=True)
                w = (lo + half) // 4
                torch.bitwise_or(mapped[w : w + half // 4], 0, out=target32[w : w + half // 4])
            torch.cuda.current_stream().wait_stream(streams[0])

        for name, work in (
            ("one_stream", one_stream),
            ("two_streams", two_streams),
            ("sm_read", sm_read),
            ("one_stream+sm_read", mixed),
        ):
            try:
                work()  # warm-up
                rates = sorted(timed(device, work) for _ in range(5))
                row = {"method": name, "piece_mib": piece_mib, "gbps": rates[2]}
                assert torch.equal(target[:4096].cpu(), host.tensor[:4096]), name
            except Exception as error:  # a probe: report, go on
                row = {"method": name, "piece_mib": piece_mib, "error": repr(error)}
            rows.append(row)
            print(row, flush=True)
            target.zero_()
    try:
        link = subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=pcie.link.gen.current,pcie.link.width.current",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except OSError:
        link = "unknown"
    name = torch.cuda.get_device_name(device)
    result = {"device": name, "torch": torch.__version__, "pcie_link": link, "rows": rows}
    short = name.lower().replace("nvidia ", "").split()[0]
    output = args.output or os.path.join(ROOT, "benchmarks", "results", f"bandwidth_{short}.json")
    with open(output, "w") as handle:
        json.dump(result, handle, indent=2)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
