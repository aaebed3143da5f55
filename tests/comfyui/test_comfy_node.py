"""The WAN BlockSwap node on ComfyUI core's own loading path: tiny models built by
``comfy.sd.load_diffusion_model_state_dict``, loaded by ``load_models_gpu``, compared with
the same model without the node, with and without a LoRA-style weight patch."""

import gc
import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import tiny_models

ARCHS = [
    "wan_t2v",
    "wan_i2v",
    "wan_vace",
    "hunyuan_video",
    "flux",
    "cosmos_predict1",
    "cosmos_predict2",
]


def run(comfy, patcher, inputs):
    comfy.model_management.load_models_gpu([patcher])
    out = forward(patcher, inputs)
    patcher.cleanup()
    return out


def forward(patcher, inputs):
    """One call of the loaded diffusion model, as core's apply_model makes it."""
    # as core's apply_model does: every tensor (lists too: Flux.2's ref_latents) on the load
    # device, floats in the dtype the model computes in (on a GPU core may pick fp16 for a
    # bf16 file), the timestep in float32
    dtype = patcher.model.manual_cast_dtype or patcher.model.get_dtype()
    x = tiny_models.core_inputs(inputs, patcher.load_device, dtype)
    with torch.inference_mode():
        out = patcher.model.diffusion_model(**x)
    return (out[0] if isinstance(out, tuple) else out).float().cpu()


WIDGETS = dict(
    blocks_to_swap=2,
    offload_txt_emb=False,
    offload_img_emb=False,
    use_non_blocking=True,
    vace_blocks_to_swap=0,
    prefetch_blocks=1,
    block_swap_debug=False,
)


def config(**options):
    from conftest import load_pack

    return load_pack().nodes.config_from_widgets(**{**WIDGETS, **options})


def node(model, **options):
    from conftest import load_pack

    return load_pack().nodes.WanBlockSwapStream().apply(model, **{**WIDGETS, **options})[0]


def swap_of(model):
    """The block swap behind one of the node's MODEL outputs (on its private model)."""
    from comfyui_wan_blockswap.wan_blockswap import get_block_swap

    return get_block_swap(model.model.diffusion_model)


def assert_chunked_equals(out: torch.Tensor, expected: torch.Tensor) -> None:
    """Token-wise parts run in chunks give the whole's output where the shorter matrix
    products round alike ([Note: token chunks]): the CPU's BLAS does at the row counts these
    tests cut. cuBLAS picks other kernels for the tiny models' 16-row products than for their
    48 rows, so on a GPU they are compared up to that rounding; at Wan's real 8,190-row chunks
    the benchmark measured them bit-identical on an H100
    (benchmarks/results/comfyui_dynamic_h100/session17_8blocks_token_chunks.json)."""
    if not torch.cuda.is_available():  # run() hands back CPU tensors on any device
        assert torch.equal(out, expected)
        return
    diff = (out.float() - expected.float()).abs().max().item()
    print(f"chunked against whole on the GPU: max abs diff {diff:.3g}")
    # fp32 tiny models: on an H100 the chunked runs differed by 0 to 1.1e-6
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def assert_untouched(patcher):
    """The loader's model as core made it: no hooks of ours, every weight its own."""
    for module in patcher.model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks
    assert all(t.numel() > 0 for t in patcher.model.parameters())


def lora_like(patcher, keys, seed=0):
    """A clone with 'diff' weight patches on ``keys`` (core applies them like a LoRA)."""
    gen = torch.Generator().manual_seed(seed)
    clone = patcher.clone()
    state = patcher.model.state_dict()
    patches = {
        key: ("diff", (0.05 * torch.randn(state[key].shape, generator=gen),)) for key in keys
    }
    clone.add_patches(patches, 1.0)
    return clone


@pytest.fixture(autouse=True)
def _unload(comfy):
    yield
    # Collect this test's dropped garbage first: core registers a finalizer per loaded model
    # that drops dead entries from current_loaded_models, and one firing inside
    # unload_all_models' loop (a collection there) makes core's free_memory pop past the end
    # of that list. (Our patchers no longer form cycles; the tests' own objects may.)
    gc.collect()
    comfy.model_management.unload_all_models()


@pytest.mark.parametrize("arch", ARCHS)
def test_node_output_equals_core_without_it(comfy, arch):
    patcher, make_inputs = tiny_models.comfy_load_tiny(arch)
    inputs = make_inputs(1)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=3)
    assert swapped is not patcher and swapped.model is not patcher.model  # a private model
    assert swap_of(swapped) is not None
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert torch.equal(run(comfy, swapped, inputs), expected)  # second run: learned order
    # the upstream MODEL keeps working, its options and its model untouched
    assert "wan_blockswap" not in str(patcher.callbacks)
    assert_untouched(patcher)
    assert torch.equal(run(comfy, patcher, inputs), expected)


def test_donor_allocation_widget_stores_where_it_says_or_fails_by_name(comfy):
    """``cpu,*`` (the default) is host memory; a GPU this machine lacks is refused with its
    name and the fix, and the loader's model stays as core made it."""
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(1)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=3, donor_allocation=" CPU , * ")
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert swap_of(swapped).storage is None  # every block in host memory
    comfy.model_management.unload_all_models()
    missing = torch.cuda.device_count() + 1
    with pytest.raises(BlockSwapConfigError, match=f"cuda:{missing} does not exist.*cpu"):
        run(comfy, node(patcher, blocks_to_swap=3, donor_allocation=f"cuda:{missing},*"), inputs)
    assert_untouched(patcher)
    assert torch.equal(run(comfy, patcher, inputs), expected)


def test_core_sees_only_resident_weights_and_counts_the_ring(comfy):
    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    full = patcher.model_size()
    swapped = node(patcher, blocks_to_swap=4)
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    state = _states[swapped.model.diffusion_model]
    resident = sum(p.numel() * p.element_size() for p in swapped.model.parameters())
    resident += sum(b.numel() * b.element_size() for b in swapped.model.buffers())
    assert resident < full
    # saving through core still gets the real weights
    assert comfy.model_management.module_size(swapped.model) == full
    assert swapped.model_size() == resident + state.ring_bytes
    # entries end in (..., module_size, name, module, params) on every core
    names = {entry[-3] for entry in swapped._load_list()}
    assert "diffusion_model.patch_embedding" in names
    assert not any(name.startswith("diffusion_model.blocks.") for name in names)
    comfy.model_management.load_models_gpu([swapped])
    assert swapped.loaded_size() == swapped.model_size()
    block = swapped.model.diffusion_model.blocks[0]
    assert block.self_attn.q.weight.numel() == 0  # still a placeholder after core's load
    assert patcher.model_size() == full and patcher.loaded_size() == 0


@pytest.mark.parametrize("order", ["lora_before_node", "lora_after_node"])
def test_weight_patches_equal_core(comfy, order):
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(2)
    keys = [
        "diffusion_model.blocks.3.self_attn.q.weight",  # swapped
        "diffusion_model.blocks.3.ffn.0.weight",  # swapped
        "diffusion_model.blocks.0.cross_attn.k.weight",  # resident
        "diffusion_model.text_embedding.0.weight",  # resident
    ]
    expected = run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    plain = run(comfy, patcher, inputs)
    assert not torch.equal(plain, expected)
    comfy.model_management.unload_all_models()
    if order == "lora_before_node":
        model = node(lora_like(patcher, keys), blocks_to_swap=2)
    else:
        model = lora_like(node(patcher, blocks_to_swap=2), keys)
    assert torch.equal(run(comfy, model, inputs), expected)
    comfy.model_management.unload_all_models()
    # patches do not leak into the unpatched model
    assert torch.equal(run(comfy, node(patcher, blocks_to_swap=2), inputs), plain)


@pytest.mark.parametrize("order", ["lora_before_node", "lora_after_node"])
def test_transfer_compression_equals_core_with_and_without_patches(comfy, order, monkeypatch):
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap import compressed_transfer

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)
    for widget, value in (("off", False), ("auto", "auto"), ("on", True)):
        assert config(transfer_compression=widget).transfer_compression == value
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", dtype=torch.bfloat16)
    inputs = make_inputs(3)
    keys = ["diffusion_model.blocks.3.self_attn.q.weight", "diffusion_model.blocks.3.ffn.0.weight"]
    plain = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    expected = run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    if order == "lora_before_node":
        model = node(lora_like(patcher, keys), blocks_to_swap=2, transfer_compression="on")
    else:
        model = lora_like(node(patcher, blocks_to_swap=2, transfer_compression="on"), keys)
    swap = _states[model.model.diffusion_model].swap
    assert swap.plan.staging_bytes > 0 and all(u.transfer is not None for u in swap.units)
    assert torch.equal(run(comfy, model, inputs), expected)
    assert torch.equal(run(comfy, model, inputs), expected)
    comfy.model_management.unload_all_models()
    unpatched = node(patcher, blocks_to_swap=2, transfer_compression="on")
    assert torch.equal(run(comfy, unpatched, inputs), plain)
    # core's size accounting: the ring includes the staging buffers
    assert unpatched.model_size() == resident_size(unpatched) + swap.plan.ring_bytes


@pytest.mark.parametrize("compression", ["off", "on"])
@pytest.mark.parametrize("order", ["lora_before_node", "lora_after_node"])
def test_a_budget_below_every_slot_plan_streams_every_layer_and_equals_core(
    comfy, order, compression, monkeypatch
):
    """Core at a zero weight budget keeps no layer resident; below our slot plans the node
    streams every large layer too, the time projection and embeddings included."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap import compressed_transfer, min_vram_budget_gb

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", dtype=torch.bfloat16)
    inputs = make_inputs(5)
    model = patcher.model.diffusion_model
    keys = [
        "diffusion_model.blocks.1.ffn.0.weight",
        "diffusion_model.time_projection.1.weight",
        "diffusion_model.text_embedding.0.weight",
    ]
    plain = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    expected = run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    layer = model.blocks[0].ffn[0].weight
    budget = min_vram_budget_gb(model) + 4 * layer.numel() * layer.element_size() / 2**30
    options = dict(blocks_to_swap=0, vram_budget_gb=budget, transfer_compression=compression)
    if order == "lora_before_node":
        swapped = node(lora_like(patcher, keys), **options)
    else:
        swapped = lora_like(node(patcher, **options), keys)
    swap = _states[swapped.model.diffusion_model].swap
    assert swap.plan.window_bytes and swap.plan.staging_bytes == 0
    assert {"time_projection.1", "text_embedding.0"} <= {u.name for u in swap.units}
    assert any(u.transfer is not None for u in swap.units) == (compression == "on")
    for _ in range(2):
        assert torch.equal(run(comfy, swapped, inputs), expected)
    private = swapped.model.diffusion_model
    assert private.time_projection[1].weight.numel() == 0  # core loaded a placeholder
    assert swapped.model_size() == resident_size(swapped) + swap.plan.ring_bytes
    comfy.model_management.unload_all_models()
    unpatched = node(patcher, **options)
    assert torch.equal(run(comfy, unpatched, inputs), plain)


def resident_size(patcher):
    model = patcher.model
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def test_weight_patches_on_a_vram_budget_plan_equal_core(comfy):
    """A budget plan streams a few layers of every block and keeps the rest resident (inside
    swapped blocks): patches on both kinds of layer still equal core's."""
    from comfyui_wan_blockswap import model_configs
    from comfyui_wan_blockswap.wan_blockswap import SwapConfig, get_block_swap, plan_for
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(3)
    model = patcher.model.diffusion_model
    layout = model_configs.detect(model).layout
    units, sizes = measure_model(model, layout)
    every_layer = plan_for(model, SwapConfig(swap_unit="layer"), layout).gpu_weight_bytes
    budget = (every_layer + sum(b.nbytes for b in sizes.blocks) // 2) / 2**30
    plan = plan_for(model, SwapConfig(vram_budget_gb=budget, swap_unit="layer"), layout)
    kept = set(plan.kept_layers)
    assert kept and len(plan.swapped) == len(sizes.blocks)  # every block streams some layers
    layer_keys = {  # a unit's first weight (a grouped part's unit holds several layers)
        (block, i): f"diffusion_model.{unit.tensors[0].qualname}"
        for block, layers in units["layers"].items()
        for i, unit in enumerate(layers)
    }
    keys = [
        next(key for index, key in layer_keys.items() if index in kept),
        next(key for index, key in layer_keys.items() if index not in kept),
        "diffusion_model.text_embedding.0.weight",
    ]
    expected = run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    swapped = lora_like(node(patcher, blocks_to_swap=0, vram_budget_gb=round(budget, 6)), keys)
    assert get_block_swap(swapped.model.diffusion_model).plan.kept_layers
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()


def test_interrupt_mid_forward_then_unload_and_reuse(comfy):
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(3)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=4, prefetch_blocks=2)
    run(comfy, swapped, inputs)

    def interrupt(module, args):
        raise comfy.model_management.InterruptProcessingException()

    private = swapped.model.diffusion_model
    handle = private.blocks[2].ffn.register_forward_pre_hook(interrupt)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(comfy, swapped, inputs)
    handle.remove()
    swapped.cleanup()  # core calls this in a finally after sampling
    assert all(p.numel() == 0 for p in private.blocks[3].parameters())
    assert_untouched(patcher)
    assert torch.equal(run(comfy, patcher, inputs), expected)
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)


