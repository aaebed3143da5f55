"""benchmarks/architectures_benchmark.py in its CPU smoke mode: two families built by core's
loader at the tests' tiny dims, every main block swapped, outputs equal to the unswapped
model; a family that fails or misses the deadline is recorded and the others still run."""

import json
import os

import torch

from smoke_runs import run_cpu_smoke


def test_cpu_run_swaps_every_block_with_equal_outputs(tmp_path, comfy):
    import tiny_ltx_hv15_k5

    # Wan 2.2 5B is in every core; Kandinsky 5 only in current ones
    families = ["WAN22"] + (["Kandinsky5"] if tiny_ltx_hv15_k5.has_class("kandinsky5") else [])
    traces = tmp_path / "traces"
    run, results = run_cpu_smoke(
        "architectures_benchmark.py",
        tmp_path / "arch.json",
        "--profile",
        "--trace-dir",
        str(traces),
        "--families",
        *families,
    )
    assert results["mode"] == "cpu" and results["device"] == "cpu"
    assert results["core"]["dynamic_vram"] is False
    assert results["hold_at_forward_edge"] is True  # the scheduler's default
    assert list(results["families"]) == families
    for name in families:
        family = results["families"][name]
        assert family["status"] == "ok", family
        # the copy rate read before and after the swapped forwards, the best one used
        assert len(family["h2d_gbps_readings"]) == 2
        assert family["h2d_gbps"] == max(family["h2d_gbps_readings"])
        # every main block went to host memory
        assert family["swapped_bytes"] == sum(family["block_bytes"].values())
        assert family["blocks"] == len(family["block_bytes"]) >= 3
        # the record's preset reserve, to be checked against the measured activations
        reserve = family["reserve"]
        assert reserve["reserve_gb"] >= 3.0 and reserve["typical_tokens"] > 0, reserve
        assert reserve["estimated_reserve_gib"] >= 1.0  # on the CPU: the context alone
    assert [(r["family"], r["kind"]) for r in results["rows"]] == [
        (name, kind) for name in families for kind in ("floor", "compute")
    ]
    for row in results["rows"]:
        assert row["equal_output"] is True and row["finite"] is True, row
        assert row["ms"] > 0 and row["reference_ms"] > 0 and row["ratio"] > 0
        assert row["met"] is None  # no bar is judged on the CPU
    floor, compute = results["rows"][:2]
    assert floor["tokens"] < compute["tokens"]
    assert floor["reference_ms"] == floor["floor_ms"]
    assert compute["reference_ms"] == compute["all_on_gpu_ms"]
    # the all-on-GPU reference is timed on both sides of the swapped forwards
    assert compute["all_on_gpu_before_ms"] > 0 and compute["all_on_gpu_after_ms"] > 0
    assert compute["reference_repeatable_before"] is True
    assert len(compute["samples_ms"]) == results["iters"]["compute"]
    # --profile: one forward per row kind, swapped and all on the device, its busiest operators
    profile = results["families"][families[0]]["profile"]
    assert set(profile) == {"all_on_gpu", "swapped"}
    for arm in profile.values():
        assert set(arm) == {"floor", "compute"}
        for found in arm.values():
            assert found["clock"] == "host" and found["self_ms_total"] > 0
            assert found["top"] and all(op["count"] >= 1 for op in found["top"])
            assert len(found["forward_ms"]) == found["forwards"] == 3
    # --trace-dir: one Chrome trace per family, arm and row kind
    assert sorted(p.name for p in traces.iterdir()) == sorted(
        f"{name}_{arm}_{kind}.json.gz"
        for name in families
        for arm in ("all_on_gpu", "swapped")
        for kind in ("floor", "compute")
    )
    assert results["bars"]["judged"] is False and results["bars"]["all_met"] is None
    assert "WAN22" in run.stdout and "compute" in run.stdout


def test_failures_and_deadline_are_recorded(tmp_path, monkeypatch, comfy):
    import architectures_benchmark as bench

    calls = []

    def fail(comfy, family, opts):
        calls.append(family.name)
        raise RuntimeError(f"{family.name} broke")

    monkeypatch.setattr(bench, "run_family", fail)
    threads = torch.get_num_threads()
    try:
        args = ["--cpu", "--comfyui", os.environ["COMFYUI_PATH"], "--output"]
        output = tmp_path / "failed.json"
        assert bench.main([*args, str(output), "--families", "WAN22", "QwenImage"]) == 0
        results = json.loads(output.read_text())
        assert calls == ["WAN22", "QwenImage"]  # the second ran after the first failed
        assert results["families"]["QwenImage"] == {
            "status": "error",
            "error": "RuntimeError: QwenImage broke",
        }
        assert results["rows"] == []
        assert results["bars"]["not_measured"] == ["WAN22", "QwenImage"]

        output = tmp_path / "late.json"
        assert bench.main([*args, str(output), "--families", "Flux2", "--deadline", "0"]) == 0
        results = json.loads(output.read_text())
        assert calls == ["WAN22", "QwenImage"]
        assert results["families"]["Flux2"]["status"] == "not_run"
        assert "deadline" in results["families"]["Flux2"]["reason"]
    finally:
        torch.set_num_threads(threads)
