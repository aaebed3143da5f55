"""test_performance.py end to end on CPU: the default run, a reduced sweep, the errors, and
an interrupted sweep that still writes what it measured."""

import json
import math
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
    # a toy model's numbers are no advice for a real one: it says so, and how to get advice
    assert report["recommendations"] == [] and "advice" not in report
    assert "built-in" in result.stderr and "--model-path" in result.stderr
    assert "--model-path" in result.stdout
    for column in ("swap", "pf", "dev wts", "saved", "RAM +", "ms", "floor", "hidden"):
        assert f"{column:>8}  " in result.stdout  # every column has a line in the legend


def test_reduced_test_all_sweeps_every_setting(tmp_path, monkeypatch):
    """--test-all measures the baseline and every (blocks, prefetch) pair of the built-in
    model's 8 blocks. Run in this process on a narrower built-in model (8 blocks all the same,
    so the same 25 settings): loading the full-size one 25 times took a minute, and only the
    blocks' count decides what is swept."""
    from comfyui_wan_blockswap import test_performance

    small = dict(test_performance.DEFAULT_MODEL, dim=256, ffn_dim=512, text_dim=64)
    assert small["num_layers"] == 8
    monkeypatch.setattr(test_performance, "DEFAULT_MODEL", small)
    output = str(tmp_path / "sweep_results.json")
    argv = ["--test-all", "--tokens", "8", "--iters", "1", "--output", output]
    assert test_performance.main(argv) == 0
    report = check_outputs(tmp_path, "sweep_results.json")
    assert report["num_blocks"] == 8 and report["model"] == test_performance.BUILT_IN_NAME
    settings = {
        (r["blocks_to_swap"], r["prefetch"]) for r in report["results"] if r["blocks_to_swap"]
    }
    assert settings == {(n, p) for n in range(1, 9) for p in (0, 1, 2)}
    assert len(report["results"]) == 25 and all("ms" in r for r in report["results"])
    assert report["latent"]["tokens"] == 8


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model-path", "missing.safetensors"], "missing.safetensors"),
        (["--model-path", "model.ckpt"], "pickle"),
        (["--blocks-to-swap", "99"], "0..8"),
        (["--prefetch", "-1"], "prefetch"),
        (["--output", "no/such/folder/x.json"], "does not exist"),
        (["--device", "gpu"], "not a device name"),
        (["--iters", "0"], "--iters"),
        (["--vram-budget-gb", "0.0001"], "raise vram_budget_gb"),
        (["--vram-budget-gb", "nan"], "--vram-budget-gb"),
        (["--frames", "0"], "--frames"),
        (["--blocks-to-swap", "2", "--vram-budget-gb", "1"], "not both"),
        (["--donor-allocation", "cuda:1;cpu"], "--donor-allocation: "),
        (["--blocks-to-swap", "0", "--donor-device", "cpu"], "no effect"),
        (["--blocks-to-swap", "2", "--tokens", "8", "--donor-device", "cuda:99"], "cuda:99"),
    ],
)
def test_clear_errors(tmp_path, args, message):
    """Bad options fail with a message naming them, before anything is measured."""
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x04junk")
    result = run_script(*args, cwd=tmp_path)
    assert result.returncode == 2
    assert message.lower() in result.stderr.lower()
    assert "Traceback" not in result.stderr
    assert not os.path.exists(tmp_path / "block_swap_performance_results.json")
    # the error is the one line: no note on the built-in model, no progress of a baseline
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def write_header_only(path, shapes):
    """A safetensors file whose header describes ``shapes`` in bf16 and whose data is a hole
    (a sparse file): a 14B model's advice reads only the header."""
    from writers import bf16_header

    header, data_bytes = bf16_header(shapes)
    with open(path, "wb") as handle:
        handle.write(header)
        handle.truncate(len(header) + data_bytes)


def test_a_real_14b_file_gets_advice_per_gpu_size_without_a_gpu(tmp_path):
    """--model-path on a 40-block Wan 14B file: advice per card from its real block sizes and
    the latent's activation memory, each card its own plan, marked as estimates; nothing is
    timed without a GPU unless asked."""
    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    path = tmp_path / "wan14b.safetensors"
    write_header_only(path, comfy_state_shapes(dim=5120, ffn_dim=13824, num_layers=40))
    result = run_script("--model-path", str(path), "--frames", "81", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "block_swap_performance_results.json") as handle:
        report = json.load(handle)
    with open(SCHEMA) as handle:
        jsonschema.validate(report, json.load(handle))
    advice = report["advice"]
    assert advice["estimated"] and "estimates" in advice["assumptions"]
    assert advice["model"] == "Wan 2.1/2.2 14B" and 26 < advice["weights_gib"] < 27.5
    rows = advice["per_gpu"]
    assert [r["vram_gb"] for r in rows] == [8, 12, 16, 24] and all(r["fits"] for r in rows)
    budgets = [r["vram_budget_gb"] for r in rows]
    moved = [r["moved_gib"] for r in rows]
    assert budgets == sorted(set(budgets)) and moved == sorted(set(moved), reverse=True)
    assert all(r["vram_gib"] <= r["vram_gb"] for r in rows)
    assert len({r["advice"] for r in rows}) == 4
    assert all("auto (free VRAM now)" in r["comfyui"] for r in rows)
    # 81 frames of 480p: 3.2 GiB of activations (the H200 measurement), so the 8 GB card keeps
    # less than 4 GiB of weights
    assert 3.0 < float(advice["assumptions"].split(" GiB")[0].split()[-1]) < 3.5
    assert rows[0]["vram_budget_gb"] < 4
    assert report["results"] == [] and report["measured"] is False
    assert "GB card" in result.stdout and "--device cpu" in result.stderr
    # a single frame leaves more room for weights on every card (in this process: the run
    # above already went through the command line)
    from comfyui_wan_blockswap import test_performance

    output = str(tmp_path / "one_frame_results.json")
    argv = ["--model-path", str(path), "--frames", "1", "--output", output]
    assert test_performance.main(argv) == 0
    with open(output) as handle:
        one_frame = json.load(handle)["advice"]["per_gpu"]
    assert all(a["vram_budget_gb"] > b["vram_budget_gb"] for a, b in zip(one_frame, rows))


def test_a_file_of_another_model_is_named_and_refused(tmp_path):
    """A Flux file: the message says what the file holds and what the script measures."""
    path = tmp_path / "flux1-dev.safetensors"
    shapes = {"double_blocks.0.img_attn.qkv.weight": (48, 16), "img_in.weight": (16, 8)}
    write_header_only(path, shapes)
    result = run_script("--model-path", str(path), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "flux model" in result.stderr and "Wan 2.1/2.2" in result.stderr


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
        "--device",
        "cpu",  # a real file times nothing on a CPU unless asked
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