def test_new_settings_reapply_cleanly_and_remove_restores(comfy):
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_vace")
    inputs = make_inputs(4)
    expected = run(comfy, patcher, inputs)
    for blocks in (1, 4, 2):
        swapped = node(patcher, blocks_to_swap=blocks)
        assert torch.equal(run(comfy, swapped, inputs), expected)
        assert torch.equal(run(comfy, patcher, inputs), expected)  # core's own, in between
        assert_untouched(patcher)
    from comfyui_wan_blockswap.callbacks.comfy_adapter import remove_from_model

    remove_from_model(patcher)
    assert swap_of(swapped) is None
    assert all(p.numel() > 0 for p in swapped.model.parameters())
    assert torch.equal(run(comfy, swapped, inputs), expected)


def test_presets_and_budget_widgets(comfy, pack):
    AUTO = pack.nodes.AUTO

    assert config(preset="Wan 2.1/2.2 14B, 12 GB").vram_budget_gb == 7.5
    assert config(vram_budget_gb=3.0).vram_budget_gb == 3.0
    # auto: the options only; the plan is made at the first sampling run
    auto = config(preset=AUTO, transfer_compression="on")
    assert auto.vram_budget_gb is None and auto.transfer_compression is True
    with pytest.raises(ValueError, match="blocks_to_swap must be in 0..4"):
        patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
        node(patcher, blocks_to_swap=9)


def test_pack_registers_with_comfyui_loader(pack):
    """ComfyUI's own custom-node loader imports the pack and finds the node."""
    assert "WanBlockSwapStream" in pack.NODE_CLASS_MAPPINGS
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["WanBlockSwapStream"] == "WAN BlockSwap"
    inputs = pack.NODE_CLASS_MAPPINGS["WanBlockSwapStream"].INPUT_TYPES()
    for group in inputs.values():
        for name, (_, options) in group.items():
            assert options.get("tooltip"), name


def test_headless_server_runs_a_workflow_through_the_http_api(comfy, tmp_path):
    """A real ComfyUI server (CPU) with the pack in custom_nodes/ samples a workflow that uses
    the node, queued through /prompt; benchmarks/comfyui_server_run.py is the same run."""
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path.insert(0, os.path.join(root, "benchmarks"))
    import comfyui_server_run

    result = comfyui_server_run.run(os.environ["COMFYUI_PATH"], str(tmp_path), cpu=True)
    assert result["status"] == "success", result["error"]
    assert result["node_registered"] and result["plan_logged"]
    assert any(name.endswith(".latent") for name in result["outputs"])


@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_lazy_loader_node_equals_core_loader(comfy, pack, tmp_path, weight_dtype):
    import folder_paths
    from safetensors.torch import save_file

    sd = tiny_models.comfy_state_dict_for(
        "wan_t2v", prefix="model.diffusion_model.", dtype=torch.bfloat16
    )
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    save_file(sd, str(folder / "tiny_wan.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    core = comfy.sd.load_diffusion_model(
        str(folder / "tiny_wan.safetensors"),
        model_options={} if weight_dtype == "default" else {"dtype": torch.float8_e4m3fn},
    )
    inputs = tiny_models.comfy_make_inputs(core.model.diffusion_model)(5)
    expected = run(comfy, core, inputs)
    comfy.model_management.unload_all_models()
    loader = pack.nodes.WanBlockSwapModelLoader()
    assert "tiny_wan.safetensors" in loader.INPUT_TYPES()["required"]["unet_name"][0]
    widgets = {**WIDGETS, "blocks_to_swap": 3, "offload_txt_emb": True}
    (model,) = loader.load("tiny_wan.safetensors", weight_dtype, **widgets)
    block = model.model.diffusion_model.blocks[3]
    assert block.self_attn.q.weight.numel() == 0  # swapped: never materialised on the CPU
    assert model.model.diffusion_model.blocks[0].self_attn.q.weight.dtype == (
        core.model.diffusion_model.blocks[0].self_attn.q.weight.dtype
    )
    assert torch.equal(run(comfy, model, inputs), expected)
    assert torch.equal(run(comfy, model, inputs), expected)
    comfy.model_management.unload_all_models()

    # a VRAM budget: every block streams some layers and keeps the others, which the loader
    # puts on the offload device for core to load like any resident weight
    from comfyui_wan_blockswap.wan_blockswap import get_block_swap

    # (a budget between the smallest plan and all: which ones give such a plan depends on the
    # layer units, the FFN being one since token chunks)
    for share in (0.7, 0.8, 0.6, 0.9, 0.5):
        gib = round(share * core.model_size() / 2**30, 6)
        budget = {**WIDGETS, "blocks_to_swap": 0, "vram_budget_gb": gib}
        (model,) = loader.load("tiny_wan.safetensors", weight_dtype, **budget)
        plan = get_block_swap(model.model.diffusion_model).plan
        if plan.kept_layers:
            break
    assert plan.kept_layers and len(plan.swapped) == len(model.model.diffusion_model.blocks)
    assert torch.equal(run(comfy, model, inputs), expected)
    comfy.model_management.unload_all_models()

    # its output into the node: refused by name, before anything changed (a review found it
    # aliasing the loader's placeholders and failing in the forward with a shape error)
    from comfyui_wan_blockswap.callbacks.comfy_private import existing_private
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    swap = get_block_swap(model.model.diffusion_model)
    for options in ({"preset": pack.nodes.AUTO}, {"blocks_to_swap": 1}):
        with pytest.raises(BlockSwapConfigError, match="Model Loader.*Load Diffusion Model"):
            node(model, **options)
    assert existing_private(model.model) is None
    assert get_block_swap(model.model.diffusion_model) is swap
    assert torch.equal(run(comfy, model, inputs), expected)


def test_wan22_two_models_share_slots_and_unload_frees_them(comfy):
    from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes

    high, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", seed=1)
    low, _ = tiny_models.comfy_load_tiny("wan_t2v", seed=2)
    inputs = make_inputs(6)
    expected = {"high": run(comfy, high, inputs), "low": run(comfy, low, inputs)}
    assert not torch.equal(expected["high"], expected["low"])
    comfy.model_management.unload_all_models()
    swapped = {"high": node(high, blocks_to_swap=4), "low": node(low, blocks_to_swap=4)}
    for _ in range(2):  # high noise steps, then low noise steps, twice
        for name in ("high", "low"):
            assert torch.equal(run(comfy, swapped[name], inputs), expected[name])
    assert pooled_bytes() > 0  # one set of slots for both models
    comfy.model_management.unload_all_models()
    assert pooled_bytes() == 0
    assert torch.equal(run(comfy, swapped["low"], inputs), expected["low"])


def test_a_workflow_that_drops_the_model_frees_it(comfy):
    """Switching the workflow to another model drops the old MODEL outputs without telling
    the node: the diffusion model, its host buffers and its slots must all be freed."""
    import weakref

    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.slot_pool import pooled_bytes

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=4)
    run(comfy, swapped, make_inputs(6))
    assert pooled_bytes() > 0
    diffusion_model = weakref.ref(swapped.model.diffusion_model)
    buffers = [weakref.ref(u.host) for u in _states[diffusion_model()].swap.units]
    gc.disable()  # freed by reference counting, as core frees its own patchers
    try:
        del patcher, swapped
        comfy.model_management.unload_all_models()
        assert diffusion_model() is None
        assert all(buffer() is None for buffer in buffers)
        assert not any(model is not None for model in list(_states.keys()))
        assert pooled_bytes() == 0
    finally:
        gc.enable()


def test_wan22_shared_slots_are_counted_once_and_the_count_moves_on_unload(comfy):
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _counted_not_held, _states

    mm = comfy.model_management
    high, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", seed=1)
    low, _ = tiny_models.comfy_load_tiny("wan_t2v", seed=2)
    inputs = make_inputs(6)
    swapped = {"high": node(high, blocks_to_swap=4), "low": node(low, blocks_to_swap=4)}
    ring = _states[swapped["high"].model.diffusion_model].ring_bytes
    assert ring == _states[swapped["low"].model.diffusion_model].ring_bytes > 0
    resident = {name: model.model_size() - ring for name, model in swapped.items()}
    for name in ("high", "low"):
        run(comfy, swapped[name], inputs)
    loaded = [m.model for m in mm.current_loaded_models]
    assert swapped["high"].model in [m.model for m in loaded]
    assert swapped["low"].model in [m.model for m in loaded]
    # both loaded: core's totals hold the slots once, as VRAM does
    total = swapped["high"].loaded_size() + swapped["low"].loaded_size()
    assert total == resident["high"] + resident["low"] + ring
    assert swapped["high"].loaded_size() == resident["high"] + ring  # the first to load
    # the low-noise model holds the pool now, which the high-noise one counts: held, so auto
    # counts none of it as free VRAM too (it once took the whole ring for free beside it)
    high_swap = _states[swapped["high"].model.diffusion_model].swap
    assert high_swap.ring_bytes_held() == 0 and high_swap.ring_bytes_on_device() == ring
    device = swapped["high"].load_device
    assert _counted_not_held(device) == 0
    # core unloads the high-noise model: the low-noise one now counts the slots it still uses
    index = next(
        i for i, m in enumerate(mm.current_loaded_models) if m.model.model is swapped["high"].model
    )
    mm.current_loaded_models.pop(index).model_unload()
    assert swapped["high"].loaded_size() == 0
    assert swapped["low"].loaded_size() == resident["low"] + ring
    assert _counted_not_held(device) == 0
    # loading the high-noise model again does not count the slots a second time
    run(comfy, swapped["high"], inputs)
    assert swapped["high"].loaded_size() == resident["high"]
    assert swapped["low"].loaded_size() == resident["low"] + ring


def scaled_fp8_wan(comfy):
    """A tiny Wan in core's "fp8 scaled" checkpoint format: block Linear weights stored as
    fp8 with a per-layer ``scale_weight`` (core then builds scaled-fp8 ops)."""
    state = tiny_models.comfy_state_dict_for("wan_t2v")
    for key in [k for k in state if k.startswith("blocks.") and k.endswith(".weight")]:
        weight = state[key]
        if weight.ndim != 2:
            continue
        scale = weight.abs().max() / 448
        state[key] = (weight / scale).to(torch.float8_e4m3fn)
        state[key[: -len("weight")] + "scale_weight"] = scale.reshape(())
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    patcher = comfy.sd.load_diffusion_model_state_dict(state)
    layer = patcher.model.diffusion_model.blocks[0].self_attn.q
    # core 0.3: an fp8 weight with a scale beside it; current core: comfy-kitchen's
    # QuantizedTensor, a wrapper of both (the swap stores its fp8 bytes and scale)
    stored = getattr(layer.weight, "_qdata", layer.weight)
    assert stored.dtype == torch.float8_e4m3fn and hasattr(layer, "set_weight")
    return patcher


def int8_wan(comfy):
    """A tiny Wan in current core's INT8 format: block Linear weights stored as int8 with a
    per-layer ``weight_scale`` and a ``comfy_quant`` entry (comfy-kitchen's QuantizedTensor,
    TensorWiseINT8Layout, whose FFN down-projection core runs fused)."""
    state = tiny_models.comfy_state_dict_for("wan_t2v", dtype=torch.bfloat16)
    quant = list(json.dumps({"format": "int8_tensorwise"}).encode())
    for key in [k for k in state if k.startswith("blocks.") and k.endswith(".weight")]:
        weight = state[key].float()
        if weight.ndim != 2:
            continue
        scale = weight.abs().max() / 127
        state[key] = (weight / scale).round().clamp(-127, 127).to(torch.int8)
        prefix = key[: -len("weight")]
        state[prefix + "weight_scale"] = scale.reshape(())
        state[prefix + "comfy_quant"] = torch.tensor(quant, dtype=torch.uint8)
    patcher = comfy.sd.load_diffusion_model_state_dict(state)
    down = patcher.model.diffusion_model.blocks[0].ffn[2].weight
    assert getattr(down, "_layout_cls", None) == "TensorWiseINT8Layout"
    return patcher


@pytest.mark.parametrize("chunk_tokens", [8192, 0])
def test_int8_ffns_that_core_runs_fused_swap_whole_and_equal_core(
    comfy, pack, monkeypatch, chunk_tokens
):
    """Current core runs an INT8 FFN's down-projection in a kernel that reads its weight
    without calling it ([Note: fused parts]). In layer units, with chunks or without, the FFN
    is one unit, fetched when the FFN is called: as units of their own its down-projection
    held a 0-element placeholder there, and the forward failed."""
    import dataclasses
    import functools

    if not hasattr(comfy.ops, "linear_input_act") or not comfy.quant_ops._CK_AVAILABLE:
        pytest.skip("core without INT8 FFNs (or without comfy-kitchen)")
    widgets = pack.nodes.config_from_widgets

    @functools.wraps(widgets)  # the node checks its widgets against this signature
    def layers(**w):
        return dataclasses.replace(widgets(**w), chunk_tokens=chunk_tokens, swap_unit="layer")

    monkeypatch.setattr(pack.nodes, "config_from_widgets", layers)
    # as in a ComfyUI server: nodes and sampling run without autograd
    with torch.inference_mode():
        patcher = int8_wan(comfy)
        inputs = tiny_models.comfy_make_inputs(patcher.model.diffusion_model)(6)
        expected = run(comfy, patcher, inputs)
        comfy.model_management.unload_all_models()
        swapped = node(patcher, blocks_to_swap=3)
        names = [s.unit.name for s in swap_of(swapped).units]
        assert "blocks.0.ffn" in names and not any(".ffn." in n for n in names), names
        assert "blocks.0.self_attn.q" in names  # other layers stay units of their own
        for _ in range(2):
            assert torch.equal(run(comfy, swapped, inputs), expected)
            comfy.model_management.unload_all_models()
        assert_untouched(patcher)
        # scaled fp8 (core calls the layer): the FFN's layers stay units of their own where
        # nothing is chunked, as plain weights' do (smaller units leave more resident)
        fp8 = node(scaled_fp8_wan(comfy), blocks_to_swap=3)
        names = [s.unit.name for s in swap_of(fp8).units]
        assert ("blocks.0.ffn.2" in names) == (chunk_tokens == 0), names


