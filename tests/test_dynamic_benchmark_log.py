"""benchmarks/comfyui_dynamic_benchmark.py keeps the server's plan and load lines in each row
(the run's whole server log may not come back from the GPU machine)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import comfyui_dynamic_benchmark as bench  # noqa: E402

LOG = (
    "\x1b[32m[INFO]\x1b[0m wan_blockswap auto: 3.24 GiB of VRAM can be had, 1.58 GiB kept\n"
    "  0%|          | 0/4 [00:00<?, ?it/s]\r 25%|##5 | 1/4 [00:00<00:01]"
    "\x1b[32m[INFO]\x1b[0m transfer_compression=auto: a forward took 63.9 ms\n"
    "[INFO] loaded partially; 1969.59 MB loaded\n"
    "[INFO] Prompt executed in 1.15 seconds\n"
)


def test_the_plan_and_load_lines_are_kept_without_colours_or_progress_bars():
    lines = bench.kept_log_lines(LOG)
    assert lines == [
        "[INFO] wan_blockswap auto: 3.24 GiB of VRAM can be had, 1.58 GiB kept",
        "[INFO] transfer_compression=auto: a forward took 63.9 ms",
        "[INFO] loaded partially; 1969.59 MB loaded",
    ]


def test_server_env_takes_key_value_pairs_and_refuses_others():
    import pytest

    env = bench.server_env(["PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True", "A=b=c"])
    assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "A": "b=c"}
    for bad in ("NOVALUE", "=x"):
        with pytest.raises(ValueError, match="KEY=VALUE"):
            bench.server_env([bad])


def test_experiment_arms_run_an_edited_copy_of_the_pack_and_only_when_named(tmp_path):
    """An experiment arm installs a copy of the pack with its one constant changed (each
    text found once), and the next arm gets the checkout itself back; the default arms leave
    the experiments out."""
    import comfy_server as cs

    custom_nodes = str(tmp_path)
    assert not any(bench._experiment(arm) for arm in ("core_dynamic", "ours_default"))
    experiments = [arm for arm in bench.ARMS if bench._experiment(arm)]
    assert experiments == [
        "ours_no_chunks",
        "ours_margin_1_3",
        "ours_unpacked",
        "ours_whole_hidden",
        "ours_no_lookahead",
    ]
    for arm in experiments:
        assert bench._experiment(arm)
        target = cs.install_pack(custom_nodes, bench.ARMS[arm]["pack_patches"])
        assert not os.path.islink(target) and not os.path.exists(os.path.join(target, "tests"))
        for name, (text, replacement) in bench.ARMS[arm]["pack_patches"].items():
            with open(os.path.join(target, name)) as copy, open(os.path.join(ROOT, name)) as own:
                edited, original = copy.read(), own.read()
            assert replacement in edited and text not in edited
            assert edited == original.replace(text, replacement)
    target = cs.install_pack(custom_nodes)
    assert os.path.realpath(target) == os.path.realpath(ROOT)
    with pytest.raises(ValueError, match="occurs 0 times"):
        cs.install_pack(custom_nodes, {"nodes.py": ("no such text", "")})
    assert not os.path.exists(target)  # nothing half-installed


def test_the_i2v_model_has_image_keys_and_values_and_keeps_the_t2v_file_name():
    from comfyui_wan_blockswap.model_configs.wan import (
        comfy_state_shapes,
        diffusers_config_from_comfy_shapes,
    )

    assert bench.model_file(40) == "wan14b_40blocks.safetensors"  # earlier runs' files reused
    assert bench.model_file(40, "i2v") == "wan14b_i2v_40blocks.safetensors"
    shapes = comfy_state_shapes(dim=256, ffn_dim=512, num_layers=2, **bench.MODELS["i2v"])
    config = diffusers_config_from_comfy_shapes(shapes)
    assert config["in_channels"] == 36 and config["image_dim"] == 1280
    assert "blocks.1.cross_attn.k_img.weight" in shapes
    assert "img_emb.proj.0.weight" not in comfy_state_shapes(256, 512, 2, **bench.MODELS["t2v"])
