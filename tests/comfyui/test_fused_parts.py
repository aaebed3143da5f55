"""Records name the FFNs that current core runs fused for INT8 weights ([Note: fused parts]):
every name finds a part in the tiny models core builds, and that part's forward is one that
calls ``comfy.ops.linear_input_act`` (read from core's source, so a core that renames or
unfuses them shows here)."""

import inspect

import pytest

import tiny_ltx_hv15_k5
import tiny_minimax_wan22
import tiny_models
from arch_fixtures import load_or_skip
from comfyui_wan_blockswap import model_configs
from comfyui_wan_blockswap.wan_blockswap.units import resolve

CASES = [
    (tiny_minimax_wan22, "minimax_h3"),
    (tiny_ltx_hv15_k5, "ltxv"),
    (tiny_ltx_hv15_k5, "ltxav"),
    (None, "wan_t2v"),
    (None, "wan_vace"),
]


@pytest.mark.parametrize("tiny, arch", CASES, ids=[arch for _, arch in CASES])
def test_every_fused_part_is_found_and_core_runs_it_fused(comfy, tiny, arch):
    if not hasattr(comfy.ops, "linear_input_act"):
        pytest.skip("core before fused INT8 FFNs")
    if tiny is None:
        patcher, _ = tiny_models.comfy_load_tiny(arch)
    else:
        patcher, _ = load_or_skip(tiny, arch)
    model = patcher.model.diffusion_model
    layout = model_configs.detect(model).layout
    named = [(bl, path) for bl in layout.block_lists for path in bl.fused]
    assert named, layout
    for block_list, path in named:
        blocks = list(resolve(model, block_list.path).children())
        parts = [resolve(b, path) for b in blocks if _has(b, path)]
        if block_list.role == "txt_emb" and not blocks:
            continue  # a variant without this list (LTX-2.3's connectors differ)
        assert parts, (block_list.path, path)
        forward = inspect.getsource(type(parts[0]).forward)
        assert "linear_input_act" in forward, (block_list.path, path)


def _has(block, path: str) -> bool:
    try:
        resolve(block, path)
        return True
    except Exception:
        return False
