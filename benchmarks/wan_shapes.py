"""The Wan-14B-shaped test model every benchmark uses (diffusers' real Wan class, 8 blocks of
dim 5120, ffn 13824, 40 heads, bf16, random weights) and its inputs."""

from __future__ import annotations

import torch
from torch import nn

WAN14B_CONFIG = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=40,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    ffn_dim=13824,
    num_layers=8,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)

# 480p latents are 60 x 104; patch 2 x 2 gives 1,560 tokens per latent frame.
TOKENS_PER_FRAME = 1560


def random_state_dict(
    num_layers: int = 8, seed: int = 0, dtype: torch.dtype = torch.bfloat16, **overrides
) -> dict[str, torch.Tensor]:
    """Weights for :func:`skeleton`, generated on the GPU when there is one, kept on the CPU."""
    from diffusers import WanTransformer3DModel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    config = {**WAN14B_CONFIG, "num_layers": num_layers, **overrides}
    with torch.device(device):
        model = WanTransformer3DModel(**config).to(dtype)
    state = {k: v.to("cpu") for k, v in model.state_dict().items()}
    del model
    return state


def skeleton(num_layers: int = 8, **overrides) -> nn.Module:
    """The model with parameters on the meta device (buffers real), ready for weights."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights(include_buffers=False):
        model = WanTransformer3DModel(**{**WAN14B_CONFIG, "num_layers": num_layers, **overrides})
    return model.eval()


def model_from(state: dict[str, torch.Tensor], num_layers: int = 8, **overrides) -> nn.Module:
    """A CPU model whose parameters share memory with ``state`` (nothing is copied)."""
    model = skeleton(num_layers, **overrides)
    model.load_state_dict(state, assign=True, strict=True)
    return model.requires_grad_(False)


def inputs(
    tokens: int, device: torch.device, dtype: torch.dtype = torch.bfloat16, seed: int = 0
) -> dict:
    """Inputs for ``tokens`` (a multiple of 1,560: whole 480p latent frames)."""
    if tokens % TOKENS_PER_FRAME:
        raise ValueError(f"tokens must be a multiple of {TOKENS_PER_FRAME}, got {tokens}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    frames = tokens // TOKENS_PER_FRAME
    return {
        "hidden_states": torch.randn(1, 16, frames, 60, 104, generator=gen).to(device, dtype),
        "timestep": torch.tensor([500], device=device),
        "encoder_hidden_states": torch.randn(1, 512, 4096, generator=gen).to(device, dtype),
        "return_dict": False,
    }
