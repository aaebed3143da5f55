"""The node on LTX-Video, LTX-2 / LTX-2.3, HunyuanVideo 1.5 and Kandinsky 5 as current core
builds them (``tests/tiny_ltx_hv15_k5.py``): core detects each from its keys and picks our
record, and the node's outputs equal core's over block, layer and streamed plans, with and
without a LoRA-style patch, through core's loader and our lazy loader. Each test skips on a
core without the family's class (0.3.64 has LTX-Video only)."""

import pytest
import torch

import tiny_ltx_hv15_k5 as tiny
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

# A LoRA patch on a swapped main block, on text-only weights (connector / refiner / text
# blocks, text projections) and on a streamed layer outside the blocks.
LORA_KEYS = {
    "ltxv": [
        "transformer_blocks.3.attn1.to_q.weight",
        "transformer_blocks.3.ff.net.0.proj.weight",
        "caption_projection.linear_1.weight",
        "adaln_single.linear.weight",
    ],
    "ltxav": [
        "transformer_blocks.2.audio_attn1.to_q.weight",
        "transformer_blocks.2.audio_to_video_attn.to_k.weight",
        "video_embeddings_connector.transformer_1d_blocks.1.attn1.to_q.weight",
        "audio_caption_projection.linear_1.weight",
        "audio_adaln_single.linear.weight",
    ],
    "ltxav23": [
        "transformer_blocks.2.video_to_audio_attn.to_v.weight",
        "transformer_blocks.2.attn2.to_gate_logits.weight",
        "audio_embeddings_connector.transformer_1d_blocks.0.ff.net.0.proj.weight",
        "prompt_adaln_single.linear.weight",
    ],
    "hunyuan_video15": [
        "double_blocks.2.img_attn.qkv.weight",
        "double_blocks.2.txt_mlp.0.weight",
        "txt_in.individual_token_refiner.blocks.1.self_attn.qkv.weight",
        "byt5_in.fc2.weight",
        "vision_in.proj.1.weight",
        "time_in.in_layer.weight",
    ],
    "kandinsky5": [
        "visual_transformer_blocks.2.cross_attention.to_key.weight",
        "text_transformer_blocks.1.feed_forward.in_layer.weight",
        "text_embeddings.in_layer.weight",
        "out_layer.modulation.out_layer.weight",
    ],
}
LORA_KEYS["kandinsky5_image"] = LORA_KEYS["kandinsky5"]


def load(arch, **kwargs):
    return load_or_skip(tiny, arch, **kwargs)


@pytest.mark.parametrize("arch", ARCHS)
def test_core_detects_it_and_our_record_matches(comfy, arch):
    patcher, _ = load(arch)
    # every block's checkpoint keys sit under the record's prefix; text-only lists hold
    # blocks (1.5 has no single blocks)
    model, record, _ = check_detected_record(patcher, tiny.SPECS[arch], ("single_blocks",))
    # no typos: every module path names an attribute of current core's class (None or a
    # plain function where this variant lacks the part, which the engine skips); older cores
    # lack some (0.3.64's LTX-Video has no prompt_adaln_single)
    paths = record.layout.txt_emb + record.layout.img_emb + record.layout.stream_modules
    if tiny.has_class("ltxav"):
        assert [path for path in paths if not hasattr(model, path)] == []


@pytest.mark.parametrize("arch", ["hunyuan_video", "hunyuan_video15"])
def test_hunyuan_video_and_1_5_each_get_their_own_record(comfy, arch):
    import tiny_models
    from comfyui_wan_blockswap import model_configs

    if arch == "hunyuan_video":
        patcher, _ = tiny_models.comfy_load_tiny(arch)
    else:
        patcher, _ = load(arch)
    model = patcher.model.diffusion_model
    expected = "hunyuan_video.comfyui" if arch == "hunyuan_video" else "hunyuan_video15.comfyui"
    assert type(model).__name__ == "HunyuanVideo"  # one class for both
    assert model_configs.detect(model).name == expected
    assert model_configs.detect_from_keys(model.state_dict()).name == expected


