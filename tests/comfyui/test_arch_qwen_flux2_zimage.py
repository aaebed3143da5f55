"""Qwen-Image, Flux.2, LongCat-Image and Z-Image (with Omni and pixel space) on ComfyUI core's
own loading path: tiny models loaded by ``comfy.sd.load_diffusion_model_state_dict`` from
state dicts in the real key layout, compared with the same model without the node over
block, layer and streamed plans, with a LoRA-style patch, and through the node's lazy
loader. Families a core lacks (Flux.2, LongCat-Image and Z-Image before v0.33) are skipped.
"""

import gc
import inspect

import pytest
import torch

import tiny_qwen_flux2_zimage as tiny
from arch_fixtures import _one_thread  # noqa: F401  (autouse fixture)
from test_comfy_node import WIDGETS, lora_like, node, swap_of

NAMES = list(tiny.SPECS)


@pytest.fixture(autouse=True)
def _unload(comfy):
    yield
    gc.collect()  # see test_comfy_node._unload: core's finalizers must not fire mid-unload
    comfy.model_management.unload_all_models()


def _needs(name: str) -> None:
    if not tiny.has_class(name):
        pytest.skip(f"this core has no {name} ({tiny.SPECS[name].needs})")


@pytest.mark.parametrize("name", NAMES)
def test_core_detects_the_family_and_our_record_matches(comfy, name):
    from comfyui_wan_blockswap import model_configs

    _needs(name)
    spec = tiny.SPECS[name]
    patcher, _ = tiny.load_tiny(name)
    assert type(patcher.model.model_config).__name__ == spec.model_config
    model = patcher.model.diffusion_model
    assert model_configs.match(model).name == spec.record  # a record, not the generic rule
    keys = tiny.state_dict_for(name).keys()
    assert model_configs.detect_from_keys(keys).name == spec.record


def _covered_bytes(model, layout) -> tuple[int, int]:
    """(bytes of the tensors no part of ``layout`` can move, bytes in all)."""
    paths = [bl.path for bl in layout.block_lists]
    paths += [*layout.txt_emb, *layout.img_emb, *layout.stream_modules]
    total = left = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        size = tensor.numel() * tensor.element_size()
        total += size
        if not any(name.startswith(path + ".") for path in paths):
            left += size
    return left, total


@pytest.mark.parametrize("variant", list(tiny.REAL))
def test_released_sizes_match_their_record_variant_and_presets(comfy, variant):
    """The released configs, built on the meta device: the record matches them, names the
    variant its presets come from, and leaves nothing large that no plan can move."""
    from comfyui_wan_blockswap import model_configs

    _, _, record, needs = tiny.REAL[variant]
    if not tiny.has_real(variant):
        pytest.skip(f"this core has no {needs} of the released config")
    model = tiny.build_real(variant)
    config = model_configs.match(model)
    assert config.name == record
    left, total = _covered_bytes(model, config.layout)
    assert left < 0.002 * total, f"{left / 2**20:.0f} MiB outside every swappable part"
    found = model_configs.variant_of(config, model)
    if found is None and record == "flux.comfyui":
        return  # LongCat-Image: Flux's record, whose variants (flux.py) lack its size so far
    assert found is not None and found.name == variant
    names = {p.name for p in model_configs.PRESETS if p.variant == variant}
    assert names == {f"{found.display_name}, {gb} GB" for gb in (8, 12, 16, 24)}
    if variant == "flux2-dev":
        # Flux's record would leave Flux.2's shared modulation (1.1 GB) resident
        left, _ = _covered_bytes(model, model_configs.get_config("flux.comfyui").layout)
        assert left > 2**30


