"""The node on MiniMax H3 and the Wan 2.2 variants (5B, Animate, S2V, HuMo, camera) as current
core builds them (``tests/tiny_minimax_wan22.py``): core detects each from its keys and picks
our record, the blocks are found in the order the forward runs them, and the node's outputs
equal core's over block, layer and streamed plans, with and without a LoRA-style patch on the
blocks, on the modules the variants run between the blocks (S2V's audio injectors, Animate's
face adapters, the camera adapter) and on HuMo's audio cross-attention inside them, through
core's loader and our lazy loader. Each test skips on a core without the family's class."""

import pytest
import torch

import tiny_minimax_wan22 as tiny
from arch_fixtures import _one_thread, _unload  # noqa: F401  (fixtures)
from arch_fixtures import (
    check_detected_record,
    check_lazy_loader_equals_core,
    check_lora_after_the_node,
    core_outputs_with_a_lora,
    forced_prefetch_runs,
    load_or_skip,
    plan_options,
)
from test_comfy_node import lora_like, node, swap_of

ARCHS = list(tiny.SPECS)

# A LoRA patch on swapped main blocks, on text-only weights, on streamed layers outside the
# blocks and on each variant's own modules.
LORA_KEYS = {
    "minimax_h3": [
        "blocks.3.attn.qkv_proj.weight",
        "blocks.2.adaln_proj.linear.weight",
        "token_refiner.blocks.1.mlp.fc1.weight",
        "condition_proj.weight",
        "time_embedder.proj_in.weight",
        "audio_patch_proj.weight",
        "final_layer.video_out.weight",
    ],
    "minimax_h3_curve": [
        "blocks.3.mlp.fc2.weight",
        "blocks.1.adaln_proj.linear.weight",
        "token_refiner.blocks.0.attn.out_proj.weight",
        "final_layer.audio_out.weight",
    ],
    "wan22_5b": [
        "blocks.3.self_attn.q.weight",
        "blocks.2.ffn.0.weight",
        "text_embedding.0.weight",
        "time_projection.1.weight",
    ],
    "wan22_animate": [
        "blocks.9.cross_attn.k_img.weight",
        "face_adapter.fuser_blocks.1.linear1_kv.weight",
        "pose_patch_embedding.weight",
        "img_emb.proj.1.weight",
        "time_embedding.0.weight",
    ],
    "wan22_s2v": [
        "blocks.4.self_attn.q.weight",
        "audio_injector.injector.1.q.weight",
        "audio_injector.injector_adain_layers.0.linear.weight",
        "casual_audio_encoder.encoder.final_linear.weight",
        "frame_packer.proj.weight",
        "text_embedding.2.weight",
    ],
    "wan21_humo": [
        "blocks.3.audio_cross_attn_wrapper.audio_cross_attn.k.weight",
        "blocks.1.ffn.2.weight",
        "audio_proj.audio_proj_glob_1.layer.weight",
        "time_projection.1.weight",
    ],
    "wan22_camera": [
        "blocks.3.self_attn.o.weight",
        "control_adapter.conv.weight",
        "control_adapter.residual_blocks.0.conv1.weight",
        "text_embedding.0.weight",
    ],
    "wan21_camera": [
        "blocks.2.cross_attn.k_img.weight",
        "control_adapter.residual_blocks.0.conv2.weight",
        "img_emb.proj.1.weight",
    ],
}

# What each variant runs between or before the blocks, outside every block list: it must not
# be swapped as a block, and a streamed plan streams it (wan22_variants.py).
EXTRAS = {
    "wan22_s2v": ("audio_injector", "casual_audio_encoder"),
    "wan22_animate": ("face_adapter",),
    "wan22_camera": ("control_adapter",),
    "wan21_camera": ("control_adapter",),
}


def load(arch, **kwargs):
    return load_or_skip(tiny, arch, **kwargs)


def without_face(inputs):
    # the face frames cost 4 s a forward on one CPU core: only the dedicated test runs them
    return {k: v for k, v in inputs.items() if k != "face_pixel_values"}


