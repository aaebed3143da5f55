"""benchmarks/lora_dynamic_probe.py on the CPU (a static server: dynamic VRAM is GPU-only):
the probe sees core's LoRA-patched weight on a layer the node keeps resident, and ours is the
same weight bit for bit, stored and as its forward casts it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "benchmarks", "lora_dynamic_probe.py")


def test_the_probe_finds_our_resident_lora_weights_equal_to_core(comfy, tmp_path):
    output = tmp_path / "probe.json"
    run = subprocess.run(
        [sys.executable, SCRIPT, "--cpu", "--comfyui", os.environ["COMFYUI_PATH"]]
        + ["--output", str(output)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    result = json.loads(output.read_text())
    assert all(s["status"] == "success" for s in result["static_statuses"].values()), result
    core, ours = result["layers"]["core_static"], result["layers"]["ours_static"]
    pair = result["comparisons"]["core_static vs ours_static"]
    resident = [k for k in result["keys"] if ".blocks.5." in k]
    swapped = [k for k in result["keys"] if ".blocks.1." in k]
    assert resident and swapped
    for key in resident:
        assert core["keys"][key]["patches"] and core["keys"][key]["backup"]  # core patched it
        assert pair[f"{key}.stored"] == "equal" and pair[f"{key}.cast"] == "equal", key
    for key in swapped:  # the node streams it: a placeholder outside the forward
        assert ours["keys"][key]["weight"][2] == 0
        assert core["keys"][key]["weight"][2] > 0
