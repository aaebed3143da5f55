"""Lazy loading from real files written in tmp_path: every format equals a model loaded the
ordinary way, bad files and mismatched keys are clear errors that leave nothing behind."""

import json
import os

import pytest
import torch

from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError, open_checkpoint
from comfyui_wan_blockswap.callbacks.gguf_dequant import dequantize
from comfyui_wan_blockswap.callbacks.lazy_loader import load_swapped
from comfyui_wan_blockswap.callbacks.skeleton import CheckpointMismatchError
from writers import random_state, to_fp8, write_gguf, write_safetensors
from comfyui_wan_blockswap.model_configs.wan import (
    comfy_state_shapes,
    diffusers_config_from_comfy_shapes,
)
from comfyui_wan_blockswap.wan_blockswap import get_block_swap, registered_host_bytes

diffusers = pytest.importorskip("diffusers")
from diffusers.loaders.single_file_utils import (  # noqa: E402
    convert_wan_transformer_to_diffusers,
)

SHAPES = comfy_state_shapes(128, 256, 3, text_dim=32, freq_dim=16)
KEEP_FP32 = diffusers.WanTransformer3DModel._keep_in_fp32_modules


@pytest.fixture(scope="module")
def state():
    return random_state(SHAPES, seed=3)


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(
        hidden_states=torch.randn(1, 16, 2, 8, 8, generator=gen).bfloat16(),
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 6, 32, generator=gen).bfloat16(),
        return_dict=False,
    )


def reference_output(values, x):
    """The ordinary way: a diffusers model built with all weights in memory, bf16 except the
    modules diffusers keeps in fp32."""
    model = diffusers.WanTransformer3DModel(**diffusers_config_from_comfy_shapes(SHAPES)).eval()
    model.load_state_dict(
        convert_wan_transformer_to_diffusers({k: v.float() for k, v in values.items()})
    )
    for name, param in model.named_parameters():
        if not any(part in KEEP_FP32 for part in name.split(".")):
            param.data = param.data.bfloat16()
    with torch.no_grad():
        return model(**x)[0]


def run(model, x):
    with torch.no_grad():
        return model(**x)[0]


@pytest.mark.parametrize("prefix", ["model.diffusion_model.", ""])
@pytest.mark.parametrize("stored", ["bf16", "fp32", "fp8"])
def test_safetensors_formats_equal_the_ordinary_load(tmp_path, state, prefix, stored):
    values = {
        "bf16": state,
        "fp32": {k: v.float() for k, v in state.items()},
        "fp8": to_fp8(state),
    }[stored]
    path = tmp_path / "wan.safetensors"
    write_safetensors(values, path, prefix=prefix)
    model, swap, report = load_swapped(str(path), blocks_to_swap=2, device="cpu")
    assert report.arch == "wan.comfyui" and report.format == "safetensors"
    assert swap.plan.swapped == ("blocks.0", "blocks.2")  # spread out, the last included
    x = inputs()
    assert torch.equal(run(model, x), reference_output(values, x))
    if stored == "fp8":
        linear = model.blocks[2].ffn.net[2]
        assert type(linear).__name__ == "CastLinear"
        assert (
            swap.plan.swapped_bytes
            < sum(v.numel() for k, v in state.items() if "blocks.1." in k) * 2 * 2
        )
    swap.remove()


def test_lazy_load_with_transfer_compression_packs_each_filled_unit(tmp_path, state, monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap import compressed_transfer

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 4096)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)
    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    model, swap, _ = load_swapped(
        str(path), blocks_to_swap=2, device="cpu", transfer_compression=True
    )
    assert swap.plan.staging_bytes > 0
    assert all(u.transfer is not None and u.transfer.packed_pieces for u in swap.units)
    x = inputs()
    assert torch.equal(run(model, x), reference_output(state, x))
    saved = model.state_dict()  # the real weights, not the packed ones
    assert torch.equal(saved["blocks.2.ffn.net.0.proj.weight"], state["blocks.2.ffn.0.weight"])
    swap.remove()


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_K"])
def test_gguf_stays_quantized_and_equals_dequantized_weights(tmp_path, state, qtype):
    path = tmp_path / "wan.gguf"
    write_gguf(state, path, qtype)
    with open_checkpoint(path) as checkpoint:
        values = {}
        for key, record in checkpoint.records.items():
            raw = checkpoint.read(key)
            if record.qtype is not None:
                values[key] = dequantize(raw, record.qtype, record.shape, dtype=torch.float32)
            else:
                values[key] = raw.view(record.dtype).view(record.shape).float()
    model, swap, report = load_swapped(str(path), blocks_to_swap=3, device="cpu")
    assert report.format == "gguf"
    linear = model.blocks[0].ffn.net[2]  # in_features 256: a whole block for every type
    assert type(linear).__name__ == "GGUFLinear" and linear.weight.dtype == torch.uint8
    x = inputs(1)
    assert torch.equal(run(model, x), reference_output(values, x))
    swap.remove()


