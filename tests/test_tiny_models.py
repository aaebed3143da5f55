"""Smoke tests for tests/tiny_models.py: every builder builds, runs, and is deterministic.

ComfyUI tests need COMFYUI_PATH pointing at a ComfyUI checkout (and an environment where it
imports, e.g. /work/venv-comfy); they are skipped otherwise.
"""

import os
import subprocess
import sys
from functools import reduce

import pytest
import torch

import tiny_models as tm

# Block lists (dotted path -> length) and embedder modules each tiny model must have.
DIFFUSERS_STRUCTURE = {
    "diffusers/wan_t2v": ({"blocks": 4}, {"condition_embedder.image_embedder": False}),
    "diffusers/wan_i2v": (
        {"blocks": 4},
        {"condition_embedder.image_embedder": True, "condition_embedder.text_embedder": True},
    ),
    "diffusers/wan22_ti2v": ({"blocks": 4}, {"condition_embedder.image_embedder": False}),
    "diffusers/wan_vace": ({"blocks": 4, "vace_blocks": 2}, {"vace_patch_embedding": True}),
    "diffusers/hunyuan_video": (
        {
            "transformer_blocks": 2,
            "single_transformer_blocks": 4,
            "context_embedder.token_refiner.refiner_blocks": 2,
        },
        {"context_embedder": True, "time_text_embed": True},
    ),
    "diffusers/flux": (
        {"transformer_blocks": 2, "single_transformer_blocks": 4},
        {"context_embedder": True},
    ),
    "diffusers/cosmos_predict1": ({"transformer_blocks": 3}, {"learnable_pos_embed": True}),
    "diffusers/cosmos_predict2": ({"transformer_blocks": 3}, {"learnable_pos_embed": False}),
}
COMFY_STRUCTURE = {
    "comfy/wan_t2v": ({"blocks": 4}, {"text_embedding": True, "img_emb": False}),
    "comfy/wan_i2v": ({"blocks": 4}, {"text_embedding": True, "img_emb": True}),
    "comfy/wan22_ti2v": ({"blocks": 4}, {"img_emb": False}),
    "comfy/wan_vace": ({"blocks": 4, "vace_blocks": 2}, {"vace_patch_embedding": True}),
    "comfy/hunyuan_video": (
        {"double_blocks": 2, "single_blocks": 4, "txt_in.individual_token_refiner.blocks": 2},
        {"txt_in": True, "vector_in": True},
    ),
    "comfy/flux": ({"double_blocks": 2, "single_blocks": 4}, {"txt_in": True}),
    "comfy/cosmos_predict1": ({"blocks": 3}, {"extra_pos_embedder": True}),
    "comfy/cosmos_predict2": ({"blocks": 3}, {"t_embedding_norm": True}),
}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny matmuls are dominated by OpenMP hand-off on a busy 2-core box: 1 thread is ~20x faster.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _get(model, dotted):
    return reduce(lambda m, attr: getattr(m, attr, None), dotted.split("."), model)


def _check_builder(name, structure):
    builder = tm.ARCHITECTURES[name]
    model, make_inputs = builder()
    assert isinstance(model, torch.nn.Module) and not model.training
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())

    block_lists, embedders = structure
    for path, length in block_lists.items():
        blocks = _get(model, path)
        assert isinstance(blocks, (torch.nn.ModuleList, torch.nn.ModuleDict)), path
        assert len(blocks) == length, path
    for path, present in embedders.items():
        assert (_get(model, path) is not None) == present, path

    out = tm.run(model, make_inputs(0))
    assert isinstance(out, torch.Tensor) and torch.isfinite(out).all()
    assert torch.equal(tm.run(model, make_inputs(0)), out)
    assert not torch.equal(tm.run(model, make_inputs(1)), out)

    rebuilt, _ = builder()  # same seed, same weights
    assert torch.equal(tm.run(rebuilt, make_inputs(0)), out)
    return model, make_inputs, out


@pytest.mark.parametrize("name", list(tm.DIFFUSERS_ARCHITECTURES))
def test_diffusers_builder(name):
    pytest.importorskip("diffusers")
    _check_builder(name, DIFFUSERS_STRUCTURE[name])


def test_structure_tables_cover_every_builder():
    assert set(DIFFUSERS_STRUCTURE) == set(tm.DIFFUSERS_ARCHITECTURES)
    assert set(COMFY_STRUCTURE) == set(tm.COMFY_ARCHITECTURES)
    assert set(tm.ARCHITECTURES) == set(DIFFUSERS_STRUCTURE) | set(COMFY_STRUCTURE)


def test_module_imports_without_comfy():
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    code = (
        "import sys, tiny_models as tm\n"
        "assert 'comfy' not in sys.modules, 'comfy was imported'\n"
        "try:\n"
        "    tm.import_comfy()\n"
        "except tm.ComfyUnavailable:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('import_comfy() without COMFYUI_PATH did not raise')\n"
    )
    cwd = os.path.dirname(os.path.abspath(tm.__file__))
    subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, check=True)


@pytest.mark.comfyui
@pytest.mark.parametrize("name", list(tm.COMFY_ARCHITECTURES))
def test_comfy_builder(comfy, name):
    _check_builder(name, COMFY_STRUCTURE[name])


@pytest.mark.comfyui
@pytest.mark.parametrize("name", sorted(tm._COMFY_SPECS))
def test_comfy_load_tiny(comfy, name):
    expected_cls = tm._COMFY_SPECS[name][0].rsplit(".", 1)[1]
    if name in tm.COMFY_DETECTABLE:
        prefix = "model.diffusion_model." if name == "wan_t2v" else ""
        sd = tm.comfy_state_dict_for(name, prefix=prefix)
        assert all(k.startswith(prefix) for k in sd)
        patcher, make_inputs = tm.comfy_load_tiny(name, state_dict=sd)
        loaded = patcher.model.diffusion_model.state_dict()
        assert set(loaded) == {k[len(prefix) :] for k in sd}
        assert all(torch.equal(loaded[k[len(prefix) :]], v) for k, v in sd.items())
    else:
        with pytest.raises(ValueError):
            tm.comfy_state_dict_for(name)
        patcher, make_inputs = tm.comfy_load_tiny(name)
        built, _ = tm.COMFY_ARCHITECTURES[f"comfy/{name}"]()
        expected = tm.run(built, make_inputs(0))
        assert torch.equal(tm.run(patcher.model.diffusion_model, make_inputs(0)), expected)

    assert type(patcher.model.model_config).__name__ == tm.comfy_expected_model_config(name)
    model = patcher.model.diffusion_model
    assert type(model).__name__ == expected_cls
    out = tm.run(model, make_inputs(0))
    assert torch.isfinite(out).all()
    assert torch.equal(tm.run(model, make_inputs(0)), out)
    assert not torch.equal(tm.run(model, make_inputs(1)), out)
