"""Fixtures and helpers the architecture test files share (import the fixtures into the
test module)."""

import gc

import pytest
import torch


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