@pytest.mark.parametrize("arch", ARCHS)
def test_core_detects_it_and_our_record_finds_the_blocks_in_forward_order(comfy, arch):
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    patcher, make_inputs = load(arch)
    model, record, _ = check_detected_record(patcher, tiny.SPECS[arch])  # every list has blocks
    # every module path names an attribute of core's class (the curve form has no
    # time_embedder, a t2v model's img_emb is None: the engine skips those)
    paths = record.layout.txt_emb + record.layout.img_emb + record.layout.stream_modules
    missing = [path for path in paths if not hasattr(model, path.split(".")[0])]
    assert missing == (["time_embedder"] if arch == "minimax_h3_curve" else [])
    # the main blocks, in the order we declare them, are the order core's forward runs them
    _, sizes = measure_model(model, record.layout)
    declared = [block.name for block in sizes.with_role("main")]
    assert declared == [f"blocks.{i}" for i in range(len(model.blocks))]
    ran = []
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: ran.append(f"blocks.{i}"))
        for i, block in enumerate(model.blocks)
    ]
    try:
        tiny.run(comfy, patcher, without_face(make_inputs(0)))
    finally:
        for handle in handles:
            handle.remove()
    assert ran == declared
    # the variants' own modules sit in no block list
    for extra in EXTRAS.get(arch, ()):
        assert all(not b.name.startswith(extra + ".") for b in sizes.blocks)


@pytest.mark.parametrize("arch", ARCHS)
def test_node_equals_core_over_block_layer_and_streamed_plans_with_a_lora(comfy, arch):
    from comfyui_wan_blockswap import model_configs

    patcher, make_inputs = load(arch)
    inputs = without_face(make_inputs(1))
    model = patcher.model.diffusion_model
    record = model_configs.detect(model)
    keys, plain, expected = core_outputs_with_a_lora(comfy, tiny, patcher, inputs, LORA_KEYS[arch])
    text_lists = {bl.path for bl in record.layout.block_lists if bl.role == "txt_emb"}
    for kind, options in plan_options(model, record).items():
        swapped = node(lora_like(patcher, keys), **options)
        swap = swap_of(swapped)
        names = {unit.name for unit in swap.units}
        if kind == "blocks":  # the text-only blocks travel with offload_txt_emb
            assert all(any(n.startswith(path + ".") for n in names) for path in text_lists)
        elif kind == "layers":
            assert swap.plan.swap_unit == "layer" and swap.plan.kept_layers
        else:
            assert swap.plan.window_bytes and len(swap.plan.swapped) == len(swap.sizes.blocks)
            for extra in EXTRAS.get(arch, ()):  # the variant's own modules stream too
                assert any(n.startswith(extra + ".") for n in names), (extra, sorted(names))
        for _ in range(2):  # the second run follows the learned order
            assert torch.equal(tiny.run(comfy, swapped, inputs), expected), kind
        comfy.model_management.unload_all_models()
    blocks = plan_options(model, record)["blocks"]
    check_lora_after_the_node(comfy, tiny, patcher, blocks, keys, inputs, plain, expected)


@pytest.mark.parametrize("arch", ["minimax_h3", "minimax_h3_curve"])
def test_minimax_bf16_with_its_fp32_layers_equals_core(comfy, arch):
    """At bf16 core keeps H3's patch projections, time embedder and output heads (and the
    curve form's adaLN) in fp32: blocks and streamed layers of both dtypes move together."""
    from comfyui_wan_blockswap import model_configs

    patcher, make_inputs = load(arch, dtype=torch.bfloat16)
    model = patcher.model.diffusion_model
    assert model.final_layer.video_out.weight.dtype == torch.float32
    assert model.blocks[0].attn.qkv_proj.weight.dtype == torch.bfloat16
    inputs = make_inputs(6)
    inputs["raw_context"] = inputs["raw_context"].bfloat16()  # the text encoder's dtype
    keys = [f"diffusion_model.{key}" for key in LORA_KEYS[arch]]
    expected = tiny.run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    plans = plan_options(model, model_configs.detect(model))
    for kind in ("blocks", "streamed"):
        swapped = node(lora_like(patcher, keys), **plans[kind])
        assert torch.equal(tiny.run(comfy, swapped, inputs), expected), kind
        comfy.model_management.unload_all_models()


def test_animate_face_adapters_between_streamed_blocks_equal_core(comfy):
    """Animate's face frames through the motion encoder and the face adapters that run after
    blocks 0 and 5, all streamed around streamed blocks, with a LoRA on an adapter."""
    from comfyui_wan_blockswap import model_configs

    patcher, make_inputs = load("wan22_animate")
    inputs = make_inputs(4)
    keys = [f"diffusion_model.{key}" for key in LORA_KEYS["wan22_animate"]]
    expected = tiny.run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    assert not torch.equal(expected, tiny.run(comfy, patcher, without_face(inputs)))
    comfy.model_management.unload_all_models()
    record = model_configs.detect(patcher.model.diffusion_model)
    options = plan_options(patcher.model.diffusion_model, record)["streamed"]
    swapped = node(lora_like(patcher, keys), **options)
    names = {unit.name for unit in swap_of(swapped).units}
    assert {"motion_encoder", "face_adapter"} <= {n.split(".")[0] for n in names}
    assert torch.equal(tiny.run(comfy, swapped, inputs), expected)


