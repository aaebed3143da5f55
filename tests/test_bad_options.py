"""Every bad option gets our error, by name, with the fix: never a builtin exception, a silent
fall back or a traceback (issue #15 item 6).

The performance script: each bad value or contradictory pair exits with status 2 and one line
``error: ...`` that names the option, before anything is loaded or measured; valid values
keep working. The nodes: each bad widget value raises BlockSwapConfigError (CheckpointError for
files) naming the widget, and nothing is applied to the model.

Most script cases run ``main()`` in this process (an import of torch per case would take
minutes); a few run the script as users do, to see the exit status and stderr of a real
process.
"""

import os
import random
import subprocess
import sys
import types

import json

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "test_performance.py")
pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A small Wan file (4 blocks) and files that are no checkpoint at all."""
    from writers import random_state, write_safetensors

    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    folder = tmp_path_factory.mktemp("models")
    shapes = comfy_state_shapes(256, 512, 4, text_dim=64, freq_dim=256)
    write_safetensors(random_state(shapes), folder / "wan_small.safetensors")
    (folder / "text.safetensors").write_text("not a checkpoint\n")
    (folder / "empty.safetensors").write_bytes(b"")
    noise = random.Random(0).randbytes(4096)  # the same bytes every run
    (folder / "random.safetensors").write_bytes(noise)
    (folder / "random.gguf").write_bytes(noise)
    (folder / "model.ckpt").write_bytes(b"\x80\x04junk")
    (folder / "a_folder").mkdir()
    return folder


def run_main(argv, capsys):
    """``test_performance.main(argv)`` as the script runs it: (exit status, stderr)."""
    from comfyui_wan_blockswap import test_performance

    try:
        status = test_performance.main(argv)
    except SystemExit as exit_:  # argparse's errors
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_error_line(status, err, words):
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word.lower() in lines[0].lower(), (word, lines[0])
    assert "Traceback" not in err


# (arguments, words the one line must hold: the option and the fix). Each fails before a
# model is read; "{model}" is the small Wan file, "{files}" its folder.
BAD_ARGUMENTS = [
    # wrong types (argparse)
    (["--blocks-to-swap", "abc"], ["--blocks-to-swap", "invalid int"]),
    (["--blocks-to-swap", "1.5"], ["--blocks-to-swap", "invalid int"]),
    (["--prefetch", ""], ["--prefetch", "invalid int"]),
    (["--frames", "nan"], ["--frames", "invalid int"]),
    (["--height", "inf"], ["--height", "invalid int"]),
    (["--tokens", "8.0"], ["--tokens", "invalid int"]),
    (["--iters", "x"], ["--iters", "invalid int"]),
    (["--vram-budget-gb", "eight"], ["--vram-budget-gb", "invalid float"]),
    (["--dtype", "int8"], ["--dtype", "bf16"]),
    (["--dtype", ""], ["--dtype", "bf16"]),
    (["--transfer-compression", "maybe"], ["--transfer-compression", "auto"]),
    (["--test-all", "yes"], ["unrecognized", "yes"]),
    # out of range
    (["--blocks-to-swap", "-1"], ["--blocks-to-swap", "0 or more"]),
    (["--prefetch", "-1"], ["--prefetch", "0..16"]),
    (["--prefetch", "17"], ["--prefetch", "0..16"]),
    (["--prefetch", str(10**12)], ["--prefetch", "0..16"]),
    (["--vram-budget-gb", "0"], ["--vram-budget-gb", "positive"]),
    (["--vram-budget-gb", "-1"], ["--vram-budget-gb", "positive"]),
    (["--vram-budget-gb", "nan"], ["--vram-budget-gb", "positive"]),
    (["--vram-budget-gb", "inf"], ["--vram-budget-gb", "positive"]),
    (["--iters", "0"], ["--iters", "1..1000"]),
    (["--iters", "-3"], ["--iters", "1..1000"]),
    (["--iters", str(10**12)], ["--iters", "1..1000"]),
    (["--frames", "0"], ["--frames", "positive"]),
    (["--frames", "-5"], ["--frames", "positive"]),
    (["--frames", "6"], ["--frames", "4k+1", "use 5 or 9"]),
    (["--frames", str(10**12)], ["--frames", "at most 4093"]),
    (["--height", "0"], ["--height", "positive"]),
    (["--height", "100"], ["--height", "multiples of 16"]),
    (["--height", str(10**12)], ["--height", "at most 16384"]),
    (["--width", "-16"], ["--width", "positive"]),
    (["--width", str(10**12)], ["--width", "at most 16384"]),
    (["--tokens", "0"], ["--tokens", "positive"]),
    (["--tokens", "-8"], ["--tokens", "positive"]),
    (["--tokens", "1031"], ["--tokens 1031", "multiple of 1560"]),  # a prime above 1024
    (["--tokens", str(10**12)], ["--tokens", "multiple of 1560"]),
    (["--device", ""], ["--device", "'cpu'"]),
    (["--device", "gpu"], ["--device gpu", "not a device name", "'cpu'"]),
    (["--device", "cuda:abc"], ["--device cuda:abc", "'cuda:N'"]),
    (["--device", "meta"], ["--device meta", "cuda or cpu"]),
    # paths
    (["--output", ""], ["--output", "empty", "results.json"]),
    (["--output", "{files}/a_folder"], ["--output", "is a folder", "a_folder/"]),
    (["--output", "{files}/a_folder/"], ["--output", "is a folder"]),
    (["--output", "no/such/folder/x.json"], ["--output", "does not exist", "create it"]),
    (["--output", "{model}", "--model-path", "{model}"], ["would overwrite --model-path"]),
    (["--model-path", ""], ["--model-path", "empty", "leave the option out"]),
    (["--model-path", "missing.safetensors"], ["--model-path", "does not exist"]),
    # contradictory pairs, and options that would be ignored
    (["--blocks-to-swap", "2", "--vram-budget-gb", "1"], ["not both"]),
    (["--test-all", "--blocks-to-swap", "2"], ["--blocks-to-swap", "--test-all", "leave"]),
    (["--test-all", "--vram-budget-gb", "4"], ["--vram-budget-gb", "--test-all"]),
    (["--test-all", "--prefetch", "2"], ["--prefetch", "--test-all"]),
    (["--tokens", "8", "--frames", "5"], ["--frames", "--tokens", "leave one"]),
    (["--tokens", "8", "--width", "64"], ["--width", "--tokens"]),
    (["--blocks-to-swap", "0", "--prefetch", "2"], ["--prefetch", "nothing is swapped"]),
    (
        ["--blocks-to-swap", "0", "--transfer-compression", "on"],
        ["--transfer-compression", "nothing is swapped"],
    ),
    (
        ["--transfer-compression", "on", "--device", "cpu"],
        ["--transfer-compression", "float32", "--dtype bf16"],
    ),
    (
        ["--transfer-compression", "auto", "--dtype", "fp16", "--device", "cpu"],
        ["--transfer-compression", "float16", "--dtype bf16"],
    ),
]


@pytest.mark.parametrize("argv, words", BAD_ARGUMENTS)
def test_bad_arguments_get_one_line_naming_the_option(
    argv, words, files, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    model = str(files / "wan_small.safetensors")
    argv = [a.replace("{model}", model).replace("{files}", str(files)) for a in argv]
    status, err = run_main(argv, capsys)
    assert_one_error_line(status, err, words)
    assert not os.listdir(tmp_path)  # no report, no chart


# Cases that read the model's header first (the small Wan file, 4 blocks).
MODEL_ARGUMENTS = [
    (["--blocks-to-swap", "5"], ["--blocks-to-swap", "0..4"]),
    (["--blocks-to-swap", str(10**12)], ["--blocks-to-swap", "0..4"]),
    (["--vram-budget-gb", "0.0001"], ["--vram-budget-gb 0.0001", "raise vram_budget_gb"]),
    # within every axis' limit, but no machine holds a forward's activations
    (["--tokens", str(1024**3)], ["--tokens", "gib of activations", "smaller latent"]),
    (
        ["--frames", "4093", "--height", "16384", "--width", "16384"],
        ["--frames", "gib of activations", "smaller latent"],
    ),
]


@pytest.mark.parametrize("argv, words", MODEL_ARGUMENTS)
def test_options_checked_against_the_model(argv, words, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = str(files / "wan_small.safetensors")
    status, err = run_main(["--model-path", model, "--device", "cpu", *argv], capsys)
    assert_one_error_line(status, err, words)
    assert not os.listdir(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="timing options need a CPU-only machine")
@pytest.mark.parametrize(
    "argv",
    [
        ["--blocks-to-swap", "2"],
        ["--vram-budget-gb", "4"],
        ["--prefetch", "2"],
        ["--test-all"],
        ["--iters", "3"],
        ["--transfer-compression", "on", "--dtype", "bf16"],
    ],
)
def test_timing_options_are_refused_where_nothing_is_timed(
    argv, files, tmp_path, capsys, monkeypatch
):
    """A real file on a machine without CUDA gets advice only, unless --device cpu: an option
    that sets what is timed would be ignored, so it is refused with the way to time."""
    monkeypatch.chdir(tmp_path)
    model = str(files / "wan_small.safetensors")
    status, err = run_main(["--model-path", model, *argv], capsys)
    assert_one_error_line(status, err, [argv[0], "--device cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_names_the_option(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, err = run_main(["--device", "cuda"], capsys)
    assert_one_error_line(status, err, ["--device cuda", "device='cpu'"])


@pytest.mark.parametrize(
    "name, words",
    [
        ("text.safetensors", ["not a checkpoint", "re-download"]),
        ("empty.safetensors", ["0 bytes", "re-download"]),
        ("random.safetensors", ["not a checkpoint", "re-download"]),
        ("random.gguf", ["GGUF magic", "re-download"]),
        ("model.ckpt", ["pickle"]),
        ("a_folder", ["no *.safetensors", "model component folder"]),
    ],
)
def test_files_that_are_no_checkpoint(name, words, files, tmp_path, capsys, monkeypatch):
    """The readers' CheckpointError, as one line: text, an empty file, random bytes, a
    pickle, a folder without a model."""
    monkeypatch.chdir(tmp_path)
    status, err = run_main(["--model-path", str(files / name), "--device", "cpu"], capsys)
    assert_one_error_line(status, err, [name, *words])


def test_malformed_but_parseable_checkpoints(files, tmp_path, capsys, monkeypatch):
    """A Wan file with a tensor of the wrong shape, one with a block's tensor missing: the
    readers' message, one line, no traceback."""
    from writers import random_state, write_safetensors

    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    monkeypatch.chdir(tmp_path)
    state = random_state(comfy_state_shapes(256, 512, 4, text_dim=64, freq_dim=256))
    key = "blocks.1.ffn.0.weight"
    cases = {
        "shape": ({**state, key: torch.zeros(513, 256, dtype=torch.bfloat16)}, "has shape"),
        "missing": ({k: v for k, v in state.items() if k != key}, "missing from the file"),
    }
    for name, (broken, words) in cases.items():
        path = files / f"broken_{name}.safetensors"
        write_safetensors(broken, path)
        status, err = run_main(["--model-path", str(path), "--device", "cpu"], capsys)
        assert_one_error_line(status, err, [path.name, words])
    assert not os.listdir(tmp_path)


