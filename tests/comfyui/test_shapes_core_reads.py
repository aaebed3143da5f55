"""Weights whose shape core reads between forwards stay readable under the node.

Core's ``Flux.concat_cond`` (Flux.2 and Chroma inherit it) takes the number of input channels
from ``diffusion_model.img_in.weight.shape[1]``, because a control LoRA widens ``img_in`` after
loading; on an error it falls back to the file's ``in_channels`` and silently drops the control
image. A streamed module's weights are 0-element placeholders between uses, so these modules
stay resident (they are small) whatever the embedding options say.
"""

import gc

import pytest

import tiny_models
from arch_fixtures import plan_options
import tiny_qwen_flux2_zimage as tiny
from test_comfy_node import node, run

from comfyui_wan_blockswap import model_configs


@pytest.fixture(autouse=True)
def _unload(comfy):
    yield
    gc.collect()
    comfy.model_management.unload_all_models()


def _load(name: str):
    if name == "flux":
        return tiny_models.comfy_load_tiny("flux")
    if not tiny.has_class(name):
        pytest.skip(f"this core has no {name}")
    return tiny.load_tiny(name)


@pytest.mark.parametrize("name", ["flux", "flux2"])
def test_img_in_width_is_readable_when_every_layer_streams(comfy, name):
    patcher, make_inputs = _load(name)
    width = patcher.model.diffusion_model.img_in.weight.shape[1]
    model = patcher.model.diffusion_model
    options = plan_options(model, model_configs.match(model))["streamed"]  # every layer moves
    swapped = node(patcher, **options)
    run(comfy, swapped, make_inputs(1))
    model = swapped.model
    assert model.diffusion_model.img_in.weight.shape[1] == width
    # what concat_cond computes from it (no control image: nothing to concatenate)
    channels = width // (model.diffusion_model.patch_size**2)
    assert channels == model.model_config.unet_config["in_channels"]