def test_core_prefetch_queue_leaves_swapped_minimax_blocks_alone(comfy, monkeypatch):
    """MiniMax H3's forward asks core for a block prefetch queue (dynamic VRAM on a GPU). Our
    MODEL is a static patcher, so core never makes one for it; forced on here, core's queue
    finds nothing of dynamic VRAM's on our blocks and the output stays core's."""
    patcher, make_inputs = load("minimax_h3")
    inputs = make_inputs(2)
    expected = tiny.run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=2, offload_txt_emb=True)
    assert not swapped.is_dynamic()  # model_base passes prefetch_dynamic_vbars=is_dynamic()
    # what prefetch_queue_pop would cast: modules with dynamic VRAM's handle; none here
    model = swapped.model.diffusion_model
    assert not [m for m in model.blocks.modules() if hasattr(m, "_v")]
    made = forced_prefetch_runs(comfy, monkeypatch, tiny, swapped, inputs, expected)
    assert len(made) == 2 and all(len(q) == 1 for q in made)  # popped through to the end


@pytest.mark.parametrize(
    "arch", ["minimax_h3", "wan22_s2v", "wan22_animate", "wan21_humo", "wan22_camera"]
)
def test_lazy_loader_node_equals_core_loader(comfy, pack, tmp_path, arch):
    check_lazy_loader_equals_core(comfy, pack, tmp_path, tiny, arch)


def test_presets_come_from_the_real_block_sizes():
    from comfyui_wan_blockswap import model_configs

    for gpu in (8, 12, 16, 24):
        preset = model_configs.get_preset(f"MiniMax H3, {gpu} GB")
        assert preset.as_dict()["vram_budget_gb"] == round(gpu - 5.0, 1)


# The released sizes on the meta device: record, variant, bf16 GB of one block and of each
# module the variant runs outside the blocks.
REAL = {
    "minimax-h3": ("comfy.ldm.minimax.model.MiniMaxH3Model", {}, 1.291, {}),
    "minimax-h3-curve": (
        "comfy.ldm.minimax.model.MiniMaxH3Model",
        dict(adaln_curve_grid=1024, time_embed_dim=64),
        0.796,
        {},
    ),
    "wan22-s2v-14b": (
        "comfy.ldm.wan.model.WanModel_S2V",
        {},
        0.703,
        {"audio_injector": 3.776, "casual_audio_encoder": 0.190},
    ),
    "wan22-animate-14b": (
        "comfy.ldm.wan.model_animate.AnimateWanModel",
        dict(in_dim=36),
        0.808,
        {"face_adapter": 1.678},
    ),
    "wan22-camera-14b": (
        "comfy.ldm.wan.model.CameraWanModel",
        dict(in_dim=36, model_type="camera_2.2"),
        0.703,
        {"control_adapter": 1.007},
    ),
    "wan21-humo-17b": ("comfy.ldm.wan.model.HumoWanModel", {}, 0.839, {}),
}
_WAN14B = dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40)


@pytest.mark.parametrize("variant", list(REAL))
def test_released_sizes_match_their_variant_and_block_size(comfy, variant):
    import importlib

    import comfy.ops
    from comfyui_wan_blockswap import model_configs
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    dotted, config, block_gb, extras = REAL[variant]
    module, _, cls = dotted.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        pytest.skip(f"this core has no {dotted}")
    if not variant.startswith("minimax"):
        config = {**_WAN14B, **config}
    model = cls(
        **config,
        operations=comfy.ops.disable_weight_init,
        device=torch.device("meta"),
        dtype=torch.bfloat16,
    )
    record = model_configs.detect(model)
    expected = "minimax-h3" if variant.startswith("minimax") else "wan-14b"
    assert model_configs.variant_of(record, model).name == expected
    _, sizes = measure_model(model, record.layout)
    assert round(sizes.with_role("main")[0].nbytes / 1e9, 3) == block_gb
    for path, gb in extras.items():
        assert path in record.layout.stream_modules
        module = model.get_submodule(path)
        size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
        assert round(size / 1e9, 3) == gb