def test_weight_patches_on_scaled_fp8_weights_equal_core(comfy):
    # as in a ComfyUI server: core's scaled-fp8 set_weight only works without autograd
    with torch.inference_mode():
        patcher = scaled_fp8_wan(comfy)
        inputs = tiny_models.comfy_make_inputs(patcher.model.diffusion_model)(6)
        last = len(patcher.model.diffusion_model.blocks) - 1
        keys = [
            f"diffusion_model.blocks.{last}.self_attn.q.weight",  # swapped, scaled fp8
            f"diffusion_model.blocks.{last}.ffn.2.weight",  # swapped, scaled fp8
            "diffusion_model.blocks.0.cross_attn.k.weight",  # resident
        ]
        expected = run(comfy, lora_like(patcher, keys), inputs)
        comfy.model_management.unload_all_models()
        plain = run(comfy, patcher, inputs)
        comfy.model_management.unload_all_models()
        assert not torch.equal(plain, expected)
        swapped = node(lora_like(patcher, keys), blocks_to_swap=3)
        for _ in range(2):
            assert torch.equal(run(comfy, swapped, inputs), expected)
            comfy.model_management.unload_all_models()


def fake_free_vram(comfy, monkeypatch, start: int) -> dict:
    """Core sees ``free["bytes"]`` of free VRAM, and no reserves of its own; auto keeps no
    room up front beside a batch's need (its 128 MiB would dwarf a tiny model's needs)."""
    from comfyui_wan_blockswap.callbacks import comfy_auto

    monkeypatch.setattr(comfy_auto, "BATCH_ROOM_UP_FRONT", 0)
    mm = comfy.model_management
    free = {"bytes": start}

    def get_free_memory(dev=None, torch_free_too=False):
        return (free["bytes"], free["bytes"]) if torch_free_too else free["bytes"]

    monkeypatch.setattr(mm, "get_free_memory", get_free_memory)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: 0)
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: 0)
    return free


def test_auto_refits_the_plan_to_each_latents_memory_estimate(comfy, pack, monkeypatch):
    """'auto' packs nothing when the node runs; before sampling (core's PREPARE_SAMPLING step,
    which knows the latent) it plans for what that latent leaves, as core's loader counts it:
    free VRAM plus loaded models, minus core's estimate for one batch and its reserve."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError, SwapConfig
    from comfyui_wan_blockswap.wan_blockswap.plan import min_streamed_budget, plan_swap

    mm = comfy.model_management
    free = fake_free_vram(comfy, monkeypatch, 100 * 2**30)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(7)
    expected = run(comfy, patcher, inputs)
    mm.unload_all_models()
    swapped = node(patcher, preset=pack.nodes.AUTO)
    private = swapped.model.diffusion_model
    assert swap_of(swapped) is None  # nothing packed before the latent is known
    assert swapped.model_size() == patcher.model_size()

    def prepare(shape):
        options = comfy.model_patcher.create_model_options_clone(swapped.model_options)
        comfy.sampler_helpers.prepare_model_patcher(swapped, {}, options)
        comfy.sampler_helpers.prepare_sampling(swapped, shape, {}, options)

    def estimate(shape):  # core's estimate for one batch of this latent
        return comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1]

    small = tuple(inputs["x"].shape)
    prepare(small)  # 100 GB free: everything resident
    state = _states[private]
    assert state.auto and not state.swap.plan.swapped
    everything_resident = state.swap
    mm.unload_all_models()
    prepare(small)  # everything still fits: nothing to gain, nothing repacked
    assert _states[private].swap is everything_resident
    sizes = state.swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    mm.unload_all_models()

    required = estimate(small)
    # not room for every block: the non-block weights and 3.8 blocks' worth (the slots take
    # 0.8 of a tiny block: its FFN is a third of it, as Wan 14B's)
    free["bytes"] = required + sizes.other_bytes + 3 * block + 4 * block // 5
    prepare(small)
    state = _states[private]
    plan = state.swap.plan
    block_bytes = sum(b.nbytes for b in sizes.blocks)
    assert 0 < plan.swapped_bytes < block_bytes - 3 * block  # part of the model streams
    assert plan.gpu_weight_bytes <= free["bytes"] - required
    assert swapped.model_size() == swapped.size  # core's accounting follows the new plan
    assert torch.equal(run(comfy, swapped, inputs), expected)

    mm.unload_all_models()
    swap_before = state.swap
    prepare(small)  # same latent: the plan still fits, nothing is repacked
    assert _states[private].swap is swap_before
    mm.unload_all_models()
    free["bytes"] += block // 8  # the free VRAM moves a little: no repacking either
    prepare(small)
    assert _states[private].swap is swap_before
    free["bytes"] -= block // 8

    mm.unload_all_models()
    # a longer video: core estimates more activation memory, so more blocks stream
    large = (small[0], small[1], small[2] * 8, *small[3:])
    required_large = estimate(large)
    assert required_large > required
    free["bytes"] = required_large + sizes.other_bytes + 2 * block + block // 2
    prepare(large)
    plan_large = _states[private].swap.plan
    assert plan_large.swapped_bytes > plan.swapped_bytes
    assert plan_large.gpu_weight_bytes <= free["bytes"] - required_large
    assert torch.equal(run(comfy, swapped, inputs), expected)

    mm.unload_all_models()
    # room for the least plan's weights but not for core's estimate beside them: a streamed
    # plan all the same (core's estimates are generous; see the next test)
    least = min_streamed_budget(sizes)
    least_config = SwapConfig(vram_budget_gb=least / 2**30, swap_unit="auto")
    needed = plan_swap(sizes, least_config).gpu_weight_bytes  # the least plan's largest layer too
    free["bytes"] = needed
    prepare(large)
    smallest_swap = _states[private].swap
    smallest = smallest_swap.plan
    assert smallest.swap_unit == "layer" and len(smallest.swapped) == len(sizes.blocks)
    assert smallest.window_bytes  # streamed, one layer at a time
    assert torch.equal(run(comfy, swapped, inputs), expected)

    mm.unload_all_models()
    # a little room beyond what stays resident: that room becomes the window, in place (no
    # repacking), and stays on the next run (its largest layer may sit alone beyond it)
    free["bytes"] = required_large + smallest.resident_bytes + block // 4
    prepare(large)
    streamed = _states[private].swap
    assert streamed is smallest_swap and streamed.plan.window_bytes == block // 4
    assert streamed.scheduler.provider.window_bytes == block // 4
    assert swapped.size == resident_size(swapped) + streamed.plan.ring_bytes
    assert torch.equal(run(comfy, swapped, inputs), expected)
    mm.unload_all_models()
    prepare(large)
    assert _states[private].swap is streamed

    mm.unload_all_models()
    # not even the least plan's weights fit: a clear error with the numbers, nothing changed
    free["bytes"] = least // 2
    with pytest.raises(InsufficientMemoryError, match=r"preset 'auto': .* GiB of VRAM"):
        prepare(large)
    assert _states[private].swap is streamed
    assert_untouched(patcher)


class _FakeMeter:
    """Stands in for torch's CUDA allocation counters on the CPU: each forward "needs"
    ``need`` bytes beside what was allocated before it."""

    def __init__(self, need: int, held: Any = None) -> None:
        self.need = need
        self.held = held  # our GPU bytes now: the peak counts what the forward adds to them
        self.held_at_reset = held() if held is not None else 0
        self.calls: list[str] = []

    def applies(self, device):
        return True

    def allocated(self, device):
        return 10 * 2**30

    def reset_peak(self, device):
        self.calls.append("reset_peak")
        if self.held is not None:
            self.held_at_reset = self.held()

    def release_cached(self, device):
        self.calls.append("release_cached")

    def peaks(self, device):
        from comfyui_wan_blockswap.callbacks.comfy_auto import Peaks

        taken = self.held() - self.held_at_reset if self.held is not None else 0
        peak = 10 * 2**30 + self.need + taken
        return Peaks(peak, peak)

    def describe(self, device, peaks):
        return "fake"

    # a forward's clock ([Note: copies hidden behind compute]): every forward takes forward_ms
    forward_ms = 100.0

    def start_clock(self, device):
        return "started"

    def stop_clock(self, token):
        assert token == "started"
        return "stopped"

    def clock_ms(self, token):
        assert token == "stopped"
        return self.forward_ms


def test_auto_plans_from_the_measured_need_once_a_forward_of_that_shape_ran(
    comfy, pack, monkeypatch
):
    """Core's estimate is about twice what a Wan forward takes, so the first run of a latent
    shape plans from it; every forward records what it really allocated beside the weights,
    and the next run of that shape plans from that (times MEASURED_MARGIN, plus core's
    reserve)."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.callbacks.comfy_auto import MEASURED_MARGIN

    mm = comfy.model_management
    free = fake_free_vram(comfy, monkeypatch, 0)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(7)
    swapped = node(patcher, preset=pack.nodes.AUTO)
    private = swapped.model.diffusion_model
    shape = tuple(inputs["x"].shape)

    def prepare():
        options = comfy.model_patcher.create_model_options_clone(swapped.model_options)
        comfy.sampler_helpers.prepare_model_patcher(swapped, {}, options)
        comfy.sampler_helpers.prepare_sampling(swapped, shape, {}, options)

    free["bytes"] = 10**12
    prepare()  # only to learn the sizes
    sizes = _states[private].swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    mm.unload_all_models()
    # Core's estimate for this tiny latent is below a block on a GPU (its formula there is a
    # quarter of the CPU's), and a re-plan must gain a whole block beyond a block of slack:
    # the estimate is made three blocks here, as for a real latent, on every device
    base = type(patcher.model)
    monkeypatch.setattr(base, "memory_required", lambda self, *a, **k: 3.0 * block)
    required = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1]
    assert required == 3 * block
    free["bytes"] = required + sizes.other_bytes + 3 * block + block // 2
    # core's attention on the CPU splits its work by the free memory: the same figure for all
    expected = run(comfy, patcher, inputs)
    mm.unload_all_models()
    prepare()
    first = _states[private].swap.plan
    assert first.gpu_weight_bytes <= free["bytes"] - required

    need = required // 4
    # torch's counters count the slots this forward takes in its peak (the adapter takes them
    # off again): left out, a small need read as none
    held = _states[private].swap.ring_bytes_on_device
    monkeypatch.setattr(comfy_adapter, "_meter", _FakeMeter(need, held))

    class Executor:  # core's APPLY_MODEL executor: the wrapped call and its BaseModel
        class_obj = swapped.model

        def __call__(self, x):
            return forward(swapped, inputs)

    mm.load_models_gpu([swapped])
    out = comfy_adapter._measure_need(Executor(), torch.zeros(shape))
    assert torch.equal(out, expected)
    swapped.cleanup()
    mm.unload_all_models()
    prepare()
    second = _states[private].swap.plan
    assert second.swapped_bytes < first.swapped_bytes  # more stays on the GPU
    assert second.gpu_weight_bytes <= free["bytes"] - need * MEASURED_MARGIN
    assert torch.equal(run(comfy, swapped, inputs), expected)
    # kept per shape without the batch; slots the forward took are ours, not its need
    ((key, measured),) = comfy_auto._needs[private].items()
    assert key == shape[1:] and 0 < measured.per_sample <= need * MEASURED_MARGIN
    assert not measured.uncond  # no unconditional pass ran