def test_diffusers_sharded_folder_with_index(tmp_path):
    torch.manual_seed(0)
    source = diffusers.WanTransformer3DModel(**diffusers_config_from_comfy_shapes(SHAPES)).eval()
    source.save_pretrained(tmp_path / "transformer", max_shard_size="200KB")
    files = os.listdir(tmp_path / "transformer")
    assert any(f.endswith(".index.json") for f in files) and "config.json" in files
    model, swap, report = load_swapped(
        str(tmp_path / "transformer"), compute_dtype=torch.float32, blocks_to_swap=1, device="cpu"
    )
    x = {
        k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v)
        for k, v in inputs(2).items()
    }
    with torch.no_grad():
        assert torch.equal(model(**x)[0], source(**x)[0])
    swap.remove()


def test_progress_reports_every_byte(tmp_path, state):
    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    seen = []
    model, swap, report = load_swapped(
        str(path),
        device="cpu",
        progress=lambda done, total, label: seen.append((done, total, label)),
    )
    assert seen and seen[-1][0] == seen[-1][1] == report.file_bytes
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:]))
    assert {"blocks.0", "blocks.2"} <= {label for _, _, label in seen}
    swap.remove()


@pytest.mark.parametrize("chunk_tokens", [8192, 0])
def test_the_file_model_is_sized_as_the_load_cuts_its_units(tmp_path, state, chunk_tokens):
    """A plan made from the header alone equals the one the load applies, with token-wise
    parts as units of their own or not ([Note: token chunks])."""
    from comfyui_wan_blockswap.callbacks.lazy_loader import read_file_model
    from comfyui_wan_blockswap.wan_blockswap import SwapConfig
    from comfyui_wan_blockswap.wan_blockswap.plan import plan_swap

    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    file_model = read_file_model(path, chunk_tokens=chunk_tokens)
    layers = {len(b.layer_bytes) for b in file_model.sizes.blocks}
    model, swap, _ = load_swapped(
        str(path), blocks_to_swap=2, swap_unit="layer", chunk_tokens=chunk_tokens, device="cpu"
    )
    assert file_model.sizes == swap.sizes
    config = SwapConfig(blocks_to_swap=2, swap_unit="layer", chunk_tokens=chunk_tokens)
    assert plan_swap(file_model.sizes, config) == swap.plan
    swap.remove()
    # Wan's FFN: one unit with chunks, its two Linear layers as units of their own without
    other = read_file_model(path, chunk_tokens=8192 - chunk_tokens)
    assert layers == {len(b.layer_bytes) + (-1 if chunk_tokens else 1) for b in other.sizes.blocks}


def test_remove_after_lazy_load_gives_cpu_weights(tmp_path, state):
    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    model, swap, _ = load_swapped(str(path), blocks_to_swap=1, device="cpu")
    x = inputs(4)
    expected = run(model, x)
    swap.remove()
    assert all(p.device.type == "cpu" and p.numel() > 0 for p in model.parameters())
    assert torch.equal(run(model, x), expected)


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
        ),
    ],
)
def test_a_lazily_loaded_model_dropped_without_remove_is_freed_at_once(tmp_path, state, device):
    """[Note: no strong path to the model] A lazy load moves the skeleton's resident tensors
    (some owned by the model itself: ``scale_shift_table``) and keeps refs to them for
    remove(). Dropping the model without remove(), as ComfyUI drops a replaced model, frees
    it, its swap and its host buffers by reference counting alone. (Refs that held their
    owner strongly kept every such model alive through the swap registry: 14 GiB of pinned
    memory per soak pass on the H100.)"""
    import gc
    import weakref

    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    x = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs(5).items()}
    if device == "cuda":  # once with remove() first: cuBLAS's workspace stays allocated
        model, swap, _ = load_swapped(str(path), blocks_to_swap=2, device=device)
        run(model, x)
        swap.remove()
        del model, swap, _
    baseline = registered_host_bytes()
    on_device = torch.cuda.memory_allocated() if device == "cuda" else 0
    model, swap, _ = load_swapped(str(path), blocks_to_swap=2, device=device)
    run(model, x)
    assert any(ref.owner is model for ref, _, _ in swap._moved)  # the case that leaked
    refs = [weakref.ref(model), weakref.ref(swap)] + [weakref.ref(u.host) for u in swap.units]
    gc.disable()  # no cycle collector: nothing may need it
    try:
        del model, swap, _
        alive = [ref() is not None for ref in refs]
    finally:
        gc.enable()
    assert not any(alive), alive
    _assert_nothing_left(baseline)
    if device == "cuda":
        assert torch.cuda.memory_allocated() == on_device