REAL_PROCESS_CASES = [
    (["--iters", "abc"], ["--iters", "invalid int", "--help"]),
    (["--frames", "2"], ["--frames", "4k+1"]),
    (["--model-path", "{files}/random.safetensors"], ["random.safetensors", "corrupt"]),
]


def test_a_real_process_exits_2_with_one_line(files, tmp_path):
    """As users run it: status 2, the one line on stderr, nothing on stdout (the processes
    run side by side: each spends seconds importing torch)."""
    processes = [
        subprocess.Popen(
            [sys.executable, SCRIPT, *[a.replace("{files}", str(files)) for a in argv]],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, _ in REAL_PROCESS_CASES
    ]
    for process, (_, words) in zip(processes, REAL_PROCESS_CASES):
        out, err = process.communicate(timeout=120)
        assert_one_error_line(process.returncode, err, words)
        assert out == ""


@pytest.mark.parametrize("tokens", [1, 8, 1024, 1025, 1560, 3 * 1560, 5000, 65536, 1024**3])
def test_tokens_lay_out_within_the_rotary_embedding(tokens):
    """Any token count with a layout gets exactly that many tokens, at most 1024 patches per
    axis (diffusers' Wan rope): 5000 tokens in one row would fail inside the model."""
    from comfyui_wan_blockswap.test_performance import MAX_AXIS, token_grid

    frames, height, width = token_grid(tokens)
    assert frames * (height // 2) * (width // 2) == tokens
    assert max(frames, height // 2, width // 2) <= MAX_AXIS and height % 2 == width % 2 == 0


@pytest.mark.parametrize("frames", [1, 5, 81, 4093])
def test_valid_frame_counts_are_kept(frames):
    from comfyui_wan_blockswap.test_performance import latent_shape, parse_args

    args = parse_args(["--frames", str(frames), "--height", "480", "--width", "832"])
    assert latent_shape(args, (81, 480, 832)) == ((frames - 1) // 4 + 1, 60, 104)


def test_valid_values_keep_working(files, tmp_path, capsys, monkeypatch):
    """Values next to the refused ones run: more tokens than one rope axis holds (laid out
    over two), --blocks-to-swap 0 (the baseline, measured once), a budget above the model."""
    import json

    from comfyui_wan_blockswap import test_performance

    monkeypatch.chdir(tmp_path)
    model = str(files / "wan_small.safetensors")
    common = ["--model-path", model, "--device", "cpu", "--iters", "1"]
    status, err = run_main([*common, "--tokens", "1200", "--blocks-to-swap", "0"], capsys)
    assert status == 0, err
    with open(tmp_path / "block_swap_performance_results.json") as handle:
        report = json.load(handle)
    assert report["latent"]["tokens"] == 1200 and len(report["results"]) == 1
    assert report["results"][0]["ms"] > 0

    planned = []
    monkeypatch.setattr(
        test_performance,
        "measure_all",
        lambda args, *rest: planned.append(test_performance.settings(args, 4)),
    )
    status, err = run_main([*common, "--tokens", "8", "--vram-budget-gb", "1e12"], capsys)
    assert status == 0, err
    assert planned[-1][1] == {"vram_budget_gb": 1e12, "prefetch_blocks": 1}


def test_running_out_of_device_memory_mid_sweep_is_our_error(files, tmp_path, capsys, monkeypatch):
    """Past the estimate checked before: torch's out-of-memory error becomes ours, naming the
    options that shrink the need (a GPU's; simulated here)."""
    from comfyui_wan_blockswap import test_performance

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(test_performance, "measure", out_of_memory)
    model = str(files / "wan_small.safetensors")
    status, err = run_main(["--model-path", model, "--device", "cpu", "--tokens", "8"], capsys)
    last = err.strip().splitlines()[-1]
    assert status == 2 and last.startswith("error: ") and "Traceback" not in err
    assert "ran out of cpu memory" in last and "--tokens" in last and "--blocks-to-swap" in last


def test_a_baseline_too_large_for_the_card_is_skipped_and_the_sweep_goes_on(
    files, tmp_path, capsys, monkeypatch
):
    """On a small card the default sweep's first setting (nothing swapped) does not fit: that
    row says so, and the swapped settings are still measured."""
    from comfyui_wan_blockswap import test_performance

    measure = test_performance.measure

    def no_room_without_swapping(path, options, *args, **kwargs):
        if options.get("blocks_to_swap") == 0:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return measure(path, options, *args, **kwargs)

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(test_performance, "measure", no_room_without_swapping)
    model = str(files / "wan_small.safetensors")
    argv = ["--model-path", model, "--device", "cpu", "--tokens", "8", "--iters", "1"]
    status, err = run_main([*argv, "--output", "r.json"], capsys)
    assert status == 0, err
    rows = json.loads((tmp_path / "r.json").read_text())["results"]
    assert rows[0] == {
        "options": {"blocks_to_swap": 0},
        "blocks_to_swap": 0,
        "status": "out of memory",
    }
    assert len(rows) == 3 and all("ms" in row and "slowdown" not in row for row in rows[1:])


def test_a_report_that_cannot_be_written_is_our_error(tmp_path):
    """The folder was checked before measuring; a write that still fails (a full disk, a
    special file) names --output, not an OSError's traceback."""
    from comfyui_wan_blockswap import perf_report
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    report = perf_report.new_report(
        torch.device("cpu"), torch.float32, "m", "wan.comfyui", 4, (1, 2, 2), None
    )
    output = str(tmp_path / "gone" / "x_results.json")
    with pytest.raises(BlockSwapConfigError, match="--output .*choose another file"):
        perf_report.finish(report, output, (8,))


# ---- the nodes -----------------------------------------------------------------------------

WIDGETS = dict(
    blocks_to_swap=2,
    offload_txt_emb=False,
    offload_img_emb=False,
    use_non_blocking=True,
    vace_blocks_to_swap=0,
    prefetch_blocks=1,
    block_swap_debug=False,
)
PRESET = "Wan 2.1/2.2 14B, 12 GB"
NAN = float("nan")

# (widget changes, words the message holds: the widget and the fix or the allowed values)
BAD_WIDGETS = [
    (dict(blocks_to_swap=-1), ["blocks_to_swap", "0..200"]),
    (dict(blocks_to_swap=201), ["blocks_to_swap", "0..200"]),
    (dict(blocks_to_swap=10**12), ["blocks_to_swap", "0..200"]),
    (dict(blocks_to_swap="3"), ["blocks_to_swap", "whole number"]),
    (dict(blocks_to_swap=2.5), ["blocks_to_swap", "whole number"]),
    (dict(blocks_to_swap=NAN), ["blocks_to_swap", "whole number"]),
    (dict(blocks_to_swap=None), ["blocks_to_swap", "whole number"]),
    (dict(blocks_to_swap=True), ["blocks_to_swap", "whole number"]),
    (dict(vace_blocks_to_swap=-1), ["vace_blocks_to_swap", "0..64"]),
    (dict(vace_blocks_to_swap=65), ["vace_blocks_to_swap", "0..64"]),
    (dict(vace_blocks_to_swap=""), ["vace_blocks_to_swap", "whole number"]),
    (dict(prefetch_blocks=-1), ["prefetch_blocks", "0..16"]),
    (dict(prefetch_blocks=17), ["prefetch_blocks", "0..16"]),
    (dict(prefetch_blocks=1.0), ["prefetch_blocks", "whole number"]),
    (dict(vram_budget_gb=-2.0), ["vram_budget_gb", "0.0..512.0", "0 = use blocks_to_swap"]),
    (dict(vram_budget_gb=NAN), ["vram_budget_gb", "0.0..512.0"]),
    (dict(vram_budget_gb=float("inf")), ["vram_budget_gb", "0.0..512.0"]),
    (dict(vram_budget_gb=513.0), ["vram_budget_gb", "0.0..512.0"]),
    (dict(vram_budget_gb=1e12), ["vram_budget_gb", "0.0..512.0"]),
    (dict(vram_budget_gb="8"), ["vram_budget_gb", "number of GB"]),
    (dict(vram_budget_gb=None), ["vram_budget_gb", "number of GB"]),
    (dict(vram_budget_gb=True), ["vram_budget_gb", "number of GB"]),
    (dict(offload_txt_emb="yes"), ["offload_txt_emb", "True or False"]),
    (dict(offload_img_emb=None), ["offload_img_emb", "True or False"]),
    (dict(use_non_blocking=1), ["use_non_blocking", "True or False"]),
    (dict(block_swap_debug="false"), ["block_swap_debug", "True or False"]),
    (dict(transfer_compression="maybe"), ["transfer_compression", "'off', 'auto', 'on'"]),
    (dict(transfer_compression=""), ["transfer_compression", "'off', 'auto', 'on'"]),
    (dict(transfer_compression=1), ["transfer_compression", "'off', 'auto', 'on'"]),
    (dict(transfer_compression=[]), ["transfer_compression", "'off', 'auto', 'on'"]),
    (dict(preset="Wan 14B, 13 GB"), ["preset 'Wan 14B, 13 GB' does not exist", "choose"]),
    (dict(preset=None), ["preset None does not exist", "choose"]),
    (dict(preset=3), ["preset 3 does not exist"]),
    (dict(preset="auto (free VRAM now)", vram_budget_gb=4.0), ["vram_budget_gb", "preset"]),
    (dict(preset=PRESET, vram_budget_gb=4.0), ["vram_budget_gb 4.0", "vram_budget_gb to 0"]),
    (dict(blocks_to_sawp=3), ["blocks_to_sawp", "recreate the node"]),
    (dict(donor_allocation=None), ["donor_allocation", "cuda:1,8gb;cpu,*"]),
    (dict(donor_allocation="cuda:1"), ["cuda:1", "cuda:1,8gb;cpu,*"]),
    (dict(donor_allocation="cpu,50%;cpu,*"), ["both name cpu", "give each device once"]),
]


def toy_model():
    from toy_models import make_toy

    return make_toy()


@pytest.mark.parametrize("changes, words", BAD_WIDGETS)
def test_bad_widgets_name_the_widget_and_leave_the_model_alone(changes, words):
    """config_from_widgets and the node itself: our error by name, nothing applied (the
    widgets are checked before the model is touched, or ComfyUI imported)."""
    from comfyui_wan_blockswap.nodes import WanBlockSwapStream
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError
    from comfyui_wan_blockswap.wan_blockswap.engine import active_swap

    model = toy_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockSwapConfigError) as info:
        WanBlockSwapStream().apply(model, **{**WIDGETS, **changes})
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert active_swap(model) is None
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_missing_widget_is_named():
    from comfyui_wan_blockswap.nodes import WanBlockSwapStream
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    widgets = {k: v for k, v in WIDGETS.items() if k != "prefetch_blocks"}
    with pytest.raises(BlockSwapConfigError, match=r"missing: \['prefetch_blocks'\]"):
        WanBlockSwapStream().apply(toy_model(), **widgets)


def test_good_widgets_are_kept():
    """The user's prefetch_blocks stays theirs under a named preset (the preset sets the
    budget); an integer budget counts as GB."""
    from comfyui_wan_blockswap.nodes import config_from_widgets

    config = config_from_widgets(**{**WIDGETS, "preset": PRESET, "prefetch_blocks": 3})
    assert config.prefetch_blocks == 3 and config.vram_budget_gb == 7.5
    assert config_from_widgets(**{**WIDGETS, "vram_budget_gb": 4}).vram_budget_gb == 4
    assert config_from_widgets(**WIDGETS, transfer_compression=True).transfer_compression


@pytest.fixture
def diffusion_models(monkeypatch, files):
    """models/diffusion_models holds ``files``: through core's folder_paths where a test
    imported core, else through a stand-in."""
    core = sys.modules.get("folder_paths")
    if core is not None and hasattr(core, "add_model_folder_path"):
        core.add_model_folder_path("diffusion_models", str(files))
        return files
    stand_in = types.ModuleType("folder_paths")

    def get_full_path(folder, name):
        path = os.path.join(str(files), name)
        return path if folder == "diffusion_models" and os.path.isfile(path) else None

    stand_in.get_full_path = get_full_path
    stand_in.get_filename_list = lambda folder: sorted(os.listdir(files))
    monkeypatch.setitem(sys.modules, "folder_paths", stand_in)
    return files


@pytest.mark.parametrize(
    "unet_name, weight_dtype, changes, error, words",
    [
        ("wan_small.safetensors", "default", dict(preset="auto (free VRAM now)"), "config",
         ["preset 'auto (free VRAM now)' needs a loaded model", "WAN BlockSwap node"]),
        ("wan_small.safetensors", "fp4", {}, "config", ["weight_dtype", "fp8_e4m3fn"]),
        ("wan_small.safetensors", None, {}, "config", ["weight_dtype", "default"]),
        ("wan_small.safetensors", "default", dict(prefetch_blocks=99), "config",
         ["prefetch_blocks", "0..16"]),
        ("", "default", {}, "file", ["unet_name", "models/diffusion_models"]),
        (None, "default", {}, "file", ["unet_name", "models/diffusion_models"]),
        ("missing.safetensors", "default", {}, "file", ["'missing.safetensors'", "put it there"]),
    ],
)  # fmt: skip
def test_loader_refuses_bad_inputs_by_name(
    diffusion_models, unet_name, weight_dtype, changes, error, words
):
    from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError
    from comfyui_wan_blockswap.nodes import WanBlockSwapModelLoader
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    kind = BlockSwapConfigError if error == "config" else CheckpointError
    with pytest.raises(kind) as info:
        WanBlockSwapModelLoader().load(unet_name, weight_dtype, **{**WIDGETS, **changes})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_loader_does_not_offer_auto(diffusion_models):
    """'auto' plans from a loaded model: the loader's preset list leaves it out and defaults
    to the widgets, so a fresh loader node never starts on a value it refuses."""
    from comfyui_wan_blockswap.nodes import AUTO, CUSTOM, WanBlockSwapModelLoader

    choices, options = WanBlockSwapModelLoader.INPUT_TYPES()["optional"]["preset"]
    assert AUTO not in choices and options["default"] == CUSTOM == choices[0]


# ---- the nodes on ComfyUI core (COMFYUI_PATH): files core reads, a model core built -------


@pytest.mark.comfyui
@pytest.mark.parametrize(
    "name, words",
    [
        ("text.safetensors", ["not a checkpoint"]),
        ("empty.safetensors", ["0 bytes"]),
        ("random.safetensors", ["not a checkpoint"]),
        ("random.gguf", ["not a GGUF file"]),
    ],
)
def test_loader_files_that_are_no_checkpoint(comfy, diffusion_models, name, words):
    from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError
    from comfyui_wan_blockswap.nodes import WanBlockSwapModelLoader

    with pytest.raises(CheckpointError) as info:
        WanBlockSwapModelLoader().load(name, "default", **WIDGETS)
    for word in [name, *words]:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.comfyui
def test_a_value_the_model_cannot_take_applies_nothing(comfy):
    """blocks_to_swap beyond the model's blocks (within the widget's range): our error, the
    upstream MODEL untouched and no swap left registered anywhere."""
    import tiny_models

    from comfyui_wan_blockswap.nodes import WanBlockSwapStream
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError
    from comfyui_wan_blockswap.wan_blockswap.engine import _active, active_swap

    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    model = patcher.model.diffusion_model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(BlockSwapConfigError, match="blocks_to_swap must be in 0..4"):
        WanBlockSwapStream().apply(patcher, **{**WIDGETS, "blocks_to_swap": 9})
    assert active_swap(model) is None and not _active
    for module in patcher.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