def _measure(comfy, swapped, inputs, need, cond_or_uncond, monkeypatch, sigmas=None):
    """One forward through the node's APPLY_MODEL wrapper, whose meter says it needed
    ``need`` bytes beside the weights; its batch is one sample per conditioning pass, of the
    sampling call whose ``sigmas`` is given (one object for all batches of a call)."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter

    meter = _FakeMeter(need)
    monkeypatch.setattr(comfy_adapter, "_meter", meter)

    class Executor:  # core's APPLY_MODEL executor: the wrapped call and its BaseModel
        class_obj = swapped.model

        def __call__(self, x, *args, **kwargs):
            return forward(swapped, inputs)

    shape = (len(cond_or_uncond), *inputs["x"].shape[1:])
    options = {"cond_or_uncond": list(cond_or_uncond), "sigmas": sigmas}
    comfy.model_management.load_models_gpu([swapped])
    comfy_adapter._measure_need(Executor(), torch.zeros(shape), None, None, None, None, options)
    swapped.cleanup()
    comfy.model_management.unload_all_models()
    return meter


def _prepare(comfy, swapped, shape):
    options = comfy.model_patcher.create_model_options_clone(swapped.model_options)
    comfy.sampler_helpers.prepare_model_patcher(swapped, {}, options)
    comfy.sampler_helpers.prepare_sampling(swapped, shape, {}, options)


def _prepared_auto_node(comfy, pack, monkeypatch):
    """A tiny Wan's loader model, an "auto" node over it prepared for sampling once (with
    VRAM to spare, nothing loaded after), its inputs, and the fake free VRAM."""
    free = fake_free_vram(comfy, monkeypatch, 10**12)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(7)
    swapped = node(patcher, preset=pack.nodes.AUTO)
    shape = tuple(inputs["x"].shape)
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    return free, patcher, inputs, swapped, swapped.model.diffusion_model, shape


def _chunk_at(pack, monkeypatch, chunk_tokens: int) -> None:
    """The node's configs cut token-wise parts at ``chunk_tokens`` (8,192 by default: more
    than a tiny model has)."""
    import dataclasses
    import functools

    widgets = pack.nodes.config_from_widgets

    @functools.wraps(widgets)  # the node checks its widgets against this signature
    def chunked(**w):
        return dataclasses.replace(widgets(**w), chunk_tokens=chunk_tokens)

    monkeypatch.setattr(pack.nodes, "config_from_widgets", chunked)


def _token_wise(swap) -> bool:
    return any(bl.token_wise for bl in swap.layout.block_lists)


def _free_for_weights(comfy, swapped, sizes, shape, blocks: float) -> int:
    """Free VRAM that leaves a latent of ``shape`` ``blocks`` blocks' worth for the swapped
    blocks' weights: below two blocks the tiny Wan's plans put layers in slots, below about
    two thirds of a block they stream every layer."""
    block = max(b.nbytes for b in sizes.blocks)
    estimate = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1]
    return sizes.other_bytes + int(blocks * block) + int(estimate)


def test_auto_plans_a_latent_whose_forward_cut_nothing_with_each_layer_a_unit(
    comfy, pack, monkeypatch, caplog
):
    """A token-wise part is one swap unit so that its layers run once per chunk; a layer slot
    or a streamed window then holds that larger unit. Where a latent's measured forward cut nothing into
    chunks (its tokens fit one chunk: 1 frame of Wan), auto's next plan for it cuts the units
    without token-wise parts, and the same budget keeps more weights resident. A latent not
    measured yet gets the token-wise units (and their chunker) back. See [Note: token
    chunks]."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped
    from comfyui_wan_blockswap.wan_blockswap.plan import plan_swap

    free, patcher, inputs, swapped, private, small = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    unswapped = _unswapped[private]
    full = unswapped.layout
    sizes = unswapped.sizes[full]
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, small, 1)
    _prepare(comfy, swapped, small)
    comfy.model_management.unload_all_models()
    first = _states[private].swap
    assert first.plan.swapped and _token_wise(first)  # not measured yet
    _measure(comfy, swapped, inputs, 2**10, (0,), monkeypatch)
    assert comfy_auto.measured(private, small).chunked is False

    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        _prepare(comfy, swapped, small)
    swap = _states[private].swap
    assert swap is not first and not _token_wise(swap)
    assert "each large layer a unit of its own" in caplog.text
    reduced = full.without_token_wise()
    assert swap.layout == reduced and swap.sizes == unswapped.sizes[reduced]
    # the FFN's two layers are units of their own (and the cross-attention's, which would now
    # be the largest unit: [Note: grouped parts]): the window is smaller, more stays resident
    layers = {len(b.layer_bytes) for b in swap.sizes.blocks}
    assert layers == {len(b.layer_bytes) + 4 for b in sizes.blocks}, layers
    budget = swap.plan.budgeted_bytes
    with_chunk_units = plan_swap(sizes, swap.config)
    assert swap.plan.swapped_bytes < with_chunk_units.swapped_bytes, (swap.plan, budget)
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()
    _prepare(comfy, swapped, small)
    assert _states[private].swap is swap  # the same latent again: the plan stays
    comfy.model_management.unload_all_models()

    # a latent of another shape, not measured: its forward may need the chunks' lower peak
    large = (small[0], small[1], small[2] * 2, *small[3:])
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, large, 1)
    _prepare(comfy, swapped, large)
    again = _states[private].swap
    assert again is not swap and _token_wise(again) and again.layout == full
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_keeps_the_token_wise_units_where_dropping_them_gains_nothing(
    comfy, pack, monkeypatch
):
    """A re-plan repacks the model, so a latent whose forward cut nothing keeps a swap with
    token-wise units where its plan moves no fewer bytes without them (here nothing streams:
    every block fits)."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    first = _states[private].swap
    assert _token_wise(first) and not first.plan.swapped
    calls = first.chunked_calls()
    _measure(comfy, swapped, inputs, 2**20, (0,), monkeypatch)
    assert comfy_auto.measured(private, shape).chunked is False
    assert first.chunked_calls() == calls
    _prepare(comfy, swapped, shape)
    assert _states[private].swap is first
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


class _AllScales:
    """Stands in for the whole-need estimate's token-scaled count (``_TokenScaledBytes``):
    all of a first chunk's transient scales with its tokens."""

    def __init__(self, tokens):
        self.peak = 2**62

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None


