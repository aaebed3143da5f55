"""Token-wise parts (Wan's FFN) run a few tokens at a time: bit-identical, each part one swap
unit fetched once per call, nothing left behind ([Note: token chunks])."""

from __future__ import annotations

import pytest
import torch

from comfyui_wan_blockswap.wan_blockswap import (
    BlockSwapConfigError,
    SwapConfig,
    apply_block_swap,
    min_vram_budget_gb,
)
from tiny_models import diffusers_wan_t2v, run

# The tiny model's forward has 3 x 4 x 4 = 48 tokens: at most 20 a chunk makes three chunks of
# nearly equal size, 16 each (row counts the CPU's BLAS rounds alike: [Note: token chunks])
CHUNK = 20


@pytest.fixture
def wan():
    pytest.importorskip("diffusers")
    model, make_inputs = diffusers_wan_t2v()
    return model, make_inputs(1)


def ffn_calls(model, monkeypatch) -> list[int]:
    """Token counts of every call into the FFN's class forward."""
    cls = type(model.blocks[0].ffn)
    original = cls.forward
    calls: list[int] = []

    def counting(self, hidden_states, *args, **kwargs):
        calls.append(hidden_states.shape[1])
        return original(self, hidden_states, *args, **kwargs)

    monkeypatch.setattr(cls, "forward", counting)
    return calls


@pytest.mark.parametrize("plan", ["streamed", "layer slots"])
def test_the_ffn_runs_in_chunks_bit_identical_and_is_fetched_once_per_forward(
    wan, monkeypatch, plan
):
    model, inputs = wan
    expected = run(model, inputs)
    calls = ffn_calls(model, monkeypatch)
    if plan == "streamed":
        options = dict(vram_budget_gb=min_vram_budget_gb(model))
    else:
        options = dict(blocks_to_swap=4, swap_unit="layer")
    swap = apply_block_swap(model, chunk_tokens=CHUNK, device="cpu", **options)
    assert swap.plan.kind == {"streamed": "streamed", "layer slots": "slots"}[plan]
    ffn_units = [s.unit.name for s in swap.units if s.unit.name.endswith(".ffn")]
    assert ffn_units == [f"blocks.{i}.ffn" for i in range(4)]  # one unit each, whole
    assert not any(".ffn." in s.unit.name for s in swap.units)
    copies = swap.stats.copies
    for _ in range(2):
        assert torch.equal(run(model, inputs), expected)
    assert calls == [16, 16, 16] * 4 * 2
    # each unit is fetched as often per forward as without chunks (not once per chunk): the
    # same copies beside one per unit as a plan whose FFN layers stream on their own
    model_raw, make_inputs = diffusers_wan_t2v()
    raw = apply_block_swap(model_raw, chunk_tokens=0, device="cpu", **options)
    for _ in range(2):
        run(model_raw, make_inputs(1))
    extra = raw.stats.copies - 2 * len(raw.units)  # the first forward's one more, if any
    raw.remove()
    assert swap.stats.copies - copies == 2 * len(swap.units) + extra
    swap.remove()
    assert all("forward" not in b.ffn.__dict__ for b in model.blocks)
    calls.clear()
    assert torch.equal(run(model, inputs), expected)
    assert calls == [48] * 4


@pytest.mark.parametrize("case", ["chunk_tokens=0", "autograd on", "fewer tokens than a chunk"])
def test_the_ffn_runs_whole_without_chunks_with_autograd_or_few_tokens(wan, monkeypatch, case):
    model, inputs = wan
    expected = run(model, inputs)
    options = dict(vram_budget_gb=min_vram_budget_gb(model), chunk_tokens=CHUNK)
    if case == "chunk_tokens=0":
        options["chunk_tokens"] = 0
    elif case == "fewer tokens than a chunk":
        options["chunk_tokens"] = 48
    swap = apply_block_swap(model, device="cpu", **options)
    if case == "chunk_tokens=0":  # the FFN's layers are units of their own, as before
        assert any(".ffn." in s.unit.name for s in swap.units)
        assert all("forward" not in b.ffn.__dict__ for b in model.blocks)
    calls = ffn_calls(model, monkeypatch)
    if case == "autograd on":  # weights frozen, but autograd recording
        model.requires_grad_(False)
        out = model(**inputs).sample.detach()
    else:
        out = run(model, inputs)
    assert torch.equal(out, expected)
    assert calls == [48] * 4
    swap.remove()