def _assert_nothing_left(baseline):
    assert registered_host_bytes() == baseline
    from comfyui_wan_blockswap.wan_blockswap.engine import _active

    assert not list(_active.keys())


def test_missing_and_unexpected_keys_are_named(tmp_path, state):
    baseline = registered_host_bytes()
    broken = dict(state)
    del broken["blocks.1.ffn.0.weight"]
    broken["blocks.1.extra.weight"] = torch.zeros(2)
    path = tmp_path / "wan.safetensors"
    write_safetensors(broken, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_swapped(str(path), device="cpu")
    message = str(info.value)
    assert "blocks.1.ffn.net.0.proj.weight" in message and "blocks.1.extra.weight" in message
    assert str(path) in message
    _assert_nothing_left(baseline)


def test_shape_mismatch_is_named(tmp_path, state):
    from accelerate import init_empty_weights

    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path, prefix="")
    with init_empty_weights():
        config = diffusers_config_from_comfy_shapes(SHAPES)
        skeleton = diffusers.WanTransformer3DModel(**{**config, "ffn_dim": 512})
    diffusers_path = tmp_path / "d.safetensors"
    write_safetensors(convert_wan_transformer_to_diffusers(dict(state)), diffusers_path, prefix="")
    with pytest.raises(
        CheckpointMismatchError,
        match=r"blocks\.0\.ffn\.net\.0\.proj\.weight.*\(256, 128\).*\(512, 128\)",
    ):
        load_swapped(str(diffusers_path), skeleton=skeleton, device="cpu")


def test_truncated_file_fails_cleanly(tmp_path, state):
    baseline = registered_host_bytes()
    path = tmp_path / "wan.safetensors"
    size = write_safetensors(state, path)
    with open(path, "r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(CheckpointError):
        load_swapped(str(path), device="cpu")
    _assert_nothing_left(baseline)


def test_missing_file_and_pickle_are_refused(tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors"):
        load_swapped(str(tmp_path / "nope.safetensors"), device="cpu")
    pickle_path = tmp_path / "model.ckpt"
    pickle_path.write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="(?i)pickle"):
        load_swapped(str(pickle_path), device="cpu")


def test_unknown_layout_without_skeleton_says_what_to_do(tmp_path):
    path = tmp_path / "other.safetensors"
    write_safetensors({"layers.0.weight": torch.zeros(4, 4)}, path, prefix="")
    with pytest.raises(CheckpointError, match="skeleton"):
        load_swapped(str(path), device="cpu")


def test_ram_shortage_is_refused_before_allocating(tmp_path, state, monkeypatch):
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError, memory

    baseline = registered_host_bytes()
    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: 1024)
    with pytest.raises(InsufficientMemoryError, match="host RAM"):
        load_swapped(str(path), device="cpu")
    _assert_nothing_left(baseline)


@pytest.mark.cuda
@pytest.mark.parametrize("stored", ["bf16", "fp8", "q8_0"])
def test_lazy_load_on_cuda_equals_reference(tmp_path, state, stored):
    if stored == "q8_0":
        path = tmp_path / "wan.gguf"
        write_gguf(state, path, "Q8_0")
    else:
        path = tmp_path / "wan.safetensors"
        write_safetensors(to_fp8(state) if stored == "fp8" else state, path)
    # cuBLAS takes its 32 MiB workspace from the allocator at the first matmul, and cuBLASLt
    # another 1 MiB at the first linear with a bias: both before the baseline, so that they
    # are not counted as left behind (when this test runs first in a process)
    ones = torch.ones(8, 8, device="cuda", dtype=torch.bfloat16)
    assert float((ones @ ones).sum()) == 512
    assert float(torch.nn.functional.linear(ones, ones, ones[0]).sum()) == 576
    del ones
    baseline = torch.cuda.memory_allocated()
    model, swap, report = load_swapped(str(path), blocks_to_swap=2, device="cuda")
    cpu_model, cpu_swap, _ = load_swapped(str(path), blocks_to_swap=0, device="cpu")
    for seed in range(3):
        x = inputs(seed)
        on_gpu = run(model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in x.items()})
        assert on_gpu.isfinite().all()
        torch.testing.assert_close(
            on_gpu.cpu().float(), run(cpu_model, x).float(), atol=0.1, rtol=0.1
        )
    del on_gpu  # the last output is not part of the baseline
    swap.remove(restore=False)
    cpu_swap.remove()
    del model, cpu_model  # an unload drops the model too
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= baseline + 4096