def test_auto_runs_a_cut_latents_token_wise_parts_whole_where_that_moves_no_more(
    comfy, pack, monkeypatch, caplog
):
    """Chunks cost time and lower the peak only where a token-wise part's intermediate sets
    it. The metered forward also estimates the need with those parts run whole (from its
    first chunk: [Note: the need without chunks]); where the plan
    that need leaves moves no more bytes, the next plan runs them whole, core is answered
    the whole need, and outputs stay equal. Where it would move more, the chunks stay."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped
    from comfyui_wan_blockswap.callbacks.comfy_auto import COND_BATCH_FACTOR, MEASURED_MARGIN

    _chunk_at(pack, monkeypatch, 20)  # the tiny latent's 48 tokens: three chunks of 16
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    first = _states[private].swap
    assert _token_wise(first) and not first.plan.swapped and first.cuts_token_wise
    unswapped = _unswapped[private]
    sizes = unswapped.sizes[unswapped.layout]
    block = max(b.nbytes for b in sizes.blocks)

    # a part's first chunk takes ``need`` (the fake meter's peak), all of it scaling with the
    # tokens, so whole it takes 3x that
    monkeypatch.setattr(comfy_auto, "_TokenScaledBytes", _AllScales)
    need = block
    calls = first.chunked_calls()
    _measure(comfy, swapped, inputs, need, (0,), monkeypatch)
    measured = comfy_auto.measured(private, shape)
    assert measured.chunked and first.chunked_calls() > calls
    assert measured.per_sample == int(need * MEASURED_MARGIN)
    assert measured.whole_per_sample == int(3 * need * MEASURED_MARGIN)

    # room for every weight beside either need: run whole
    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        _prepare(comfy, swapped, shape)
    whole = _states[private].swap
    assert whole is not first and not _token_wise(whole) and not whole.cuts_token_wise
    assert not whole.plan.swapped
    assert "token-wise parts run whole, which moves no more" in caplog.text
    assert swapped.model.memory_required(shape) == pytest.approx(
        measured.whole_per_sample / COND_BATCH_FACTOR
    )
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()
    _prepare(comfy, swapped, shape)
    assert _states[private].swap is whole  # the same latent again: the plan stays
    comfy.model_management.unload_all_models()

    # room for a block and a half beside the cut need; the whole need leaves none: the chunks
    # come back (and stay: see the next test)
    free["bytes"] = sizes.other_bytes + measured.per_sample + 3 * block // 2
    _prepare(comfy, swapped, shape)
    cut = _states[private].swap
    assert cut is not whole and _token_wise(cut) and cut.cuts_token_wise
    assert cut.plan.swapped
    assert swapped.model.memory_required(shape) == pytest.approx(
        measured.per_sample / COND_BATCH_FACTOR
    )
    comfy.model_management.unload_all_models()
    assert_chunked_equals(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_runs_whole_at_a_streamed_tie_only_through_a_window_that_holds_two_units(
    comfy, pack, monkeypatch
):
    """Every streamed plan moves every layer whatever its window, so a tie there says nothing
    of the window: the whole need's plan wins it only through a window as large as the cut
    plan's, or one that holds its two largest units (a review found tiny windows taken).
    Free VRAM is swept from where only the cut need leaves a window up to where both stream
    comfortably: both outcomes occur, each as the rule says."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _plan_within, _states, _unswapped
    from comfyui_wan_blockswap.wan_blockswap.plan import min_streamed_budget

    monkeypatch.setattr(comfy_auto, "_TokenScaledBytes", _AllScales)
    _chunk_at(pack, monkeypatch, 20)  # three chunks of 16 tokens
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    comfy.model_management.unload_all_models()
    unswapped = _unswapped[private]
    cut_sizes = unswapped.sizes[unswapped.layout]
    whole_sizes = unswapped.sizes[unswapped.layout.without_token_wise()]
    block = max(b.nbytes for b in cut_sizes.blocks)
    largest = max(max(b.layer_bytes) for b in whole_sizes.blocks)
    _measure(comfy, swapped, inputs, block // 16, (0,), monkeypatch)
    need = comfy_auto.measured(private, shape)
    assert need.whole_per_sample > need.per_sample
    options = comfy_adapter._auto_options[private]
    outcomes = set()
    least = min_streamed_budget(whole_sizes)  # every layer streams through the least window
    for steps in range(0, 65):
        free["bytes"] = least + need.whole_per_sample + steps * largest // 8
        cut = _plan_within(cut_sizes, options, free["bytes"] - need.per_sample)
        whole = _plan_within(whole_sizes, options, free["bytes"] - need.whole_per_sample)
        if cut is None or whole is None or cut.kind != "streamed" or whole.kind != "streamed":
            continue
        _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        runs_whole = not _states[private].swap.cuts_token_wise
        # every layer, whatever the window (a grouped cross-attention's unit carries its
        # norms' few bytes too: [Note: grouped parts])
        assert whole.swapped_bytes == pytest.approx(cut.swapped_bytes, rel=1e-2)
        wide = whole.window_bytes >= min(cut.window_bytes, 2 * largest)
        assert runs_whole == wide, (steps, whole.window_bytes, cut.window_bytes, largest)
        outcomes.add(runs_whole)
        if runs_whole:
            break  # the chunks' units come back only for a latent that needs them
    assert outcomes == {False, True}
    assert_untouched(patcher)


def test_auto_runs_whole_where_the_whole_plans_copies_hide_behind_the_timed_compute(
    comfy, pack, monkeypatch, caplog
):
    """Where both plans are fixed slots and the whole need's moves more bytes, the chunks
    stay, unless (with RUN_WHOLE_WHERE_COPIES_HIDE) the forward timed for this latent takes
    at least 1/HIDDEN_SHARE of what the whole plan's copies take at the measured link rate:
    then the FFN runs whole and outputs stay equal. Untimed, a link too slow, or the switch
    off: the chunks stay ([Note: copies hidden behind compute])."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto, copy_headroom
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _plan_within, _states, _unswapped

    monkeypatch.setattr(comfy_auto, "_TokenScaledBytes", _AllScales)
    _chunk_at(pack, monkeypatch, 20)  # three chunks of 16 tokens
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    unswapped = _unswapped[private]
    cut_sizes = unswapped.sizes[unswapped.layout]
    whole_sizes = unswapped.sizes[unswapped.layout.without_token_wise()]
    block = max(b.nbytes for b in cut_sizes.blocks)
    options = comfy_adapter._auto_options[private]

    def no_clock(self, device):
        raise AssertionError("a forward timed with RUN_WHOLE_WHERE_COPIES_HIDE off")

    with monkeypatch.context() as off:  # the switch off: metered, then untimed
        off.setattr(_FakeMeter, "start_clock", no_clock)
        meter = _measure(comfy, swapped, inputs, block // 16, (0,), monkeypatch)
        _measure(comfy, swapped, inputs, block // 16, (0,), monkeypatch)
    need = comfy_auto.measured(private, shape)
    assert need.whole_per_sample > need.per_sample
    assert not copy_headroom.ms_per_sample(private, shape[1:], meter)
    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", True)
    _measure(comfy, swapped, inputs, block // 16, (0,), monkeypatch)
    assert copy_headroom.ms_per_sample(private, shape[1:], meter) == meter.forward_ms
    # free VRAM where both needs leave fixed slots and the whole one swaps more
    for steps in range(0, 129):
        free["bytes"] = cut_sizes.other_bytes + need.whole_per_sample + steps * block // 8
        cut = _plan_within(cut_sizes, options, free["bytes"] - need.per_sample)
        whole = _plan_within(whole_sizes, options, free["bytes"] - need.whole_per_sample)
        if (
            cut is not None
            and whole is not None
            and cut.kind == whole.kind == "slots"
            and whole.swapped_bytes > cut.swapped_bytes
        ):
            break
    else:
        pytest.fail("no free VRAM gives two slot plans where the whole one moves more")

    def runs_whole() -> bool:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="wan_blockswap"):
            _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        return not _states[private].swap.cuts_token_wise

    fast_enough = 2 * whole.swapped_bytes / copy_headroom.HIDDEN_SHARE / meter.forward_ms
    assert not runs_whole()  # no link rate timed (transfer compression never timed one)
    copy_headroom.note_copy_rate(private, fast_enough / 4)  # copies 2x the forward's half
    assert not runs_whole()
    copy_headroom.note_copy_rate(private, fast_enough)  # half of the forward's half
    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", False)
    assert not runs_whole()
    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", True)
    assert runs_whole()
    assert "token-wise parts run whole, whose copies hide behind compute" in caplog.text
    assert _states[private].swap.plan.swapped_bytes > cut.swapped_bytes
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_gives_compressed_layer_slots_a_deeper_look_ahead_with_the_flag_on(
    comfy, pack, monkeypatch
):
    """[Note: look-ahead of compressed layer plans]: with DEEPEN_COMPRESSED_LOOKAHEAD, auto's
    plan of compressed layer units in fixed slots gets more slots (here every extra slot's
    bytes are allowed; as many as fit), each plan within its budget, and outputs still equal
    core's. Switched off, or re-planned in place after transfer compression was dropped
    (the units travel raw and pack), the slots the node asks for."""
    from comfyui_wan_blockswap.callbacks import compressed_lookahead
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped
    from comfyui_wan_blockswap.wan_blockswap import compressed_transfer

    monkeypatch.setattr(compressed_transfer, "CHUNK_ELEMENTS", 1024)
    monkeypatch.setattr(compressed_transfer, "MIN_PACKED_ELEMENTS", 256)
    monkeypatch.setattr(compressed_lookahead, "MORE_BYTES_ALLOWED", 1.0)
    free = fake_free_vram(comfy, monkeypatch, 10**12)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v", dtype=torch.bfloat16)
    inputs = make_inputs(7)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    shape = tuple(inputs["x"].shape)
    plans = {}
    for case, deepen, dropped in (
        ("off", False, False),
        ("on", True, False),
        ("dropped", True, True),
    ):
        monkeypatch.setattr(compressed_lookahead, "DEEPEN_COMPRESSED_LOOKAHEAD", deepen)
        swapped = node(patcher, preset=pack.nodes.AUTO, transfer_compression="on")
        private = swapped.model.diffusion_model
        _prepare(comfy, swapped, shape)  # planned with VRAM to spare: nothing swapped
        comfy.model_management.unload_all_models()
        first = _states[private].swap
        if dropped:
            first.drop_compression()  # as transfer_compression="auto" does
        sizes = _unswapped[private].sizes[_unswapped[private].layout]
        free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 1.5)
        _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        swap = _states[private].swap
        assert swap is first  # re-planned in place
        plans[case] = swap.plan
        assert swap.plan.budgeted_bytes <= swap.config.vram_budget_gb * 2**30
        assert swap.plan.kind == "slots" and swap.plan.swap_unit == "layer"
        assert swap.plan.compressed != dropped
        assert torch.equal(run(comfy, swapped, inputs), expected)
        comfy.model_management.unload_all_models()
        free["bytes"] = 10**12
    assert plans["off"].num_slots == plans["dropped"].num_slots == 2
    assert 2 < plans["on"].num_slots <= compressed_lookahead.MAX_SLOTS
    assert_untouched(patcher)


def test_only_two_fixed_slots_or_more_on_both_sides_count_their_copies_as_hidden(
    comfy, pack, monkeypatch
):
    """[Note: copies hidden behind compute]: a streamed window or a single slot hides a copy
    behind no block's compute, and a forward counts as the latent's batch alone (core may run
    the two conditionings apart whatever was kept for them)."""
    from types import SimpleNamespace

    from comfyui_wan_blockswap.callbacks import comfy_adapter, copy_headroom

    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", True)
    meter = _FakeMeter(0)
    monkeypatch.setattr(comfy_adapter, "_meter", meter)
    model = torch.nn.Linear(1, 1)
    shape = (1, 16, 21, 60, 104)
    copy_headroom.note_forward(model, shape[1:], 2, "stopped")  # 50 ms per sample
    copy_headroom.note_copy_rate(model, 1.0)  # a byte per ms
    slots = SimpleNamespace(kind="slots", num_slots=2, swapped_bytes=25)  # 25 ms of copies
    hide = comfy_adapter._copies_hide
    assert hide(model, shape, slots, slots)
    assert not hide(model, shape, slots, None)  # no cut plan to weigh against
    assert not hide(model, shape, SimpleNamespace(**{**vars(slots), "swapped_bytes": 26}), slots)
    assert hide(
        model, (2, *shape[1:]), SimpleNamespace(**{**vars(slots), "swapped_bytes": 50}), slots
    )
    for other in ({"kind": "streamed"}, {"num_slots": 1}):
        changed = SimpleNamespace(**{**vars(slots), **other})
        assert not hide(model, shape, changed, slots) and not hide(model, shape, slots, changed)


def test_auto_offers_no_whole_plan_once_the_token_wise_units_came_back(
    comfy, pack, monkeypatch, caplog
):
    """Once the chunk units came back after a whole plan (another latent, not measured yet),
    they stay; a whole plan is then not weighed at all: weighed, it would have planned the
    chunk units with the larger whole reserve (a review found 1.87x the bytes moved)."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _plan_within, _states, _unswapped

    _chunk_at(pack, monkeypatch, 20)
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    unswapped = _unswapped[private]
    sizes = unswapped.sizes[unswapped.layout]
    block = max(b.nbytes for b in sizes.blocks)
    _measure(comfy, swapped, inputs, block, (0,), monkeypatch)
    need = comfy_auto.measured(private, shape)
    need.whole_per_sample = int(need.per_sample * 1.05)  # the Python rope's case
    _prepare(comfy, swapped, shape)  # room to spare: whole
    assert not _states[private].swap.cuts_token_wise
    comfy.model_management.unload_all_models()
    large = (shape[0], shape[1], shape[2] * 2, *shape[3:])
    _prepare(comfy, swapped, large)  # not measured: the chunk units come back, and stay
    comfy.model_management.unload_all_models()
    assert unswapped.keeps_token_wise
    free["bytes"] = sizes.other_bytes + need.per_sample + 3 * block // 4
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    swap = _states[private].swap
    options = comfy_adapter._auto_options[private]
    cut = _plan_within(sizes, options, free["bytes"] - need.per_sample)
    assert swap.cuts_token_wise and swap.plan.swapped_bytes <= cut.swapped_bytes
    assert "run whole" not in caplog.text
    assert_chunked_equals(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_a_metered_forward_stopped_in_a_first_chunk_leaves_no_dispatch_mode_or_observer(
    comfy, pack, monkeypatch
):
    """An interrupt inside the metered forward's first chunk (where the whole-need estimate
    has a dispatch mode entered) leaves torch's mode stack and the chunkers as they were."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.token_chunks import TokenChunkedForward

    _chunk_at(pack, monkeypatch, 20)
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    starts = comfy_auto.WholePartEstimate.first_chunk_starts

    def interrupted(self, tokens):
        starts(self, tokens)
        raise KeyboardInterrupt

    monkeypatch.setattr(comfy_auto.WholePartEstimate, "first_chunk_starts", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _measure(comfy, swapped, inputs, 2**20, (0,), monkeypatch)
    assert _get_current_dispatch_mode_stack() == []
    chunkers = [h for h in _states[private].swap._hooks if isinstance(h, TokenChunkedForward)]
    assert chunkers and all(h.observer is None for h in chunkers)
    assert comfy_auto.measured(private, shape) is None  # nothing recorded from it
    comfy.model_management.unload_all_models()
    monkeypatch.undo()
    assert_chunked_equals(run(comfy, swapped, inputs), expected)


def test_auto_keeps_the_token_wise_units_once_they_came_back(comfy, pack, monkeypatch):
    """Where latents cut into chunks and latents that are not take turns, every turn would
    repack the model; once the token-wise units came back after auto dropped them, they stay
    (a review counted 6 repacks in 6 prompts without this)."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped

    free, patcher, inputs, swapped, private, small = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    sizes = _unswapped[private].sizes[_unswapped[private].layout]
    large = (small[0], small[1], small[2] * 2, *small[3:])
    # the large latent's forward was cut into chunks (the tiny model's never is at 8,192)
    comfy_auto.record(private, large, 2**10, uncond=False, chunked=True)
    swaps = [_states[private].swap]  # planned before any forward: token-wise units
    _measure(comfy, swapped, inputs, 2**10, (0,), monkeypatch)  # the small one's was not cut
    for shape in [small, small, large, small, large, small]:
        free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 1)
        _prepare(comfy, swapped, shape)
        swap = _states[private].swap
        if swaps[-1] is not swap:
            swaps.append(swap)
        comfy.model_management.unload_all_models()
    # each layer a unit for the small latent, the token-wise units back for the large one,
    # and kept from then on
    assert [_token_wise(swap) for swap in swaps] == [True, False, True], swaps
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def _streaming_auto_node(comfy, pack, monkeypatch):
    """``_prepared_auto_node``, then planned for a quarter of a block's worth of weights (a
    plan that streams every layer), unloaded; with core's output for its inputs and the
    sizes of its architecture's layout."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _unswapped

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    sizes = _unswapped[private].sizes[_unswapped[private].layout]
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 0.25)
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    return free, patcher, inputs, swapped, private, shape, expected, sizes


def _held(patcher, swap) -> int:
    """What a GPU holds of ``patcher``'s loaded model between forwards: the weights core
    counts as loaded less the streamed window, whose layers come and go inside a forward."""
    return patcher.loaded_size() - (swap.plan.ring_bytes - swap.ring_bytes_held())


def test_auto_widens_a_streamed_window_within_the_slack_without_repacking(comfy, pack, monkeypatch):
    """A first plan from core's estimate may stream every layer through a small window; when
    the measured need leaves a budget whose own plan (layer slots) the block of slack keeps
    out, the plan within the slack streams the same layers through a wider window: auto
    widens the window of the swap it has (no repack), so copies run further ahead."""
    import dataclasses

    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.plan import plan_swap

    free, patcher, inputs, swapped, private, shape, expected, sizes = _streaming_auto_node(
        comfy, pack, monkeypatch
    )
    swap = _states[private].swap
    first = swap.plan
    assert first.kind == "streamed" and first.window_bytes
    block = max(b.nbytes for b in sizes.blocks)
    budget = sizes.other_bytes + 3 * block // 2
    whole = plan_swap(sizes, dataclasses.replace(swap.config, vram_budget_gb=budget / 2**30))
    assert whole.kind == "slots"  # the budget's own plan: a repack, which the slack keeps out
    comfy.model_management.load_models_gpu([swapped])  # loaded: core's count must follow
    # auto counts what loaded models hold as VRAM it can have (core unloads them for it);
    # core's count has the window, which between forwards the GPU does not hold
    loaded = swapped.loaded_size()
    assert loaded > first.ring_bytes and swap.ring_bytes_held() == 0
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 1.5) - _held(swapped, swap)
    _prepare(comfy, swapped, shape)
    assert _states[private].swap is swap  # not repacked
    widened = swap.plan
    assert widened.kind == "streamed" and widened.swapped == first.swapped
    assert first.window_bytes < widened.window_bytes
    assert widened.budgeted_bytes <= budget - block + 1  # within the slack
    assert swap.scheduler.provider.window_bytes == widened.window_bytes
    assert swapped.size == resident_size(swapped) + widened.ring_bytes
    # core unloaded the model for the new window and loaded it again as it is now
    assert swapped.model.model_loaded_weight_memory == swapped.size
    # the next prompt, loaded, with the same VRAM: the wider window is counted once, as
    # loaded (auto once counted it as free too, and re-planned at every prompt)
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 1.5) - _held(swapped, swap)
    _prepare(comfy, swapped, shape)
    assert _states[private].swap is swap and swap.plan == widened
    comfy.model_management.unload_all_models()
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 1.5)  # nothing loaded now
    _prepare(comfy, swapped, shape)  # the same budget again: nothing changes
    assert _states[private].swap is swap and swap.plan == widened
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_keeps_every_weight_resident_once_they_fit_within_the_block_of_slack(
    comfy, pack, monkeypatch
):
    """Growing keeps a block of slack, but a budget that holds every weight (with
    ALL_RESIDENT_SLACK to spare) re-plans at once: nothing is copied any more, and the plan
    has nothing left to grow into. Just short of that spare, the swap stays; the next prompt
    with the same VRAM keeps the all-resident plan. Once such a plan had to shrink, growing
    keeps the block of slack there too."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    sizes = _states[private].swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    everything = sizes.other_bytes + sum(b.nbytes for b in sizes.blocks)
    spare = block // 4
    monkeypatch.setattr(comfy_adapter, "ALL_RESIDENT_SLACK", spare)  # a tiny model's blocks
    blocks = len(sizes.blocks)
    # the slots take 0.8 of a tiny block (its FFN is a third of it, as Wan 14B's)
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, blocks - 0.2)
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    state = _states[private]  # a new one at every re-plan
    swap = state.swap
    first = swap.plan
    assert 0 < first.swapped_bytes < block  # less than a block to gain
    # the set-up's first plan kept every weight because VRAM was to spare: this shrinking does
    # not hold the next growth to the block of slack
    assert not _unswapped[private].left_all_resident
    estimate = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1]
    free["bytes"] = everything + estimate + spare - 1  # every weight fits, the spare does not
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    assert _states[private] is state and swap.plan == first  # kept: within the slack
    free["bytes"] = everything + estimate + spare
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    whole = _states[private]
    assert whole is not state and whole.swap.plan.swapped_bytes == 0
    _prepare(comfy, swapped, shape)  # the same VRAM at the next prompt: nothing changes
    comfy.model_management.unload_all_models()
    assert _states[private] is whole
    # a budget just short of every weight (a latent that needs a little more, say) shrinks
    # the plan; back at the first budget, growing keeps the block of slack again: latents
    # either side of "everything fits" taking turns would repack the model at every turn
    free["bytes"] = everything + estimate - block // 5
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    shrunk = _states[private]
    assert shrunk is not whole and 0 < shrunk.swap.plan.swapped_bytes < block
    assert _unswapped[private].left_all_resident
    for _ in range(2):
        free["bytes"] = everything + estimate + spare
        _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        assert _states[private] is shrunk
        free["bytes"] = everything + estimate - block // 5
        _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        assert _states[private] is shrunk
    free["bytes"] = everything + estimate + block + spare  # a block of slack: it grows
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    assert _states[private].swap.plan.swapped_bytes == 0
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_re_plans_in_place_keeping_what_both_plans_swap_packed(
    comfy, pack, monkeypatch, caplog
):
    """A new budget for the same units re-plans the swap in place ([Note: re-planning in
    place] in the engine): units swapped under both plans keep their host storage, units the
    new plan keeps on the GPU share the loader's weights again, outputs equal core's."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    sizes = _states[private].swap.sizes
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, len(sizes.blocks) - 2)
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    state = _states[private]
    swap = state.swap
    before = {s.name: (s, [v.data_ptr() for v in s.host_views]) for s in swap.units}
    assert before and swap.plan.kind == "slots"  # layers of its 4 blocks in slots
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()

    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, len(sizes.blocks) - 3.5)
    with caplog.at_level(logging.INFO, logger="wan_blockswap"):
        _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()
    assert _states[private] is not state and _states[private].swap is swap
    assert swap.plan.kind == "streamed"  # every layer, outside the blocks too
    assert re.search(
        r"re-planned in place in [\d.]+ s: %d units stayed packed" % len(before), caplog.text
    )
    now = {s.name: s for s in swap.units}
    assert before.keys() < now.keys()
    for name, (stored, pointers) in before.items():  # nothing packed again
        assert now[name] is stored and [v.data_ptr() for v in stored.host_views] == pointers
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()

    # back where it started (a block of slack beyond): the units the plan keeps on the GPU
    # share the loader's memory again, as after remove()
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, len(sizes.blocks) - 0.2)
    from comfyui_wan_blockswap.wan_blockswap import stored_unit

    copied = []  # no unit is copied out of host memory to be rebound right after
    copy_with_strides = stored_unit.copy_with_strides
    monkeypatch.setattr(
        stored_unit, "copy_with_strides", lambda v, *a: copied.append(v) or copy_with_strides(v, *a)
    )
    _prepare(comfy, swapped, shape)  # loaded after: on the CPU core moves nothing
    monkeypatch.setattr(stored_unit, "copy_with_strides", copy_with_strides)
    assert _states[private].swap is swap and len(swap.units) < len(before)
    assert not copied
    swapped_names = {ref.qualname for s in swap.units for ref in s.unit.tensors}
    loader = dict(patcher.model.diffusion_model.named_parameters())
    shared = [
        name
        for name, tensor in private.named_parameters()
        if name not in swapped_names and tensor.data_ptr() == loader[name].data_ptr()
    ]
    assert len(shared) == len(loader) - len(swapped_names)
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)
    comfy.model_management.unload_all_models()

    # stopped after the engine re-planned (here in rebinding): the swap is removed, not left
    # under records of the old plan; the next run applies the plan again
    from comfyui_wan_blockswap.callbacks import comfy_adapter

    rebind = comfy_adapter.rebind_unloaded

    def failing(*args):
        monkeypatch.setattr(comfy_adapter, "rebind_unloaded", rebind)
        raise KeyboardInterrupt

    monkeypatch.setattr(comfy_adapter, "rebind_unloaded", failing)
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, len(sizes.blocks) - 3.5)
    with pytest.raises(KeyboardInterrupt):
        _prepare(comfy, swapped, shape)
    assert private not in _states and comfy_adapter._auto_options.get(private) is not None
    assert comfy_adapter.get_block_swap(private) is None
    _prepare(comfy, swapped, shape)
    assert _states[private].swap.plan.kind == "streamed"
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_without_chunks_plans_each_large_layer_a_unit_from_the_start(comfy, pack, monkeypatch):
    """``chunk_tokens=0``: nothing runs in chunks, so auto never makes token-wise units (the
    engine's own sizes, measured with the config's chunk_tokens, agree with the plan's)."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    _chunk_at(pack, monkeypatch, 0)
    _, patcher, inputs, swapped, private, _, expected, _ = _streaming_auto_node(
        comfy, pack, monkeypatch
    )
    swap = _states[private].swap
    assert swap.plan.kind == "streamed" and not _token_wise(swap)
    assert swap.config.chunk_tokens == 0 and swap.chunked_calls() == 0
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_auto_detects_an_unrecorded_architecture_before_it_swaps_anything(comfy, pack, monkeypatch):
    """A model without a record is found by the generic rule, which weighs each module list
    by its bytes; swapped blocks are placeholders, so auto detects the layout once, while no
    swap is applied, and plans every later latent from it (a review found the next prompt
    failing with "found no block list" once every block streamed)."""
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states, _unswapped
    from comfyui_wan_blockswap.model_configs import registry

    monkeypatch.setattr(registry, "match", lambda model: None)  # as if no record matched
    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    layout = _unswapped[private].layout
    assert layout.name == "generic"
    sizes = _unswapped[private].sizes[layout]
    free["bytes"] = _free_for_weights(comfy, swapped, sizes, shape, 0.25)
    _prepare(comfy, swapped, shape)
    swap = _states[private].swap
    assert swap.plan.kind == "streamed" and swap.plan.swapped
    comfy.model_management.unload_all_models()
    _prepare(comfy, swapped, shape)  # the same latent again, every block a placeholder
    assert _states[private].swap is swap and _unswapped[private].layout == layout
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)
    assert_untouched(patcher)


