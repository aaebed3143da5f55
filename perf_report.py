"""Report, chart and advice for ``test_performance.py`` (kept apart so the script stays a
readable sequence of measurements). Sizes are GiB throughout; cards are named by the GB they
are sold with (an "8 GB" card has 8 GiB)."""

from __future__ import annotations

import json
import os
import platform
import sys

import torch

from .wan_blockswap import BlockSwapConfigError

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


LEGEND = (
    ("swap", "blocks kept in host memory and streamed to the device for each forward"),
    ("pf", "prefetch_blocks: how many swapped blocks are copied ahead of use"),
    ("load s", "seconds to load the file with this plan"),
    ("dev wts", "GiB of weights on the device: resident blocks and layers plus the slots"),
    ("saved", "GiB of device memory saved against no swapping"),
    ("peak fwd", "peak GiB allocated on the device during a forward (GPU only)"),
    ("RAM +", "GiB the process' resident host memory grew while loading"),
    ("ms", "median milliseconds per forward"),
    ("x", "slowdown against no swapping (1.00 = as fast)"),
    ("floor", "ms the swapped bytes take to copy at the measured host-to-device rate (GPU)"),
    ("hidden", "% of that copy time hidden behind compute (100 = swapping costs nothing)"),
)


def advice_section(file_model, latent, dtype, sizes: tuple[int, ...]) -> dict:
    """Advice per card size for a real file, before anything is measured (perf_advice)."""
    from dataclasses import asdict

    from .perf_advice import advise, assumptions, comfyui_hint

    frames, height, width = latent
    tokens = frames * (height // 2) * (width // 2)
    compute_bytes = 4 if dtype == torch.float32 else 2
    rows = advise(file_model, tokens, compute_bytes, sizes)
    return {
        "estimated": True,
        "assumptions": assumptions(file_model, tokens, compute_bytes),
        "model": file_model.variant.display_name if file_model.variant else None,
        "weights_gib": (
            file_model.sizes.other_bytes + sum(b.nbytes for b in file_model.sizes.blocks)
        )
        / 2**30,
        "per_gpu": [{**asdict(row), "comfyui": comfyui_hint(row)} for row in rows],
    }


def recommend(report: dict, sizes: tuple[int, ...]) -> list[dict]:
    """The fastest measured setting that fits each GPU size (none for the built-in model:
    its numbers say nothing of what a real model needs)."""
    rows = [r for r in report["results"] if "ms" in r]
    if not rows or report["model"].startswith("built-in"):
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
    chart = chart_path(output)
    try:  # the script checked the folder; a full disk or a special file still fails here
        with open(output, "w") as handle:
            json.dump(report, handle, indent=2)
        drew = any("ms" in r for r in report["results"]) and draw_chart(report, chart)
    except OSError as error:
        raise BlockSwapConfigError(
            f"--output {output}: cannot write {error.filename or output} ({error.strerror}); "
            f"choose another file"
        ) from None
    if "advice" in report:
        print_advice(report)
    if report["results"]:
        print_table(report)
    if report["model"].startswith("built-in"):
        print(
            "\nno advice per GPU size: the built-in model is small and random. Pass a real "
            "model's file with --model-path for advice (no GPU needed)."
        )
    if not drew:
        print(
            f"\nwrote {output}"
            + (" (install matplotlib for the chart)" if report["results"] else "")
        )
    else:
        print(f"\nwrote {output} and {chart}")


def print_advice(report: dict) -> None:
    advice = report["advice"]
    latent = report["latent"]
    name = advice["model"] or report["architecture"]
    print(
        f"\nadvice for {report['model']} ({name}, {report['num_blocks']} blocks, "
        f"{advice['weights_gib']:.1f} GiB of weights) at {latent['tokens']:,} tokens"
    )
    print(f"({advice['assumptions']})")
    pad = " " * 14
    for row in advice["per_gpu"]:
        print(f"  {row['vram_gb']:>2} GB card: {row['advice']}")
        if row["fits"] and row["moved_gib"]:
            print(pad + row["comfyui"])
            print(
                f"{pad}about {row['vram_gib']:.1f} GiB in use; each forward copies "
                f"{row['moved_gib']:.1f} GiB: at least {row['transfer_s']:.2f} s of transfer"
            )
        elif row["fits"]:
            print(f"{pad}about {row['vram_gib']:.1f} GiB in use")


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
    fig, left = plt.subplots(figsize=(8, 5), dpi=100)
    right = left.twinx()
    depths = sorted({r["prefetch"] for r in rows if r["blocks_to_swap"]}) or [1]
    width = 0.8 / len(depths)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    base = [r for r in rows if r["blocks_to_swap"] == 0]
    for i, prefetch in enumerate(depths):
        colour = colours[i % len(colours)]
        series = sorted(
            base + [r for r in rows if r["blocks_to_swap"] and r["prefetch"] == prefetch],
            key=lambda r: r["blocks_to_swap"],
        )
        xs = [r["blocks_to_swap"] for r in series]
        offset = (i - (len(depths) - 1) / 2) * width
        left.bar(
            [x + offset for x in xs],
            [r.get("vram_saved_gib", 0.0) for r in series],
            width=width,
            color=colour,
            alpha=0.35,
            label=f"VRAM saved (GiB), prefetch {prefetch}",
        )
        right.plot(
            xs, [r["ms"] for r in series], marker="o", color=colour,
            label=f"ms/forward, prefetch {prefetch}",
        )  # fmt: skip
    left.set_xlabel("blocks swapped")
    left.set_ylabel("VRAM saved (GiB)")
    right.set_ylabel("ms per forward")
    right.set_ylim(bottom=0)
    left.set_title(f"{report['model']} on {report['device']} ({report['latent']['tokens']} tokens)")
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    fig.tight_layout(rect=(0, 0.16, 1, 1))  # the legend goes under the plot, off the data
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False)
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
        "dev wts",
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
    print("\ncolumns:")
    for name, meaning in LEGEND:
        print(f"  {name:>8}  {meaning}")
    if report["recommendations"]:
        print("\nrecommendation per card, from these measurements:")
        for advice in report["recommendations"]:
            print(f"  {advice['vram_gb']:>2} GB card: {advice['advice']}")