def test_a_part_whose_forward_was_replaced_already_is_left_alone(wan):
    model, inputs = wan
    expected = run(model, inputs)
    replaced = model.blocks[1].ffn
    replaced.forward = type(replaced).forward.__get__(replaced)  # someone else's forward
    theirs = replaced.__dict__["forward"]
    swap = apply_block_swap(
        model, vram_budget_gb=min_vram_budget_gb(model), chunk_tokens=CHUNK, device="cpu"
    )
    assert replaced.__dict__["forward"] is theirs
    assert "forward" in model.blocks[0].ffn.__dict__  # the others chunk
    assert torch.equal(run(model, inputs), expected)
    swap.remove()
    assert replaced.__dict__["forward"] is theirs
    assert "forward" not in model.blocks[0].ffn.__dict__


@pytest.mark.parametrize("value", [-1, 1.5, True, "8192"])
def test_chunk_tokens_must_be_a_count(value):
    with pytest.raises(BlockSwapConfigError, match="chunk_tokens"):
        SwapConfig(chunk_tokens=value)


def test_a_batch_of_two_in_bf16_stays_bit_identical():
    """Slices of a (2, tokens, channels) input are strided: run as they are, F.linear adds
    the bias unfused and rounds twice in bf16; the chunker hands it contiguous pieces."""

    from toy_models import make_toy, toy_inputs, toy_layout

    model = make_toy(dim=16, ffn=32, depth=3).to(torch.bfloat16).requires_grad_(False)
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(0, dim=16).items()}
    assert inputs["x"].shape[0] == 2
    expected = run(model, inputs)
    layout = toy_layout(model, token_wise=("ffn",))
    swap = apply_block_swap(model, layout=layout, blocks_to_swap=2, chunk_tokens=5, device="cpu")
    assert all("forward" in b.ffn.__dict__ for b in model.blocks)
    assert torch.equal(run(model, inputs), expected)
    swap.remove()


class _FfnBlock(torch.nn.Module):
    """A Wan-14B block's FFN as core builds it (``comfy/ldm/wan/model.py``), with a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.ffn = torch.nn.Sequential(
            torch.nn.Linear(5120, 13824),
            torch.nn.GELU(approximate="tanh"),
            torch.nn.Linear(13824, 5120),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(x)


class _FfnStack(torch.nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(_FfnBlock() for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_wan14b_widths_in_bf16_with_a_batch_of_two_stay_bit_identical_on_the_gpu(monkeypatch):
    """What the CPU tests cannot show: cuBLAS at Wan-14B's widths and 81 frames' 32,760 tokens,
    cut by the default ``chunk_tokens`` into four chunks of 8,190, in bf16, for the batch of two
    core runs when both conditionings fit in one forward."""
    from comfyui_wan_blockswap.model_configs.base import BlockListLayout, ModelLayout

    torch.manual_seed(0)
    model = _FfnStack(depth=3).to("cuda", torch.bfloat16).requires_grad_(False)
    x = torch.randn(2, 32760, 5120, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        expected = model(x)
    layout = ModelLayout(
        name="wan ffn", block_lists=(BlockListLayout("blocks", token_wise=("ffn",)),)
    )
    swap = apply_block_swap(model, layout=layout, blocks_to_swap=2, device="cuda")
    calls = ffn_calls(model, monkeypatch)
    with torch.no_grad():
        out = model(x)
    assert calls == [8190] * 4 * 3
    swap.remove()
    assert torch.equal(out, expected), (out.float() - expected.float()).abs().max().item()
