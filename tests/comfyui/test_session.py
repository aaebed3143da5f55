"""A mixed session in a real ComfyUI server on the CPU (``benchmarks/comfyui_session.py``):
prompts with and without the node and a LoRA, Wan 2.2 A14B's two experts in one prompt,
changed settings, interrupts mid-sampling, /free and bad widget values; every output equals
core alone's and nothing fails."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_mixed_session_never_fails_and_always_equals_core_alone(comfy, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import comfyui_session

    prompts = len(comfyui_session.PLAN)
    result = comfyui_session.run(os.environ["COMFYUI_PATH"], str(tmp_path), prompts, cpu=True)
    failed = [event for event in result["events"] if not event["ok"]]
    assert result["prompts"] == prompts and not failed, failed
    kinds = {(event["kind"], event["model"]) for event in result["events"]}
    for kind in ("plain", "node", "interrupt", "bad_widget"):
        assert {(kind, "wan"), (kind, "a14b")} <= kinds, kind
    # the start, every 10 prompts, the /free of the plan and the one at the end
    assert [r["after"] for r in result["memory"]][-1] == "free"
    assert any(r["after"].startswith("free after") for r in result["memory"])
