"""test_performance.py end to end on CPU: the default run, a reduced sweep, the errors, and
an interrupted sweep that still writes what it measured."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = os.path.join(ROOT, "tests", "data", "performance_schema.json")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("diffusers")


def run_script(*args, cwd):
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "test_performance.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_outputs(folder, name="block_swap_performance_results.json"):
    with open(os.path.join(folder, name)) as handle:
        report = json.load(handle)
    with open(SCHEMA) as handle:
        jsonschema.validate(report, json.load(handle))
    chart = os.path.join(folder, name.replace("results.json", "chart.png"))
    with open(chart, "rb") as handle:
        data = handle.read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 200
    return report


def test_default_run_writes_json_and_png(tmp_path):
    result = run_script(cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = check_outputs(tmp_path)
    assert [r["blocks_to_swap"] for r in report["results"]] == [0, 4, 8]
    assert report["results"][0]["slowdown"] == 1.0
    assert report["results"][2]["vram_saved_gib"] > report["results"][1]["vram_saved_gib"] > 0
    assert [a["vram_gb"] for a in report["recommendations"]] == [8, 12, 16, 24]
    assert "recommendation" in result.stdout and "blocks_to_swap" in result.stdout


def test_reduced_test_all_sweeps_every_setting(tmp_path):
    result = run_script(
        "--test-all",
        "--tokens",
        "8",
        "--iters",
        "1",
        "--output",
        "sweep_results.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = check_outputs(tmp_path, "sweep_results.json")
    settings = {
        (r["blocks_to_swap"], r["prefetch"]) for r in report["results"] if r["blocks_to_swap"]
    }
    assert settings == {(n, p) for n in range(1, 9) for p in (0, 1, 2)}
    assert report["latent"]["tokens"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-path", "missing.safetensors"], "missing.safetensors"),
        (["--model-path", "model.ckpt"], "pickle"),
        (["--blocks-to-swap", "99"], "0..8"),
        (["--prefetch", "-1"], "prefetch"),
    ],
)
def test_clear_errors(tmp_path, args, message):
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04junk")
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda(tmp_path):
    result = run_script("--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2 and "cuda" in result.stderr.lower()


def test_interrupt_keeps_what_was_measured(tmp_path, monkeypatch):
    from comfyui_wan_blockswap import test_performance

    calls = {"n": 0}
    real = test_performance.measure

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(test_performance, "measure", interrupted)
    output = str(tmp_path / "partial_results.json")
    assert test_performance.main(["--tokens", "8", "--iters", "1", "--output", output]) == 0
    report = check_outputs(tmp_path, "partial_results.json")
    assert report["interrupted"] is True and len(report["results"]) == 1


def test_model_path_gguf_is_detected_and_measured(tmp_path):
    from writers import random_state, write_gguf
    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    path = tmp_path / "tiny.gguf"
    write_gguf(random_state(comfy_state_shapes(256, 512, 4, text_dim=64, freq_dim=256)), path)
    result = run_script(
        "--model-path",
        str(path),
        "--tokens",
        "16",
        "--iters",
        "1",
        "--output",
        "gguf_results.json",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    report = check_outputs(tmp_path, "gguf_results.json")
    assert report["architecture"] == "wan.comfyui" and report["num_blocks"] == 4
    assert [r["blocks_to_swap"] for r in report["results"]] == [0, 2, 4]


def test_transfer_compression_flag_reaches_every_swapped_setting(tmp_path):
    from comfyui_wan_blockswap import test_performance

    output = str(tmp_path / "compressed_results.json")
    argv = ["--tokens", "8", "--iters", "1", "--dtype", "bf16", "--device", "cpu"]
    argv += ["--blocks-to-swap", "8", "--transfer-compression", "on", "--output", output]
    assert test_performance.main(argv) == 0
    report = check_outputs(tmp_path, "compressed_results.json")
    options = [row["options"] for row in report["results"]]
    assert options[0] == {"blocks_to_swap": 0}  # the unswapped baseline stays plain
    assert options[1]["transfer_compression"] is True