def _plan_options(model, plan: str) -> dict:
    from comfyui_wan_blockswap import model_configs
    from comfyui_wan_blockswap.wan_blockswap import SwapConfig, min_vram_budget_gb, plan_for
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    layout = model_configs.detect(model).layout
    if plan == "block":  # all main blocks but one, the text refiner and the embedders
        _, sizes = measure_model(model, layout)
        main = [b for b in sizes.blocks if b.role == "main"]
        return dict(blocks_to_swap=len(main) - 1, offload_txt_emb=True, offload_img_emb=True)
    if plan == "layer":  # every block streams some layers and keeps the others
        _, sizes = measure_model(model, layout)
        every_layer = plan_for(model, SwapConfig(swap_unit="layer"), layout).gpu_weight_bytes
        budget = (every_layer + sum(b.nbytes for b in sizes.blocks) // 2) / 2**30
        return dict(blocks_to_swap=0, vram_budget_gb=round(budget, 6))
    # streamed: below every slot plan, so every large layer streams, one at a time
    least = min_vram_budget_gb(model, layout)
    return dict(blocks_to_swap=0, vram_budget_gb=round(least * 1.05, 6))


def _check_plan(swapped, plan: str) -> None:
    swap = swap_of(swapped)
    if plan == "block":
        assert swap.plan.swap_unit == "block" and swap.plan.kind == "slots"
        assert swap.plan.offload_txt_emb
        # outside a forward a swapped block holds placeholders: the forward fetches it
        model = swapped.model.diffusion_model
        for name in swap.plan.swapped:
            assert all(p.numel() == 0 for p in model.get_submodule(name).parameters())
    elif plan == "layer":
        assert swap.plan.swap_unit == "layer" and swap.plan.kept_layers
    else:
        assert swap.plan.kind == "streamed"


def _layer_plan_keys(swapped) -> list[str]:
    """A layer that streams and one that stays resident, both in the last swapped block."""
    swap = swap_of(swapped)
    name = swap.plan.swapped[-1]
    block = swapped.model.diffusion_model.get_submodule(name)
    streamed = {unit.name for unit in swap.units}
    linears = [
        f"{name}.{path}" for path, m in block.named_modules() if isinstance(m, torch.nn.Linear)
    ]
    moving = next(path for path in linears if path in streamed)
    kept = next(path for path in linears if path not in streamed)
    return [f"diffusion_model.{moving}.weight", f"diffusion_model.{kept}.weight"]


@pytest.mark.parametrize("plan", ["block", "layer", "streamed"])
@pytest.mark.parametrize("name", NAMES)
def test_node_equals_core_over_plans_with_and_without_a_lora(comfy, name, plan):
    _needs(name)
    patcher, make_inputs = tiny.load_tiny(name)
    inputs = make_inputs(1)
    expected = tiny.run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()

    options = _plan_options(patcher.model.diffusion_model, plan)
    swapped = node(patcher, **options)
    _check_plan(swapped, plan)
    assert torch.equal(tiny.run(comfy, swapped, inputs), expected)
    assert torch.equal(tiny.run(comfy, swapped, inputs), expected)  # learned order
    comfy.model_management.unload_all_models()

    # a swapped block, a resident one, the text embedding and another embedding; in a layer
    # plan also a streamed and a kept layer of a swapped block
    keys = [f"diffusion_model.{key}" for key in tiny.SPECS[name].lora_keys]
    if plan == "layer":
        keys += _layer_plan_keys(swapped)
    expected_lora = tiny.run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    assert not torch.equal(expected, expected_lora)
    # the LoRA loaded before the node in one plan, after it in the others
    if plan == "layer":
        patched = node(lora_like(patcher, keys), **options)
    else:
        patched = lora_like(node(patcher, **options), keys)
    assert torch.equal(tiny.run(comfy, patched, inputs), expected_lora)
    comfy.model_management.unload_all_models()
    assert torch.equal(tiny.run(comfy, patcher, inputs), expected)  # upstream untouched


@pytest.mark.parametrize("name", NAMES)
def test_lazy_loader_node_equals_core_loader(comfy, pack, tmp_path, name):
    import folder_paths
    from safetensors.torch import save_file

    _needs(name)
    sd = tiny.state_dict_for(name, prefix="model.diffusion_model.", dtype=torch.bfloat16)
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    file = f"tiny_{name}.safetensors"
    save_file(sd, str(folder / file))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    loader = pack.nodes.WanBlockSwapModelLoader()
    widgets = {**WIDGETS, "blocks_to_swap": 2, "offload_txt_emb": True}
    with tiny.detection(name):
        core = comfy.sd.load_diffusion_model(str(folder / file))
        inputs = tiny.make_inputs_for(name, core.model.diffusion_model)(5)
        expected = tiny.run(comfy, core, inputs)
        comfy.model_management.unload_all_models()
        (model,) = loader.load(file, "default", **widgets)
    swap = swap_of(model)
    assert swap.plan.swapped and swap.plan.offload_txt_emb
    # the last main block is always swapped: never materialised on the CPU
    last = swap.plan.swapped[-1]
    block = model.model.diffusion_model.get_submodule(last)
    assert all(p.numel() == 0 for p in block.parameters())
    assert torch.equal(tiny.run(comfy, model, inputs), expected)
    assert torch.equal(tiny.run(comfy, model, inputs), expected)


def test_none_of_these_forwards_uses_cores_prefetch_queue(comfy):
    """Core's block prefetch queue (``comfy.model_prefetch``, dynamic VRAM) is driven by the
    forwards that call it (LTX-AV, MiniMax); these families' forwards do not, so under
    dynamic VRAM core casts their weights layer by layer as each comfy op runs, on the
    swapped model too. If core starts queueing these blocks, this test says to look again."""
    import importlib

    for dotted in {spec.dotted for spec in tiny.SPECS.values()}:
        module = importlib.import_module(dotted.rpartition(".")[0])
        assert "model_prefetch" not in inspect.getsource(module), dotted


def test_lazy_loader_reads_flux2_norm_scale_keys(comfy, pack, tmp_path):
    import folder_paths
    from safetensors.torch import save_file

    _needs("flux2")
    sd = tiny.state_dict_for("flux2", dtype=torch.bfloat16)
    sd = {
        (k[: -len("weight")] + "scale" if k.endswith("_norm.weight") else k): v
        for k, v in sd.items()
    }
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    save_file(sd, str(folder / "tiny_flux2_scale.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    core = comfy.sd.load_diffusion_model(str(folder / "tiny_flux2_scale.safetensors"))
    inputs = tiny.make_inputs_for("flux2", core.model.diffusion_model)(5)
    expected = tiny.run(comfy, core, inputs)
    comfy.model_management.unload_all_models()
    loader = pack.nodes.WanBlockSwapModelLoader()
    (model,) = loader.load("tiny_flux2_scale.safetensors", "default", **WIDGETS)
    assert torch.equal(tiny.run(comfy, model, inputs), expected)
