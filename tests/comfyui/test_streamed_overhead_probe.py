"""benchmarks/streamed_overhead_probe.py in its CPU smoke mode: core's Wan under every arm, each
arm's plan as named, outputs equal to the model without the engine."""

from smoke_runs import run_cpu_smoke


def test_cpu_smoke_run_times_every_arm_with_equal_outputs(tmp_path, comfy):
    _, results = run_cpu_smoke("streamed_overhead_probe.py", tmp_path / "probe.json")
    assert results["mode"] == "cpu" and results["tokens"] == 128
    rows = {r["arm"]: r for r in results["rows"]}
    assert list(rows) == [
        "gpu",
        "chunks only",
        "least + 0.61 block",
        "least + 0.61 block, no chunks",
        "least + 3 blocks",
        "all - 1.35 blocks",
        "least + 0.61 block, no chunks, one layer ahead",
        "least + 2 blocks, no chunks",
        "least + 2 blocks, no chunks, one layer ahead",
        "all swapped, layer slots",
        "all swapped, layer slots, one unit per slot",
        "all swapped, layer slots, cross-attention apart",
        "all swapped, layer slots, cross-attention apart, one unit per slot",
    ]
    assert rows["gpu"]["plan"] is None and rows["gpu"]["ratio_to_gpu"] == 1.0
    assert rows["chunks only"]["plan"] == "none" and rows["chunks only"]["swapped_gib"] == 0
    assert rows["least + 0.61 block"]["plan"] == "streamed"
    assert rows["all - 1.35 blocks"]["swapped_gib"] > 0
    # 128 tokens over 64: each block's FFN runs in chunks once per forward (a warm-up and a
    # timed one); none without chunks
    assert rows["chunks only"]["chunked_calls"] == 8 * 2
    assert rows["least + 0.61 block, no chunks"]["chunked_calls"] == 0
    slots = [r for name, r in rows.items() if name.startswith("all swapped, layer slots")]
    assert [r["provider"] for r in slots] == ["PackedSlots", "FixedSlots"] * 2
    # apart: the cross-attention's layers are units of their own (the smoke run's tiny Wan
    # groups nothing anyway: its cross-attention outweighs its FFN by the norms)
    assert slots[2]["units"] >= slots[0]["units"] > 0
    for row in rows.values():
        assert row["ms"] > 0 and len(row["rounds_ms"]) == 1
        assert row["equal_output"] is True, row
