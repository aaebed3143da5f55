"""benchmarks/comfyui_dynamic_benchmark.py in its CPU smoke mode, in a real server: the rows
the issue names, outputs equal to core's, and the warm-up prompts kept apart from the timed
ones (``--warmups``)."""

import os

import pytest
from smoke_runs import run_cpu_smoke


def test_warmups_are_timed_apart_and_the_rows_equal_core(comfy, tmp_path):
    if not hasattr(comfy.model_patcher, "ModelPatcherDynamic"):
        pytest.skip("the benchmark needs a dynamic-VRAM core (v0.33 or newer)")
    _, results = run_cpu_smoke(
        "comfyui_dynamic_benchmark.py",
        tmp_path / "dyn.json",
        *("--comfyui", os.environ["COMFYUI_PATH"], "--workdir", str(tmp_path / "work")),
        *("--arms", "core_dynamic", "ours_default", "--blocks", "2", "--pairs", "5:12"),
        *("--prompts", "3", "--warmups", "2", "--steps", "2", "--size", "64", "64"),
    )
    rows = results["rows"]
    assert [row["arm"] for row in rows] == ["core_dynamic", "ours_default"]
    for row in rows:
        names = {"arm", "blocks", "frames", "free_gib", "s_per_it", "peak_vram_gib"}
        assert names | {"peak_rss_gib", "status", "equal_to_core"} <= set(row)
        assert row["status"] == "ok" and row["equal_to_core"] is True
        # a cfg-1 prompt, two warm-ups, then --prompts minus one timed
        assert len(row["warmup_s_each"]) == 2 and len(row["prompt_s_each"]) == 2
        assert len(row["s_per_it_each"]) == 2 and len(row["peak_rss_each"]) == 5


def test_ours_default_runs_the_widgets_of_ours_auto(comfy):
    """A new node's widgets are preset auto with transfer compression auto, so the
    benchmark's ``ours_default`` rows stand for ``ours_auto`` (comfyui_dynamic_h100.json,
    ``arms``)."""
    import sys

    from smoke_runs import ROOT

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import comfy_server as cs
    import comfyui_dynamic_benchmark as bench

    defaults = cs.node_defaults()
    assert {**defaults, **bench.ARMS["ours_auto"]["node"]} == {
        **defaults,
        **bench.ARMS["ours_default"]["node"],
    }
