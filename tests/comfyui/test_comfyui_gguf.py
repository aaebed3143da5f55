"""The WAN BlockSwap node after ComfyUI-GGUF's loader, whose quantized weights are
``GGMLTensor`` objects reporting their dequantized shape: tested against the real
ComfyUI-GGUF checkout named by ``COMFYUI_GGUF_PATH`` (skipped without one)."""

import importlib.util
import os
import sys

import pytest
import torch

import tiny_models
from writers import write_gguf
from test_comfy_node import node, run


@pytest.fixture(scope="module")
def gguf_pack(comfy):
    path = os.environ.get("COMFYUI_GGUF_PATH")
    if not path or not os.path.isfile(os.path.join(path, "__init__.py")):
        pytest.skip("COMFYUI_GGUF_PATH is not set")
    name = "comfyui_gguf_under_test"
    if name not in sys.modules:  # imported as ComfyUI imports a custom node package
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(path, "__init__.py"), submodule_search_locations=[path]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(autouse=True)
def _unload(comfy):
    yield
    comfy.model_management.unload_all_models()


def load_gguf(comfy, gguf_pack, path):
    """What ComfyUI-GGUF's "Unet Loader (GGUF)" node does."""
    state = gguf_pack.loader.gguf_sd_loader(str(path))
    ops = gguf_pack.ops.GGMLOps()
    model = comfy.sd.load_diffusion_model_state_dict(state, {"custom_operations": ops})
    return gguf_pack.nodes.GGUFModelPatcher.clone(model)


def gguf_lora(comfy, patcher, keys, seed=0):
    """A clone with 'diff' patches of each weight's logical shape (a quantized GGMLTensor's
    ``state_dict`` entry has its byte shape, which core would skip as a shape mismatch)."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    for key in keys:
        shape = tuple(comfy.utils.get_attr(patcher.model, key).shape)
        patches[key] = ("diff", (0.05 * torch.randn(shape, generator=gen),))
    clone = patcher.clone()
    clone.add_patches(patches, 1.0)
    return clone


@pytest.fixture
def gguf_wan(comfy, gguf_pack, tmp_path):
    state = tiny_models.comfy_state_dict_for("wan_t2v", prefix="model.diffusion_model.")
    path = tmp_path / "tiny_wan_q8_0.gguf"
    write_gguf(state, path, "Q8_0")
    patcher = load_gguf(comfy, gguf_pack, path)
    weight = patcher.model.diffusion_model.blocks[0].self_attn.q.weight
    assert weight.dtype == torch.uint8 and weight.shape != weight.size()  # really quantized
    return patcher


def test_node_after_gguf_loader_equals_gguf_without_it(comfy, gguf_wan):
    inputs = tiny_models.comfy_make_inputs(gguf_wan.model.diffusion_model)(3)
    expected = run(comfy, gguf_wan, inputs)
    comfy.model_management.unload_all_models()
    swapped = node(gguf_wan, blocks_to_swap=3)
    block = swapped.model.diffusion_model.blocks[-1]
    assert block.self_attn.q.weight.numel() == 0  # a placeholder between uses
    for _ in range(2):
        assert torch.equal(run(comfy, swapped, inputs), expected)
    # ComfyUI-GGUF's own model is untouched: its patcher class, its weights, core alone
    assert type(swapped) is type(gguf_wan)
    assert gguf_wan.model.diffusion_model.blocks[-1].self_attn.q.weight.numel() > 0
    assert not any(m._forward_pre_hooks for m in gguf_wan.model.modules())
    comfy.model_management.unload_all_models()
    assert torch.equal(run(comfy, gguf_wan, inputs), expected)


def test_lora_on_gguf_weights_equals_gguf_without_node(comfy, gguf_wan):
    inputs = tiny_models.comfy_make_inputs(gguf_wan.model.diffusion_model)(4)
    last = len(gguf_wan.model.diffusion_model.blocks) - 1
    keys = [
        f"diffusion_model.blocks.{last}.self_attn.q.weight",  # swapped, quantized
        f"diffusion_model.blocks.{last}.norm3.weight",  # swapped, F32 in the file
        "diffusion_model.blocks.0.ffn.0.weight",  # resident
    ]
    expected = run(comfy, gguf_lora(comfy, gguf_wan, keys), inputs)
    comfy.model_management.unload_all_models()
    plain = run(comfy, gguf_wan, inputs)
    comfy.model_management.unload_all_models()
    # each patch changes the output on its own (none is skipped as a shape mismatch)
    for key in keys:
        alone = run(comfy, gguf_lora(comfy, gguf_wan, [key]), inputs)
        comfy.model_management.unload_all_models()
        assert not torch.equal(alone, plain), key
    swapped = node(gguf_lora(comfy, gguf_wan, keys), blocks_to_swap=3)
    for _ in range(2):  # the second run: after core unpatched and reloaded
        assert torch.equal(run(comfy, swapped, inputs), expected)
        comfy.model_management.unload_all_models()
