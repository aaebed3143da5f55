"""Flux.2 (dev 32B, Klein 4B, Klein 9B) in ComfyUI's layout.

Core builds Flux.2 with Flux's own class (``comfy.ldm.flux.model.Flux``), so Flux's record
would match it by class: its block lists are right, but its sizes are not, and Flux.2 moves
the blocks' modulation into three shared modules (``global_modulation``):
``double_stream_modulation_img`` / ``_txt`` and ``single_stream_modulation``, 1.1 GB at dev,
which Flux's record does not stream. Only Flux.2 has them, so this record requires one and
is tried before Flux's (records with required paths come first); a Flux.2 file's keys score
higher too.

Reference latents (the edit inputs, ``index`` method, ``ref_index_scale`` 10) are
concatenated to the image tokens before ``img_in``; ``index_timestep_zero`` doubles the
modulation batch and each block applies it by token ranges. Both reach the blocks as inputs.
"""

from .base import ArchConfig, BlockListLayout, ModelLayout, Variant

# bf16 bytes per block, from the real configs on the meta device (double + single):
#   dev      6,144 wide: 1.963 GB x 8 + 0.981 GB x 48 (64.5 GB in all, 1.6 GB outside blocks)
#   Klein 4B 3,072 wide: 0.491 GB x 5 + 0.245 GB x 20 (7.8 GB in all)
#   Klein 9B 4,096 wide: 0.872 GB x 8 + 0.436 GB x 24 (18.2 GB in all)
# Reserve: activations at 1024x1024 (4,096 image tokens) with two reference images of the
# same size and the 512 text tokens core pads to, batch 1 (guidance-distilled): 12,800
# tokens at 37 bytes per token and hidden channel (measured: core's Flux2 at dev's width, 32,768
# image tokens, on the H100 in benchmarks/results/architectures_h100.json; Wan reads 20), plus
# ~1 GB of CUDA context and ComfyUI headroom, rounded up; 3 GB at least, as for the other
# records.
VARIANTS = (
    Variant("flux2-dev", "Flux.2 dev", num_blocks=8, hidden_size=6144, reserve_gb=4.0),
    Variant("flux2-klein-4b", "Flux.2 Klein 4B", num_blocks=5, hidden_size=3072, reserve_gb=3.0),
    Variant("flux2-klein-9b", "Flux.2 Klein 9B", num_blocks=8, hidden_size=4096, reserve_gb=3.0),
)

COMFYUI = ArchConfig(
    name="flux2.comfyui",
    family="flux2",
    layout_kind="comfyui",
    class_names=("Flux",),
    layout=ModelLayout(
        name="flux2",
        block_lists=(
            BlockListLayout("double_blocks", key_prefix="double_blocks.{index}."),
            BlockListLayout("single_blocks", key_prefix="single_blocks.{index}."),
        ),
        txt_emb=("txt_in",),
        # every one runs through its own forward (Modulation calls its ``lin``); not img_in:
        # core reads its width between forwards (tests/comfyui/test_shapes_core_reads.py)
        stream_modules=(
            "time_in",
            "guidance_in",
            "double_stream_modulation_img",
            "double_stream_modulation_txt",
            "single_stream_modulation",
            "final_layer",
        ),
    ),
    required_paths=("double_stream_modulation_img",),
    detect_keys=(
        "double_stream_modulation_img.lin.weight",
        "double_blocks.0.img_attn.qkv.weight",
        "img_in.weight",
    ),
    hidden_param="img_attn.qkv.weight",
    variants=VARIANTS,
)

CONFIGS = (COMFYUI,)
