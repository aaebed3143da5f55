"""Records name the FFNs that current core runs fused for INT8 weights ([Note: fused parts]):
in the tiny models core builds, every part whose forward calls ``comfy.ops.linear_input_act``
is named, and every name finds such a part (read from core's source, so a core that renames,
adds or unfuses them shows here)."""

import inspect

import pytest

import tiny_ltx_hv15_k5
import tiny_minimax_wan22
import tiny_models
from arch_fixtures import load_or_skip
from comfyui_wan_blockswap import model_configs
from comfyui_wan_blockswap.wan_blockswap import BlockSwapConfigError
from comfyui_wan_blockswap.wan_blockswap.units import resolve

CASES = [
    *((tiny_minimax_wan22, arch) for arch in tiny_minimax_wan22.SPECS),
    *((tiny_ltx_hv15_k5, arch) for arch in tiny_ltx_hv15_k5.SPECS),
    (None, "wan_t2v"),
    (None, "wan_vace"),
]


def _runs_fused(module) -> bool:
    """Whether ``module``'s forward is one that calls core's ``linear_input_act``."""
    try:
        return "linear_input_act" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False


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
    # every part core runs fused is named (Wan 2.2 S2V, Animate and camera once were not)
    for block_list in layout.block_lists:
        for block in resolve(model, block_list.path).children():
            fused = {name for name, m in block.named_modules() if name and _runs_fused(m)}
            assert fused <= set(block_list.fused), (block_list.path, fused)
    named = [(bl, path) for bl in layout.block_lists for path in bl.fused]
    if not named:
        return  # nothing core runs fused in this architecture (checked above)
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
    except BlockSwapConfigError:  # a part this block lacks
        return False