def test_core_estimates_the_private_model_from_what_its_forwards_took(comfy, pack, monkeypatch):
    """Once a forward of a latent shape ran, core's estimate for the private model (its
    loader's free-up, its shrink rule and its cond batching all ask ``memory_required``) is
    what that forward took per sample, times the batch asked about, over core's batching
    factor (the need has its margin already); the loader's model keeps core's own estimate,
    and so does an unmeasured shape."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_auto import COND_BATCH_FACTOR, MEASURED_MARGIN

    fake_free_vram(comfy, monkeypatch, 10**12)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(7)
    swapped = node(patcher, preset=pack.nodes.AUTO)
    shape = tuple(inputs["x"].shape)
    core_both, core_one = comfy.sampler_helpers.estimate_memory(patcher, shape, {})
    assert comfy.sampler_helpers.estimate_memory(swapped, shape, {}) == (core_both, core_one)
    _prepare(comfy, swapped, shape)
    comfy.model_management.unload_all_models()

    need = 3 * 2**20  # for the batch of two: cond and uncond
    _measure(comfy, swapped, inputs, need, (1, 0), monkeypatch)
    per_sample = -(-int(need * MEASURED_MARGIN) // 2)
    measured = comfy_auto.measured(swapped.model.diffusion_model, shape)
    assert measured.per_sample == per_sample and measured.uncond
    both, one = comfy.sampler_helpers.estimate_memory(swapped, shape, {})
    assert (both, one) == (2 * per_sample / COND_BATCH_FACTOR, per_sample / COND_BATCH_FACTOR)
    assert comfy.sampler_helpers.estimate_memory(patcher, shape, {}) == (core_both, core_one)
    other = (shape[0], shape[1], shape[2] + 1, *shape[3:])
    assert swapped.model.memory_required(other) == patcher.model.memory_required(other)
    assert "memory_required" not in vars(patcher.model)  # core's model as core made it
    assert_untouched(patcher)


def test_auto_measures_each_shape_and_batch_once_over_an_emptied_cache(comfy, pack, monkeypatch):
    """Cached blocks that earlier work left in the allocator's pool are no need of the
    forward, so the cache is released before the one metered forward of each latent shape and
    batch size; later forwards of it run unmetered (a reading over a warm pool cannot raise
    the reserve), while an unconditional pass among them is still noted."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_auto import MEASURED_MARGIN

    _, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)

    need = 2**20
    meter = _measure(comfy, swapped, inputs, need, (0,), monkeypatch)
    assert meter.calls == ["release_cached", "reset_peak"]  # emptied, then metered
    first = comfy_auto.measured(private, shape)
    assert first.per_sample == int(need * MEASURED_MARGIN) and not first.uncond

    again = _measure(comfy, swapped, inputs, 8 * need, (1,), monkeypatch)
    assert again.calls == []  # same shape, same batch: not metered
    assert first.per_sample == int(need * MEASURED_MARGIN) and first.uncond

    both = _measure(comfy, swapped, inputs, 8 * need, (1, 0), monkeypatch)
    assert both.calls == ["release_cached", "reset_peak"]  # a batch of two: metered once
    assert first.per_sample == -(-int(8 * need * MEASURED_MARGIN) // 2)
    assert first.batches == {1, 2}
    assert_untouched(patcher)


def _vram_oom() -> BaseException:
    return torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 864 MiB")


def _engine_oom() -> BaseException:
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError

    try:  # raised from torch's error, as a streamed layer's buffer raises it
        raise _vram_oom()
    except torch.cuda.OutOfMemoryError as cause:
        error = InsufficientMemoryError("no VRAM for a streamed layer's buffer")
        error.__cause__ = cause
        return error


@pytest.mark.parametrize(
    "failures, retried",
    [
        ((_vram_oom,), True),
        ((_engine_oom,), True),
        ((_vram_oom, _vram_oom), False),  # a second failure goes to core
        ((lambda: RuntimeError("not memory"),), False),
    ],
    ids=["oom", "engine_oom", "oom_twice", "other_error"],
)
def test_auto_runs_a_forward_out_of_memory_again_over_an_emptied_cache_and_plans_more_for_it(
    comfy, pack, monkeypatch, caplog, failures, retried
):
    """A forward of a measured shape that runs out of VRAM inside a swapped block (the
    allocator's cached segments cut up by earlier ones) runs once more over an emptied cache,
    with core's output; the shape's need grows by OOM_GROWTH, once per plan. A second
    failure, and any other error, go to core. See [Note: a forward out of memory]."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.callbacks.comfy_auto import MEASURED_MARGIN, OOM_GROWTH

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    expected = run(comfy, patcher, inputs)
    need = 2**20
    _measure(comfy, swapped, inputs, need, (0,), monkeypatch)
    first = int(need * MEASURED_MARGIN)
    assert comfy_auto.measured(private, shape).per_sample == first
    sizes = _states[private].swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    free["bytes"] = first + sizes.other_bytes + 2 * block + block // 2
    _prepare(comfy, swapped, shape)  # a plan that swaps blocks, from the measured need
    plan = _states[private].swap.plan
    assert plan.swapped, plan

    left = list(failures)

    def fail_in_a_swapped_block(module, args):
        if left:
            raise left.pop(0)()

    layer = private.get_submodule(plan.swapped[0]).ffn[0]  # a swapped block's first FFN layer
    handle = layer.register_forward_pre_hook(fail_in_a_swapped_block)
    meter = _FakeMeter(need)
    monkeypatch.setattr(comfy_adapter, "_meter", meter)

    class Executor:  # core's APPLY_MODEL executor
        class_obj = swapped.model

        def __call__(self, x, *args, **kwargs):
            return forward(swapped, inputs)

    comfy.model_management.load_models_gpu([swapped])
    try:
        with caplog.at_level(logging.WARNING, logger="wan_blockswap"):
            if retried:
                out = comfy_adapter._measure_need(Executor(), torch.zeros(shape))
                assert torch.equal(out, expected)
            else:
                with pytest.raises(type(failures[-1]())):
                    comfy_adapter._measure_need(Executor(), torch.zeros(shape))
        if failures[0] in (_vram_oom, _engine_oom):
            assert comfy_auto.measured(private, shape).per_sample == int(first * OOM_GROWTH)
            assert "ran out of VRAM" in caplog.text and meter.calls == ["release_cached"]
        else:
            assert comfy_auto.measured(private, shape).per_sample == first
            assert "ran out of VRAM" not in caplog.text and meter.calls == []
        assert comfy_auto.is_measured(private, shape)  # later forwards run unmetered
        if retried:  # another failure on the same plan: retried, but no more growth
            left.append(_vram_oom)
            assert torch.equal(
                comfy_adapter._measure_need(Executor(), torch.zeros(shape)), expected
            )
            assert comfy_auto.measured(private, shape).per_sample == int(first * OOM_GROWTH)
            comfy_auto.new_plan(private)  # a new plan may grow it again
            left.append(_vram_oom)
            comfy_adapter._measure_need(Executor(), torch.zeros(shape))
            assert comfy_auto.measured(private, shape).per_sample == int(
                int(first * OOM_GROWTH) * OOM_GROWTH
            )
    finally:
        handle.remove()
        swapped.cleanup()
        comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, swapped, inputs), expected)  # the swap still works
    assert_untouched(patcher)


def test_auto_reserves_for_the_cond_batch_only_where_it_moves_fewer_bytes_per_step(
    comfy, pack, monkeypatch, caplog
):
    """With cfg > 1 core runs both conditionings as one batch only when 1.5x its estimate for
    that batch is free, else two forwards a step, each moving the swapped weights. Auto keeps
    room for the batch where that moves fewer bytes per step, else plans for one
    conditioning per forward and more resident weights."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.callbacks.comfy_auto import COND_BATCH_FACTOR

    free = fake_free_vram(comfy, monkeypatch, 10**12)
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(7)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, preset=pack.nodes.AUTO)
    private = swapped.model.diffusion_model
    shape = tuple(inputs["x"].shape)
    _prepare(comfy, swapped, shape)
    sizes = _states[private].swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    everything = sizes.other_bytes + sum(b.nbytes for b in sizes.blocks)
    comfy.model_management.unload_all_models()

    def plan_for(per_sample):
        comfy_auto._needs.pop(private, None)
        _measure(comfy, swapped, inputs, per_sample * 2, (1, 0), monkeypatch)
        caplog.clear()
        with caplog.at_level("INFO", logger="wan_blockswap"):
            _prepare(comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        return _states[private].swap.plan, caplog.text

    # a small need: room for the batch costs nothing, everything stays resident
    free["bytes"] = everything + 4 * block
    plan, log = plan_for(block // 8)
    assert not plan.swapped and "both conditionings in one batch" in log
    # the batch's need fits beside every weight, 1.5x of it would not: core is told the need
    # over its batching factor, so it batches where the need (margin and all) is free, and
    # nothing streams
    plan, log = plan_for(block)
    per_sample = comfy_auto.measured(private, shape).per_sample
    assert 2 * per_sample <= 4 * block < COND_BATCH_FACTOR * 2 * per_sample
    assert not plan.swapped and "both conditionings in one batch" in log
    both = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[0]
    assert COND_BATCH_FACTOR * both == pytest.approx(2 * per_sample)
    # a large one: keeping the batch's need free would stream blocks that fit beside one
    # conditioning's need, and two forwards of nothing streamed move less
    plan, log = plan_for(2 * block)
    per_sample = comfy_auto.measured(private, shape).per_sample
    assert 2 * per_sample > 4 * block >= per_sample
    assert "one conditioning per forward" in log
    assert plan.gpu_weight_bytes <= free["bytes"] - per_sample
    assert torch.equal(run(comfy, swapped, inputs), expected)


def _split_batch_rig(comfy, pack, monkeypatch, caplog):
    """An "auto" node over a tiny Wan whose plan streams about half its blocks, with a batch
    of both conditionings measured; ``step`` runs forwards (each with its passes) with
    ``free_at_step`` read free (an iterator: one reading per forward), in the sampling call
    ``call``, and ``prepared`` plans for sampling and says what it logged."""
    import types

    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    free, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    sizes = _states[private].swap.sizes
    block = max(b.nbytes for b in sizes.blocks)
    monkeypatch.setattr(comfy_adapter, "ALL_RESIDENT_SLACK", 0)  # a tiny model's blocks
    monkeypatch.setattr(comfy_auto, "BATCH_SHORTFALL_SLACK", block // 32)
    free["bytes"] = sizes.other_bytes + 2 * block  # about half the blocks swap
    _measure(comfy, swapped, inputs, block // 16, (0,), monkeypatch)  # batch 1, then 2
    _measure(comfy, swapped, inputs, block // 8, (1, 0), monkeypatch)
    rig = types.SimpleNamespace(free=free, patcher=patcher, swapped=swapped, private=private)
    rig.inputs = inputs
    rig.shape, rig.sizes, rig.block, rig.free_at_step = shape, sizes, block, None
    rig.call = object()

    def step(*passes_each):
        for passes in passes_each:
            kept = free["bytes"]
            at = rig.free_at_step  # what core's rule reads while sampling: one or per forward
            if at is not None:
                free["bytes"] = next(at) if isinstance(at, Iterator) else at
            try:
                _measure(comfy, swapped, inputs, block, passes, monkeypatch, rig.call)
            finally:
                free["bytes"] = kept

    def prepared():
        text = _logged(caplog, _prepare, comfy, swapped, shape)
        comfy.model_management.unload_all_models()
        return text

    both = (2 * shape[0], *shape[1:])
    rig.step, rig.prepared = step, prepared
    # what core's batching rule asks to be free for both conditionings in one batch
    rig.need = comfy_auto.COND_BATCH_FACTOR * swapped.model.memory_required(both)
    assert rig.need == 2 * comfy_auto.measured(private, shape).per_sample
    return rig


def test_auto_says_once_per_plan_when_core_ran_the_passes_of_a_batch_it_kept_room_for_apart(
    comfy, pack, monkeypatch, caplog
):
    """Core's batching rule reads the free VRAM at every step: where a plan that streams kept
    room for both conditionings in one batch and core still ran them as two forwards, each
    step moves the swapped weights twice, and the node says so once per plan, with the
    numbers, and whether that VRAM was free (then core could not join the two). A cfg-1 run
    (the conditional pass alone) is no such case; nor is a plan that kept room for one."""
    from comfyui_wan_blockswap.callbacks import comfy_adapter, comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states

    rig = _split_batch_rig(comfy, pack, monkeypatch, caplog)
    free, swapped, private, shape = rig.free, rig.swapped, rig.private, rig.shape
    step, prepared, need, block, sizes = rig.step, rig.prepared, rig.need, rig.block, rig.sizes
    split = "passes one at a time"
    assert "both conditionings in one batch" in prepared()
    assert _states[private].swap.plan.swapped_bytes > 0
    kept = comfy_auto.reserves(swapped, shape, {})[0]
    assert kept.cond_batch
    # batched, then a cfg-1 run's steps
    assert split not in _logged(caplog, step, (1, 0), (0,), (0,))
    # core split the batch at two steps, with less than the batch's need free then (its rule
    # runs the unconditional pass first; each step has its own sigmas)
    rig.call, rig.free_at_step = object(), int(need) - 1
    text = _logged(caplog, step, (1,), (0,), (1,), (0,))
    assert text.count(split) == 1
    (said,) = [r.args for r in caplog.records if split in r.getMessage()]
    gib = comfy_adapter.GIB
    assert [round(figure * gib) for figure in said[:3]] == [kept.bytes, need, need - 1]
    assert "could not join" not in said[3]  # no other cause named: the need was not free
    # core reads the free VRAM before each batch it runs: the reading that split a step is the
    # one before its first lone pass, not the second's (the first's activations freed by then)
    beside = comfy_auto.measured(private, shape).batch_shortfall
    assert "both conditionings in one batch" in prepared()
    rig.free_at_step = iter([int(need) - 1, int(need) + block])
    text = _logged(caplog, step, (1,), (0,))
    assert split in text and "could not join" not in text and "later plans" in text
    (said,) = [r.args for r in caplog.records if split in r.getMessage()]
    assert round(said[2] * gib) == need - 1
    comfy_auto.measured(private, shape).batch_shortfall = beside
    # the conditional pass first is not core's rule at work, whatever is free: conditionings
    # it cannot join, or a guidance node that runs them apart; later plans keep no more
    assert "both conditionings in one batch" in prepared()
    rig.call, rig.free_at_step = object(), int(need) - 1
    text = _logged(caplog, step, (0,), (1,))
    assert split in text and "could not join" in text and "later plans" not in text
    assert comfy_auto.measured(private, shape).batch_shortfall == beside
    # the next plan: again once, where core splits after a first forward of each pass; with
    # the need free, the cause was not memory, and later plans keep no more for it
    # (the first forward of one pass alone is the one that measures that batch size)
    beside = comfy_auto.measured(private, shape).batch_shortfall
    rig.free_at_step = None
    prepared()
    comfy_auto.measured(private, shape).batches.discard(1)
    assert split not in _logged(caplog, step, (0,))
    assert 1 in comfy_auto.measured(private, shape).batches
    text = _logged(caplog, step, (1,))
    assert split in text and "could not join" in text and "later plans" not in text
    assert comfy_auto.measured(private, shape).batch_shortfall == beside
    # a plan that swaps nothing moves nothing twice
    free["bytes"] = sizes.other_bytes + sum(b.nbytes for b in sizes.blocks) + 4 * block
    assert "both conditionings in one batch" in prepared()
    assert _states[private].swap.plan.swapped_bytes == 0
    assert split not in _logged(caplog, step, (0,), (1,))
    free["bytes"] = sizes.other_bytes + 2 * block
    # a plan that kept room for one conditioning per forward expects two forwards a step
    comfy_auto._needs.pop(private)
    _measure(comfy, swapped, rig.inputs, 2 * block, (0,), monkeypatch)
    _measure(comfy, swapped, rig.inputs, 4 * block, (1, 0), monkeypatch)
    assert "one conditioning per forward" in prepared()
    assert split not in _logged(caplog, step, (0,), (1,), (0,), (1,))
    swapped.cleanup()
    comfy.model_management.unload_all_models()
    assert_untouched(rig.patcher)


def test_auto_reads_a_split_step_as_core_read_it(comfy, pack, monkeypatch, caplog):
    """What a split step took is read before its first lone pass, as core's batching rule read
    it, with what the fixed slots held then: where that pass is the plan's first forward, which
    takes the slots, later plans keep exactly what was taken. A batch of both between two lone
    passes, a pass run alone at the end of the last step (a guidance node's), or a third
    conditioning beside one of the two, is no split."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.engine import BlockSwap

    rig = _split_batch_rig(comfy, pack, monkeypatch, caplog)
    private, shape, need, block = rig.private, rig.shape, int(rig.need), rig.block
    split, plenty = "passes one at a time", need + 4 * block
    slots = {"held": 0}  # what the fixed slots hold: taken by the plan's first forward
    monkeypatch.setattr(BlockSwap, "ring_bytes_on_device", lambda swap: slots["held"])
    # a batch of both between lone passes; then a pass alone at the end of one call and the
    # other alone in the next: no split, though less than the need is free
    assert "both conditionings in one batch" in rig.prepared()
    rig.free_at_step = need - 1
    assert split not in _logged(caplog, rig.step, (0,), (1, 0), (1,))
    rig.free_at_step = iter([plenty, plenty, need - 1])
    text = _logged(caplog, rig.step, (1, 0), (0,))
    rig.call = object()  # core's next step
    text += _logged(caplog, rig.step, (1,))
    assert split not in text
    # a third conditioning (a dual-cfg guider's) alone beside one of the two is no such case
    rig.call, rig.free_at_step = object(), need - 1
    assert split not in _logged(caplog, rig.step, (1,), (2,))
    # the next plan's first forward is a lone pass, with less than the need free
    assert "both conditionings in one batch" in rig.prepared()
    room, ring = _states[private].cond_batch_room, _states[private].swap.plan.ring_bytes
    assert ring > 0
    taken = room.left - need + 1
    rig.call, rig.free_at_step = object(), room.left - taken
    assert split not in _logged(caplog, rig.step, (1,))
    slots["held"] = ring  # ... which took the slots
    rig.free_at_step = room.left - ring - taken
    text = _logged(caplog, rig.step, (0,))
    assert split in text and "later plans" in text
    slack = comfy_auto.BATCH_SHORTFALL_SLACK
    assert comfy_auto.measured(private, shape).batch_shortfall == taken + slack
    rig.swapped.cleanup()
    comfy.model_management.unload_all_models()
    assert_untouched(rig.patcher)


@pytest.mark.parametrize("floor_dominates", [False, True])
def test_auto_keeps_what_was_taken_since_the_plan_beside_a_batch_core_ran_apart(
    comfy, pack, monkeypatch, caplog, floor_dominates
):
    """Where core ran a batch's two passes apart because less than the batch's need was free
    at the step, later plans of the latent keep, beside that need, what was taken of the VRAM
    the plan had left (its reserve, what its whole units did not fill, its slots aside) and a
    little more: with as much taken again, the next plan's steps read the need free. That
    holds where core's least inference memory, not the need, set the reserve; a second,
    smaller shortfall keeps the larger one."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.engine import BlockSwap

    rig = _split_batch_rig(comfy, pack, monkeypatch, caplog)
    private, shape, need, block = rig.private, rig.shape, rig.need, rig.block
    slack = comfy_auto.BATCH_SHORTFALL_SLACK
    if floor_dominates:
        floor = int(need) + block // 2
        monkeypatch.setattr(comfy.model_management, "minimum_inference_memory", lambda: floor)
    # fixed slots hold their bytes between forwards once taken (not so on a CPU run)
    monkeypatch.setattr(BlockSwap, "ring_bytes_on_device", lambda swap: swap.plan.ring_bytes)
    split = "passes one at a time"

    def plan():
        assert "both conditionings in one batch" in rig.prepared()
        state = _states[private]
        room = state.cond_batch_room
        assert room.reserve == comfy_auto.reserves(rig.swapped, shape, {})[0].bytes
        assert room.left >= room.reserve + state.swap.plan.ring_bytes > 0
        # what a step reads free with ``taken`` bytes in use of what the plan left
        return lambda taken: room.left - state.swap.plan.ring_bytes - taken

    read_free = plan()
    reserve = _states[private].cond_batch_room.reserve
    assert reserve == (floor if floor_dominates else need)
    taken = read_free(0) - int(need) + 1  # the step reads one byte less than the need
    assert taken > 0
    rig.free_at_step = read_free(taken)
    text = _logged(caplog, rig.step, (1,), (0,))
    assert split in text and "later plans of this latent keep" in text
    assert comfy_auto.measured(private, shape).batch_shortfall == taken + slack
    again = comfy_auto.reserves(rig.swapped, shape, {})[0]
    assert again.bytes == max(reserve, need + taken + slack) > reserve
    # the next plan, with as much taken: core's rule reads more than the need free
    read_free = plan()
    assert read_free(taken) > need
    rig.free_at_step = read_free(taken)
    # (core's rule would join them; run apart, the node names a cause other than memory)
    assert "could not join" in _logged(caplog, rig.step, (0,), (1,))
    # a smaller shortfall keeps the larger one; a shape never measured keeps nothing
    assert comfy_auto.note_batch_shortfall(private, shape, taken // 2) == taken + slack
    assert comfy_auto.measured(private, shape).batch_shortfall == taken + slack
    other = (*shape[:-1], shape[-1] + 2)
    assert comfy_auto.note_batch_shortfall(private, other, taken) == 0
    assert comfy_auto.measured(private, other) is None
    rig.swapped.cleanup()
    comfy.model_management.unload_all_models()


def test_auto_keeps_room_up_front_beside_a_batch_and_asks_core_for_the_need_alone(
    comfy, pack, monkeypatch, caplog
):
    """BATCH_ROOM_UP_FRONT ([Note: auto plans]): the plan keeps it free beside the batch's
    need, but core's batching rule is still told the need alone, so a step that finds part of
    the room taken still runs both passes as one batch (run apart, the node names a cause
    other than memory). Where more than the room was taken, later plans keep what was taken
    and the slack, counted once: the room is part of what was taken."""
    from comfyui_wan_blockswap.callbacks import comfy_auto
    from comfyui_wan_blockswap.callbacks.comfy_adapter import _states
    from comfyui_wan_blockswap.wan_blockswap.engine import BlockSwap

    rig = _split_batch_rig(comfy, pack, monkeypatch, caplog)
    private, shape, need, block = rig.private, rig.shape, rig.need, rig.block
    up_front, slack = block // 16, comfy_auto.BATCH_SHORTFALL_SLACK
    monkeypatch.setattr(comfy_auto, "BATCH_ROOM_UP_FRONT", up_front)
    monkeypatch.setattr(BlockSwap, "ring_bytes_on_device", lambda swap: swap.plan.ring_bytes)
    both = (2 * shape[0], *shape[1:])
    split = "passes one at a time"

    def plan():
        assert "both conditionings in one batch" in rig.prepared()
        state = _states[private]
        assert state.cond_batch_room.reserve == need + up_front
        # core is asked for the need alone (its batching factor times the answer)
        assert comfy_auto.COND_BATCH_FACTOR * rig.swapped.model.memory_required(both) == need
        return lambda taken: state.cond_batch_room.left - state.swap.plan.ring_bytes - taken

    read_free = plan()
    rig.free_at_step = read_free(up_front // 2)  # half the room taken: the need is still free
    assert read_free(up_front // 2) > need
    text = _logged(caplog, rig.step, (0,), (1,))
    assert split in text and "could not join" in text
    assert comfy_auto.measured(private, shape).batch_shortfall == 0
    read_free = plan()
    taken = read_free(0) - int(need) + 1  # more than the room: one byte short of the need
    assert taken > up_front
    rig.free_at_step = read_free(taken)
    assert "later plans of this latent keep" in _logged(caplog, rig.step, (1,), (0,))
    assert comfy_auto.measured(private, shape).batch_shortfall == taken + slack
    assert comfy_auto.reserves(rig.swapped, shape, {})[0].bytes == need + taken + slack
    rig.swapped.cleanup()
    comfy.model_management.unload_all_models()


def _logged(caplog, call, *args) -> str:
    caplog.clear()
    with caplog.at_level("INFO", logger="wan_blockswap"):
        call(*args)
    return caplog.text


def test_auto_reserves_core_extra_for_one_conditioning_and_its_floor_for_a_batch(
    comfy, pack, monkeypatch
):
    """One conditioning per forward keeps its need plus core's extra reserve; a batch of both
    keeps its need (core's batching rule reads the free VRAM at each step and splits the batch
    where less is free); both keep at least what current core's shrink rule asks (its least
    inference memory, and one conditioning's figure plus the extra reserve), below which core
    would unload part of the model at every other prompt; an unmeasured shape keeps core's own
    estimate."""
    from comfyui_wan_blockswap.callbacks import comfy_auto

    _, patcher, inputs, swapped, private, shape = _prepared_auto_node(comfy, pack, monkeypatch)
    mm = comfy.model_management
    extra, floor = 3 * 2**20, 5 * 2**20
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: extra)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: floor)
    core_one = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1]
    (unmeasured,) = comfy_auto.reserves(swapped, shape, {})
    assert unmeasured.bytes == max(floor, core_one + extra)

    _measure(comfy, swapped, inputs, 2 * 2**20, (0,), monkeypatch)
    one = comfy_auto.measured(private, shape).per_sample * shape[0]
    assert floor < one + extra
    (single,) = comfy_auto.reserves(swapped, shape, {})
    assert (single.bytes, single.forwards_per_step) == (one + extra, 1)

    for need in (8 * 2**20, 2 * 2**20):  # for the batch of two: cond and uncond
        comfy_auto._needs.pop(private)
        _measure(comfy, swapped, inputs, need, (1, 0), monkeypatch)
        one = comfy_auto.measured(private, shape).per_sample * shape[0]
        batched, split = comfy_auto.reserves(swapped, shape, {})
        assert (batched.bytes, batched.forwards_per_step) == (max(floor, 2 * one), 1)
        assert batched.cond_batch and not split.cond_batch
        assert (split.bytes, split.forwards_per_step) == (max(floor, one + extra), 2)
        # the larger need keeps the batch's need, the smaller core's floor
        assert (2 * one > floor) == (need == 8 * 2**20)
        # room kept up front beside the batch's need, and nothing beside one conditioning's
        with monkeypatch.context() as up_front:
            up_front.setattr(comfy_auto, "BATCH_ROOM_UP_FRONT", 2**20)
            room, alone = comfy_auto.reserves(swapped, shape, {})
            assert room.bytes == max(floor, 2 * one + 2**20) and alone == split
            # what a split step showed was taken, where that is more
            comfy_auto.note_batch_shortfall(private, shape, 2**20)
            shortfall = 2**20 + comfy_auto.BATCH_SHORTFALL_SLACK
            room, _ = comfy_auto.reserves(swapped, shape, {})
            assert room.bytes == max(floor, 2 * one + shortfall)
    # a large extra reserve (--reserve-vram): core's shrink rule asks more than the batch needs
    # (core's floor is its extra reserve plus a fixed amount, 0.8 GiB on a GPU)
    extra = 40 * 2**20
    floor = extra + 4 * 2**20
    monkeypatch.setattr(mm, "extra_reserved_memory", lambda: extra)
    monkeypatch.setattr(mm, "minimum_inference_memory", lambda: floor)
    comfy_auto._needs.pop(private)
    _measure(comfy, swapped, inputs, 8 * 2**20, (1, 0), monkeypatch)
    one = comfy_auto.measured(private, shape).per_sample * shape[0]
    batched, _ = comfy_auto.reserves(swapped, shape, {})
    asked = comfy.sampler_helpers.estimate_memory(swapped, shape, {})[1] + extra
    assert batched.bytes == asked > max(floor, 2 * one)
    assert_untouched(patcher)


def test_a_swapped_model_loads_all_its_plan_keeps_on_the_gpu(comfy, monkeypatch):
    """Core would partially load what our plan keeps resident when its own budget (free VRAM
    minus its estimate) is smaller; the plan already counted that VRAM, so a positive partial
    load becomes a full one. Shrinking passes through."""
    calls = []

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        calls.append(extra_memory)
        return 0

    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=2)
    monkeypatch.setattr(type(swapped), "partially_load", partially_load)
    swapped.partially_load(swapped.load_device, 123)
    swapped.partially_load(swapped.load_device, -5)
    patcher.partially_load(patcher.load_device, 123)  # core's own model: untouched
    assert calls == [1e32, -5, 123]


def hooked_forward(patcher, inputs, group):
    """One model call the way a sampler makes it with hooks: apply the group, then call."""
    patcher.apply_hooks(group)
    return forward(patcher, inputs)


def weight_hook(comfy, patcher, keys, seed):
    """A hook group with one scheduled-LoRA-like weight hook ('diff' patches on ``keys``),
    registered on ``patcher`` the way core's conditioning nodes do."""
    gen = torch.Generator().manual_seed(seed)
    state = patcher.model.state_dict()
    hook = comfy.hooks.WeightHook()
    hook.weights = {
        key: ("diff", (0.05 * torch.randn(state[key].shape, generator=gen),)) for key in keys
    }
    hook.need_weight_init = False
    group = comfy.hooks.HookGroup()
    group.add(hook)
    target = comfy.hooks.create_target_dict(comfy.hooks.EnumWeightTarget.Model)
    patcher.register_all_hook_patches(group, target)
    return group


def test_hook_patches_on_swapped_weights_equal_core(comfy):
    """Scheduled LoRA hooks switch weights between model calls; on swapped weights the slot
    transform applies them, on top of a regular LoRA, and switching back undoes them."""
    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(8)
    last = len(patcher.model.diffusion_model.blocks) - 1
    lora_keys = [f"diffusion_model.blocks.{last}.ffn.0.weight"]
    hook_keys = [
        f"diffusion_model.blocks.{last}.self_attn.q.weight",  # swapped
        f"diffusion_model.blocks.{last}.ffn.0.weight",  # swapped, under the LoRA too
        "diffusion_model.blocks.0.cross_attn.k.weight",  # resident
    ]
    core = lora_like(patcher, lora_keys)
    group = weight_hook(comfy, core, hook_keys, seed=1)
    comfy.model_management.load_models_gpu([core])
    expected = hooked_forward(core, inputs, group)
    expected_plain = hooked_forward(core, inputs, None)
    assert not torch.equal(expected, expected_plain)
    core.clean_hooks()
    core.cleanup()
    comfy.model_management.unload_all_models()

    ours = node(lora_like(patcher, lora_keys), blocks_to_swap=2)
    group = weight_hook(comfy, ours, hook_keys, seed=1)
    comfy.model_management.load_models_gpu([ours])
    for _ in range(2):  # on, off, on again: nothing sticks
        assert torch.equal(hooked_forward(ours, inputs, group), expected)
        assert torch.equal(hooked_forward(ours, inputs, None), expected_plain)
    ours.clean_hooks()
    ours.cleanup()
    comfy.model_management.unload_all_models()
    # and after an unload the plain model is back
    assert torch.equal(
        run(comfy, node(patcher, blocks_to_swap=2), inputs), run(comfy, patcher, inputs)
    )


def test_hook_patches_on_swapped_gguf_weights_are_a_clear_error(comfy, monkeypatch):
    """Refused before core patches anything: nothing half-applied."""
    from comfyui_wan_blockswap.callbacks import comfy_weight_patches as weight_patches
    from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError

    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    swapped = node(patcher, blocks_to_swap=2).clone()  # the override survives cloning
    last = len(patcher.model.diffusion_model.blocks) - 1
    keys = [
        f"diffusion_model.blocks.{last}.self_attn.q.weight",
        "diffusion_model.blocks.0.self_attn.q.weight",
    ]
    group = weight_hook(comfy, swapped, keys, seed=2)
    monkeypatch.setattr(weight_patches, "_is_gguf_quantized", lambda tensor: True)
    before = swapped.model.diffusion_model.blocks[0].self_attn.q.weight.clone()
    with pytest.raises(BlockSwapConfigError, match=r"scheduled LoRA hook .*GGUF.*blocks_to_swap"):
        swapped.patch_hooks(group)
    assert torch.equal(swapped.model.diffusion_model.blocks[0].self_attn.q.weight, before)
    assert not swapped.hook_backup


def test_auto_below_the_least_plan_warns_or_refuses_with_the_numbers(comfy, caplog):
    """Between the least plan's weights and those plus core's estimate for the latent, auto
    streams every layer and says the activations may not fit; below the weights alone it
    refuses, naming what can be had and what is needed."""
    import logging

    from comfyui_wan_blockswap.callbacks.comfy_adapter import _auto_config
    from comfyui_wan_blockswap.wan_blockswap import InsufficientMemoryError, SwapConfig
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model
    from comfyui_wan_blockswap.wan_blockswap.plan import min_streamed_budget, plan_swap

    from comfyui_wan_blockswap import model_configs

    patcher, _ = tiny_models.comfy_load_tiny("wan_t2v")
    model = patcher.model.diffusion_model
    sizes = measure_model(model, model_configs.detect(model).layout)[1]
    least = min_streamed_budget(sizes)
    options = SwapConfig(prefetch_blocks=1)
    needed = plan_swap(sizes, SwapConfig(vram_budget_gb=least / 2**30)).gpu_weight_bytes
    extra = comfy.model_management.extra_reserved_memory()
    with caplog.at_level(logging.WARNING, logger="wan_blockswap"):
        config = _auto_config(sizes, options, budget=0, available=needed + extra)
    assert plan_swap(sizes, config).window_bytes and "lower the resolution" in caplog.text
    with pytest.raises(InsufficientMemoryError, match=r"streaming every layer needs"):
        _auto_config(sizes, options, budget=0, available=needed + extra - 1)


@pytest.mark.parametrize("plan", [dict(blocks_to_swap=2), dict(vram_budget_gb=1e-4)])
def test_core_wans_ffn_in_token_chunks_equals_core(comfy, monkeypatch, plan):
    """Core's own WanFeedForward (its GELU folded into the down-projection's call) run a few
    tokens at a time by the node's swap gives core's output ([Note: token chunks]); the node
    chunks at 8,192 tokens, more than a tiny model has, so the test chunks at 20: equal chunks
    of 16 of its 48 tokens, a row count the CPU's BLAS rounds as it does 48."""
    import dataclasses
    import functools

    from conftest import load_pack

    patcher, make_inputs = tiny_models.comfy_load_tiny("wan_t2v")
    inputs = make_inputs(3)
    expected = run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    nodes = load_pack().nodes
    widgets = nodes.config_from_widgets

    @functools.wraps(widgets)  # the node checks its widgets against this signature
    def chunked(**w):
        return dataclasses.replace(widgets(**w), chunk_tokens=20)

    monkeypatch.setattr(nodes, "config_from_widgets", chunked)
    ffn = type(patcher.model.diffusion_model.blocks[0].ffn)
    original, calls = ffn.forward, []

    def counting(self, x):
        if self in ffns:  # core 0.3.64's FFN is a plain Sequential, as other parts are
            calls.append(x.shape[1])
        return original(self, x)

    monkeypatch.setattr(ffn, "forward", counting)
    model = node(patcher, **{"blocks_to_swap": 0, **plan})
    ffns = [block.ffn for block in model.model.diffusion_model.blocks]
    swap = swap_of(model)
    assert swap.config.chunk_tokens == 20
    assert_chunked_equals(run(comfy, model, inputs), expected)
    blocks = len(model.model.diffusion_model.blocks)
    assert calls == [16, 16, 16] * blocks, calls
