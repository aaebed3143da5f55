"""Small hand-written transformers that exercise every engine feature on CPU in milliseconds:
direct block parameters (like Wan's ``modulation``), buffers, mixed dtypes, an offloadable
text embedding, and a VACE-like second block list run interleaved with the main one."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from comfyui_wan_blockswap.model_configs.base import BlockListLayout, ModelLayout


class ToyBlock(nn.Module):
    def __init__(self, dim: int, ffn: int) -> None:
        super().__init__()
        self.modulation = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
        self.register_buffer("scale", torch.full((dim,), 0.5))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        shift, gate = self.modulation
        h = self.norm(x) + shift
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        kv = torch.cat([k, context], dim=1)
        vv = torch.cat([v, context], dim=1)
        attn = torch.softmax(q @ kv.transpose(1, 2) / q.shape[-1] ** 0.5, dim=-1) @ vv
        x = x + gate * self.proj(attn)
        return x + self.scale * self.ffn(self.norm(x))


class ToyDiT(nn.Module):
    """``blocks`` (main), optional ``vace_blocks`` run after every second main block."""

    def __init__(
        self, dim: int = 32, ffn: int = 64, depth: int = 6, vace_depth: int = 0, txt_dim: int = 16
    ) -> None:
        super().__init__()
        self.text_embedding = nn.Sequential(nn.Linear(txt_dim, dim), nn.GELU(), nn.Linear(dim, dim))
        self.patch_embedding = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(ToyBlock(dim, ffn) for _ in range(depth))
        if vace_depth:
            self.vace_blocks = nn.ModuleList(ToyBlock(dim, ffn) for _ in range(vace_depth))
        self.head = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        context = self.text_embedding(context)
        x = self.patch_embedding(x)
        hint = x
        vace = getattr(self, "vace_blocks", None)
        for i, block in enumerate(self.blocks):
            x = block(x, context)
            if vace is not None and i % 2 == 1 and i // 2 < len(vace):
                hint = vace[i // 2](hint, context)
                x = x + hint
        return self.head(x)


TOY_LAYOUT = ModelLayout(
    name="toy",
    block_lists=(BlockListLayout("blocks"), BlockListLayout("vace_blocks", role="vace")),
    txt_emb=("text_embedding",),
    stream_modules=("patch_embedding", "head"),
)
TOY_LAYOUT_NO_VACE = ModelLayout(
    name="toy",
    block_lists=(BlockListLayout("blocks"),),
    txt_emb=("text_embedding",),
    stream_modules=("patch_embedding", "head"),
)


def make_toy(seed: int = 0, vace_depth: int = 0, **kwargs) -> ToyDiT:
    torch.manual_seed(seed)
    return ToyDiT(vace_depth=vace_depth, **kwargs).eval()


def toy_inputs(seed: int, device="cpu", dtype=torch.float32, dim: int = 32, tokens: int = 12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, tokens, dim, generator=gen).to(device, dtype)
    context = torch.randn(2, 5, 16, generator=gen).to(device, dtype)
    return {"x": x, "context": context}


def toy_layout(model: ToyDiT, token_wise: tuple[str, ...] = ()) -> ModelLayout:
    """The toy's layout; ``token_wise``: parts of every block run in token chunks
    ([Note: token chunks]), ``("ffn",)`` as Wan's records have it."""
    layout = TOY_LAYOUT if hasattr(model, "vace_blocks") else TOY_LAYOUT_NO_VACE
    if not token_wise:
        return layout
    lists = tuple(dataclasses.replace(b, token_wise=token_wise) for b in layout.block_lists)
    return dataclasses.replace(layout, block_lists=lists)


def streamed_budget_gb(model: ToyDiT, window: int) -> float:
    """A ``vram_budget_gb`` that streams every layer of ``model`` with ``window`` bytes."""
    from comfyui_wan_blockswap.wan_blockswap import SwapConfig, min_vram_budget_gb, plan_for

    layout = toy_layout(model)
    floor = plan_for(model, SwapConfig(vram_budget_gb=min_vram_budget_gb(model, layout)), layout)
    assert floor.window_bytes
    return (floor.resident_bytes + window) / 2**30
