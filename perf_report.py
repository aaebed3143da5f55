"""Report, chart and advice for ``test_performance.py`` (kept apart so the script stays a
readable sequence of measurements)."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

SCHEMA_VERSION = 1
# Besides weights and activations a card holds the CUDA context and allocator slack.
RESERVE_GB = 1.0


def new_report(device, dtype, model, arch, num_blocks, latent, bandwidth) -> dict:
    frames, height, width = latent
    return {
        "schema_version": SCHEMA_VERSION,
        "device": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else platform.processor() or "cpu"
        ),
        "device_type": device.type,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": model,
        "architecture": arch,
        "num_blocks": num_blocks,
        "dtype": str(dtype).replace("torch.", ""),
        "latent": {
            "frames": frames,
            "height": height,
            "width": width,
            "tokens": frames * (height // 2) * (width // 2),
        },
        "h2d_gbps": bandwidth,
        "interrupted": False,
        "results": [],
        "recommendations": [],
    }


class ProgressBar:
    """One line on stderr, redrawn per configuration."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0

    def step(self, label: str) -> None:
        width = 30
        filled = width * self.done // max(1, self.total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
            f"{label[:60]:<60}"
        )
        sys.stderr.flush()
        self.done += 1

    def close(self) -> None:
        sys.stderr.write("\n")


def recommend(report: dict, sizes: tuple[int, ...]) -> list[dict]:
    """The fastest measured setting that fits each GPU size."""
    rows = [r for r in report["results"] if "ms" in r]
    if not rows:
        return []
    base = next((r for r in rows if r["blocks_to_swap"] == 0), rows[0])
    if base.get("peak_vram_forward_gib") is not None:
        activations = max(0.0, base["peak_vram_forward_gib"] - base["weights_on_device_gib"])
        basis = "measured activations"
    else:
        activations = 1.0
        basis = "no GPU: 1 GB assumed for activations"
    advice = []
    for size in sizes:
        room = size - RESERVE_GB - activations
        fitting = [r for r in rows if r["weights_on_device_gib"] <= room]
        if not fitting:
            advice.append(
                {
                    "vram_gb": size,
                    "fits": False,
                    "basis": basis,
                    "advice": "does not fit even with every block swapped: use an fp8 or "
                    "GGUF file, swap_unit='layer', or a smaller frame size",
                }
            )
            continue
        # Fewest swapped blocks first: on a GPU swapping less is never slower, and small
        # differences between measured rows are often noise.
        best = min(fitting, key=lambda r: (r["blocks_to_swap"], r["ms"]))
        advice.append(
            {
                "vram_gb": size,
                "fits": True,
                "basis": basis,
                "blocks_to_swap": best["blocks_to_swap"],
                "prefetch_blocks": best["prefetch"],
                "ms": best["ms"],
                "slowdown": best.get("slowdown"),
                "advice": f"blocks_to_swap={best['blocks_to_swap']}, prefetch_blocks={best['prefetch']}"
                f": {best['ms']:.1f} ms per forward ({best.get('slowdown', 1):.2f}x)",
            }
        )
    return advice


def finish(report: dict, output: str, sizes: tuple[int, ...]) -> None:
    report["recommendations"] = recommend(report, sizes)
    with open(output, "w") as handle:
        json.dump(report, handle, indent=2)
    chart = chart_path(output)
    drew = draw_chart(report, chart)
    print_table(report)
    print(
        f"\nwrote {output}" + (f" and {chart}" if drew else " (install matplotlib for the chart)")
    )


def chart_path(output: str) -> str:
    """``..._results.json`` -> ``..._chart.png``; any other name gets ``_chart.png`` added."""
    if output.endswith("results.json"):
        return output[: -len("results.json")] + "chart.png"
    return os.path.splitext(output)[0] + "_chart.png"


def draw_chart(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in report["results"] if "ms" in r]
    fig, left = plt.subplots(figsize=(8, 4.5), dpi=100)
    right = left.twinx()
    for prefetch in sorted({r["prefetch"] for r in rows}):
        line = sorted(
            (r for r in rows if r["prefetch"] == prefetch or r["blocks_to_swap"] == 0),
            key=lambda r: r["blocks_to_swap"],
        )
        xs = [r["blocks_to_swap"] for r in line]
        right.plot(
            xs, [r["ms"] for r in line], marker="o", label=f"ms/forward, prefetch {prefetch}"
        )
    saved = sorted(
        {(r["blocks_to_swap"], r["vram_saved_gib"]) for r in rows if "vram_saved_gib" in r}
    )
    left.bar(
        [x for x, _ in saved], [y for _, y in saved], color="#9ecae1", label="VRAM saved (GiB)"
    )
    left.set_xlabel("blocks swapped")
    left.set_ylabel("VRAM saved (GiB)")
    right.set_ylabel("ms per forward")
    right.set_ylim(bottom=0)
    left.set_title(f"{report['model']} on {report['device']} ({report['latent']['tokens']} tokens)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def print_table(report: dict) -> None:
    print(
        f"\n{report['model']} ({report['architecture']}, {report['num_blocks']} blocks, "
        f"{report['dtype']}) on {report['device']}, torch {report['torch']}, "
        f"{report['latent']['tokens']} tokens"
    )
    header = (
        "swap",
        "pf",
        "load s",
        "GPU wts",
        "saved",
        "peak fwd",
        "RAM +",
        "ms",
        "x",
        "floor",
        "hidden",
    )
    print(" ".join(f"{h:>8}" for h in header))

    def fmt(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in report["results"]:
        if "ms" not in r:
            continue
        cells = (
            r["blocks_to_swap"],
            r["prefetch"],
            fmt(r["load_s"], ".2f"),
            fmt(r["weights_on_device_gib"], ".2f"),
            fmt(r.get("vram_saved_gib"), ".2f"),
            fmt(r["peak_vram_forward_gib"], ".2f"),
            fmt(r["host_ram_increase_gib"], ".2f"),
            fmt(r["ms"], ".1f"),
            fmt(r.get("slowdown"), ".2f"),
            fmt(r.get("floor_ms"), ".1f"),
            fmt(r.get("copy_hidden_share") and 100 * r["copy_hidden_share"], ".0f"),
        )
        print(" ".join(f"{c!s:>8}" for c in cells))
    print("\nrecommendation (GiB of VRAM):")
    for advice in report["recommendations"]:
        print(f"  {advice['vram_gb']:>3} GB: {advice['advice']}")