def _plans(model, record):
    """Room for half of every main block beside the every-layer plan: some layers of every
    swapped block stay resident."""
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    _, sizes = measure_model(model, record.layout)
    return plan_options(model, record, sum(b.nbytes for b in sizes.with_role("main")) // 2)


@pytest.mark.parametrize("arch", ARCHS)
def test_node_equals_core_over_block_layer_and_streamed_plans_with_a_lora(comfy, arch):
    from comfyui_wan_blockswap import model_configs

    patcher, make_inputs = load(arch)
    inputs = make_inputs(1)
    model = patcher.model.diffusion_model
    record = model_configs.detect(model)
    keys, plain, expected = core_outputs_with_a_lora(comfy, tiny, patcher, inputs, LORA_KEYS[arch])
    text_lists = {bl.path for bl in record.layout.block_lists if bl.role == "txt_emb"}
    for kind, options in _plans(model, record).items():
        swapped = node(lora_like(patcher, keys), **options)
        swap = swap_of(swapped)
        if kind == "blocks":  # the text-only blocks travel with offload_txt_emb
            names = {unit.name for unit in swap.units}
            assert all(any(n.startswith(path + ".") for n in names) for path in text_lists)
        elif kind == "layers":
            assert swap.plan.swap_unit == "layer" and swap.plan.kept_layers
        else:
            assert swap.plan.window_bytes and len(swap.plan.swapped) == len(swap.sizes.blocks)
        for _ in range(2):  # the second run follows the learned order
            assert torch.equal(tiny.run(comfy, swapped, inputs), expected), kind
        if arch == "hunyuan_video15":  # core's concat_cond reads img_in's weight shape
            cond = dict(noise=inputs["x"][:, :4], device=patcher.load_device)
            assert torch.equal(swapped.model.concat_cond(**cond), patcher.model.concat_cond(**cond))
        comfy.model_management.unload_all_models()
    blocks = _plans(model, record)["blocks"]
    check_lora_after_the_node(comfy, tiny, patcher, blocks, keys, inputs, plain, expected)


def test_core_prefetch_queue_leaves_swapped_ltx2_blocks_alone(comfy, monkeypatch):
    """LTX-2's forward asks core for a block prefetch queue (dynamic VRAM on a GPU). Our MODEL
    is a static patcher, so core never makes one for it; forced on here, core's queue finds
    nothing of dynamic VRAM's on our blocks and the output stays core's."""
    patcher, make_inputs = load("ltxav")
    inputs = make_inputs(2)
    expected = tiny.run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(patcher, blocks_to_swap=2, offload_txt_emb=True)
    assert not swapped.is_dynamic()  # model_base passes prefetch_dynamic_vbars=is_dynamic()
    made = forced_prefetch_runs(comfy, monkeypatch, tiny, swapped, inputs, expected)
    assert len(made) == 2


LAZY = ["ltxv", "hunyuan_video15", "kandinsky5", "kandinsky5_image", "ltxav", "ltxav23"]


@pytest.mark.parametrize("arch", LAZY)
def test_lazy_loader_node_equals_core_loader(comfy, pack, tmp_path, arch):
    metadata = tiny.metadata_for(arch)  # LTX-2's dims travel in the file's metadata
    check_lazy_loader_equals_core(comfy, pack, tmp_path, tiny, arch, metadata)


def test_presets_come_from_the_real_block_sizes():
    from comfyui_wan_blockswap import model_configs

    names = model_configs.preset_names()
    for display, reserve in (
        ("LTX-2 / LTX-2.3", 4.0),
        ("LTX-Video 13B", 3.5),
        ("HunyuanVideo 1.5", 4.0),
        ("Kandinsky 5 Video Pro", 5.0),
    ):
        for gpu in (8, 12, 16, 24):
            preset = model_configs.get_preset(f"{display}, {gpu} GB")
            assert preset.as_dict()["vram_budget_gb"] == round(gpu - reserve, 1)
    assert "Kandinsky 5 Image Lite, 8 GB" in names


@pytest.mark.parametrize("variant", list(tiny.REAL))
def test_released_sizes_match_their_variant_and_block_size(comfy, variant):
    """The released configs, built by core on the meta device: our record and variant match,
    and one block is as large as the presets assume."""
    from comfyui_wan_blockswap import model_configs
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    spec = tiny.REAL[variant][0]
    if not tiny.has_class(spec):
        pytest.skip(f"this core has no {tiny.SPECS[spec].model_config} ({variant})")
    model = tiny.build_real(variant)
    record = model_configs.detect(model)
    expected = {"ltx-2.3": "ltx-2"}.get(variant, variant)  # one variant: same blocks and width
    assert model_configs.variant_of(record, model).name == expected
    _, sizes = measure_model(model, record.layout)
    assert round(sizes.with_role("main")[0].nbytes / 1e9, 3) == tiny.REAL[variant][2]