def test_terminal_progress_bar_draws_per_block(tmp_path, state):
    import io

    from comfyui_wan_blockswap.callbacks.progress import TerminalProgress

    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    stream = io.StringIO()
    model, swap, report = load_swapped(str(path), device="cpu", progress=TerminalProgress(stream))
    text = stream.getvalue()
    assert text.endswith("\n") and "100.0%" in text and "loading" in text
    swap.remove()


@pytest.mark.parametrize("shape", [(96, 512), (12, 4, 2, 512), (512,)])  # 2-D, conv, bias
@pytest.mark.parametrize("qtype", ["Q4_K", "Q8_0", None])
def test_decode_into_goes_a_few_rows_at_a_time_and_equals_whole_decode(
    tmp_path, monkeypatch, qtype, shape
):
    from comfyui_wan_blockswap.callbacks import lazy_loader as lazy_loader

    weight = torch.randn(shape) / 20
    if qtype is None:
        path = tmp_path / "w.safetensors"
        write_safetensors({"w": weight.to(torch.float8_e4m3fn)}, path, prefix="")
    else:
        path = tmp_path / "w.gguf"
        write_gguf({"w": weight}, path, qtype)
    with open_checkpoint(str(path)) as checkpoint:
        record = checkpoint.records["w"]
        raw = torch.empty(record.nbytes, dtype=torch.uint8)
        checkpoint.read_into("w", raw)
    whole = lazy_loader._decode(raw, record, torch.bfloat16, False)
    # 10 rows of 512 bf16 values per chunk: ten chunks, the last one short
    monkeypatch.setattr(lazy_loader, "DECODE_CHUNK_BYTES", 10 * 512 * 2)
    dest = torch.full(shape, float("nan"), dtype=torch.bfloat16)
    lazy_loader.decode_into(dest, raw, record, torch.bfloat16)
    assert torch.equal(dest, whole)


def test_a_float_weight_stored_as_integers_is_refused(state, tmp_path):
    """Integers in the file where the model holds floating-point weights would load as junk:
    refused by name before anything is allocated."""
    key = "blocks.0.ffn.0.weight"
    bad = dict(state)
    bad[key] = state[key].float().mul(100).to(torch.int32)
    path = tmp_path / "int_weight.safetensors"
    write_safetensors(bad, path)
    before = registered_host_bytes()
    with pytest.raises(CheckpointMismatchError, match=r"blocks\.0\.ffn\.0\.weight.*int32"):
        load_swapped(path, blocks_to_swap=2, device="cpu")
    assert registered_host_bytes() == before


def test_the_default_compute_dtype_says_when_it_casts(state, tmp_path, caplog):
    """fp32 weights loaded without a compute_dtype become bf16, with a warning naming it; a
    bf16 file, or an explicit dtype, loads quietly."""
    import logging

    path = tmp_path / "fp32.safetensors"
    write_safetensors({k: v.float() for k, v in state.items()}, path)
    with caplog.at_level(logging.WARNING):
        _, swap, _ = load_swapped(path, blocks_to_swap=1, device="cpu")
    swap.remove()
    assert "float32 weights are cast to bfloat16, the default compute_dtype" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _, swap, _ = load_swapped(path, blocks_to_swap=1, device="cpu", compute_dtype=torch.float32)
    swap.remove()
    bf16 = tmp_path / "bf16.safetensors"
    write_safetensors(state, bf16)
    with caplog.at_level(logging.WARNING):
        _, swap, _ = load_swapped(bf16, blocks_to_swap=1, device="cpu")
    swap.remove()
    assert "compute_dtype" not in caplog.text


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_units_stored_on_a_gpu_are_filled_through_host_memory(tmp_path, state, monkeypatch):
    """A unit stored on a donor GPU cannot take ``readinto``: its bytes go through host
    memory. Stood in for by the compute GPU itself (one GPU), every other unit."""
    from comfyui_wan_blockswap.wan_blockswap import engine

    def stores(plan, units):
        return [torch.device("cuda:0") if i % 2 else None for i in range(units)]

    monkeypatch.setattr(engine, "storage_devices", stores)
    path = tmp_path / "wan.safetensors"
    write_safetensors(state, path)
    model, swap, _ = load_swapped(str(path), blocks_to_swap=3, device="cuda")
    assert any(u.host.tensor.is_cuda for u in swap.units)
    saved = model.state_dict()
    for key in ("blocks.0.ffn.net.0.proj.weight", "blocks.1.ffn.net.0.proj.weight"):
        comfy_key = key.replace("ffn.net.0.proj", "ffn.0")
        assert torch.equal(saved[key].cpu(), state[comfy_key])
    swap.remove()
