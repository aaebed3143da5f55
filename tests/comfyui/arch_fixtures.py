"""Fixtures and helpers the architecture test files share (import the fixtures into the
test module)."""

import gc

import pytest
import torch

from test_comfy_node import WIDGETS, lora_like, node, swap_of


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny matmuls on a busy 2-core machine: OpenMP hand-off costs more than the work
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _unload(request):
    yield
    if "comfy" in request.fixturenames:  # as test_comfy_node's fixture, for these tests
        gc.collect()
        request.getfixturevalue("comfy").model_management.unload_all_models()


def plan_options(model, record, layer_room: int | None = None) -> dict[str, dict]:
    """Node options for a block plan, a layer plan that keeps some layers of swapped blocks
    resident (``layer_room`` bytes beside the every-layer plan; default half the largest
    main block) and a streamed plan (a budget below every slot plan)."""
    from comfyui_wan_blockswap.wan_blockswap import SwapConfig, min_vram_budget_gb, plan_for
    from comfyui_wan_blockswap.wan_blockswap.engine import measure_model

    gib = 2**30
    layout = record.layout
    _, sizes = measure_model(model, layout)
    every_layer = plan_for(model, SwapConfig(swap_unit="layer"), layout).gpu_weight_bytes
    if layer_room is None:
        layer_room = max(b.nbytes for b in sizes.with_role("main")) // 2
    largest = max(n for block in sizes.blocks for n in block.layer_bytes)
    streamed = min_vram_budget_gb(model, layout) + 4 * largest / gib
    base = dict(blocks_to_swap=0, offload_txt_emb=False, offload_img_emb=False)
    return {
        "blocks": dict(blocks_to_swap=2, offload_txt_emb=True, offload_img_emb=True),
        "layers": dict(base, vram_budget_gb=round((every_layer + layer_room) / gib, 6)),
        "streamed": dict(base, vram_budget_gb=round(streamed, 6)),
    }


# -- test bodies the tiny_ltx_hv15_k5 and tiny_minimax_wan22 test files share -------------
# (``tiny`` is the family's tiny module: SPECS, has_class, load_tiny, state_dict_for, run)


def skip_without_class(tiny, arch: str) -> None:
    """Skip on a core without ``arch``'s model class or ``supported_models`` config."""
    if not tiny.has_class(arch):
        pytest.skip(f"this core has no {tiny.SPECS[arch].model_config} ({arch})")


def load_or_skip(tiny, arch: str, **kwargs):
    """``tiny.load_tiny(arch, **kwargs)``, skipped on a core without its class."""
    skip_without_class(tiny, arch)
    return tiny.load_tiny(arch, **kwargs)


def check_detected_record(patcher, spec, empty_ok: tuple[str, ...] = ()):
    """Core picked ``spec``'s model config, our record matches the model and its keys, and
    every block's checkpoint keys sit under the record's prefix (block lists in
    ``empty_ok`` may hold none). Returns ``(model, record, keys)``."""
    from comfyui_wan_blockswap import model_configs

    assert type(patcher.model.model_config).__name__ == spec.model_config
    model = patcher.model.diffusion_model
    record = model_configs.detect(model)
    assert record.name == spec.record
    keys = set(model.state_dict())
    assert model_configs.detect_from_keys(keys).name == spec.record  # the lazy loader's way
    for block_list in record.layout.block_lists:
        blocks = dict(model.get_submodule(block_list.path).named_children())
        assert blocks or block_list.path in empty_ok, block_list.path
        for key, block in blocks.items():
            prefix = block_list.block_key_prefix(key)
            assert {prefix + name for name in block.state_dict()} <= keys
    return model, record, keys


def core_outputs_with_a_lora(comfy, tiny, patcher, inputs: dict, lora_keys):
    """Core's output without and with a LoRA-style patch on ``lora_keys`` (which the model
    must have), and that the patch changes it. Returns ``(patch keys, plain, with LoRA)``."""
    state = patcher.model.state_dict()
    keys = [f"diffusion_model.{key}" for key in lora_keys]
    assert all(key in state for key in keys)
    plain = tiny.run(comfy, patcher, inputs)
    comfy.model_management.unload_all_models()
    expected = tiny.run(comfy, lora_like(patcher, keys), inputs)
    comfy.model_management.unload_all_models()
    assert not torch.equal(plain, expected)
    return keys, plain, expected


def check_lora_after_the_node(comfy, tiny, patcher, blocks: dict, keys, inputs, plain, expected):
    """A LoRA loaded after the node's block plan ``blocks`` equals core's with it, the node
    alone equals core's plain output, and core's own model stays untouched."""
    lora = lora_like(node(patcher, **blocks), keys)
    assert torch.equal(tiny.run(comfy, lora, inputs), expected)
    comfy.model_management.unload_all_models()
    assert torch.equal(tiny.run(comfy, node(patcher, **blocks), inputs), plain)
    comfy.model_management.unload_all_models()
    assert torch.equal(tiny.run(comfy, patcher, inputs), plain)  # core's own, untouched


def forced_prefetch_runs(comfy, monkeypatch, tiny, swapped, inputs: dict, expected) -> list:
    """Two runs of ``swapped`` with core's block prefetch queue forced on (without its GPU
    checks), each equal to ``expected``; returns the queues core made."""
    import comfy.model_prefetch as prefetch

    made = []

    def forced(queue, device, transformer_options):  # core's queue without its GPU checks
        queue = [None] + queue + [None]
        prefetch.PREFETCH_QUEUES.append(queue)
        made.append(queue)
        return queue

    monkeypatch.setattr(prefetch, "make_prefetch_queue", forced)
    for _ in range(2):
        assert torch.equal(tiny.run(comfy, swapped, inputs), expected)
        prefetch.cleanup_prefetch_queues()  # as execution.py does after each node
    return made


def check_lazy_loader_equals_core(comfy, pack, tmp_path, tiny, arch: str, metadata=None):
    """A tiny file of ``arch`` loaded by core and by the node's lazy loader with blocks
    swapped: the swapped blocks are never materialised on the CPU and the outputs equal."""
    import folder_paths
    from safetensors.torch import save_file

    skip_without_class(tiny, arch)
    name = f"tiny_{arch}.safetensors"
    folder = tmp_path / "diffusion_models"
    folder.mkdir()
    sd = tiny.state_dict_for(arch, prefix="model.diffusion_model.")
    save_file(sd, str(folder / name), metadata=metadata)
    folder_paths.add_model_folder_path("diffusion_models", str(folder))
    core = comfy.sd.load_diffusion_model(str(folder / name))
    inputs = tiny.make_inputs_for(arch, core.model.diffusion_model)(5)
    expected = tiny.run(comfy, core, inputs)
    comfy.model_management.unload_all_models()
    widgets = {**WIDGETS, "blocks_to_swap": 2, "offload_txt_emb": True, "offload_img_emb": True}
    (model,) = pack.nodes.WanBlockSwapModelLoader().load(name, "default", **widgets)
    swap = swap_of(model)
    assert swap.units and all(
        t.numel() == 0 for unit in swap.units for t in unit.unit.module.parameters()
    )  # swapped: never materialised on the CPU
    for _ in range(2):
        assert torch.equal(tiny.run(comfy, model, inputs), expected)
