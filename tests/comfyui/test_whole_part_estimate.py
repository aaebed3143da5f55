"""What a chunked forward would have needed with its token-wise parts run whole: [Note: the
need without chunks] in callbacks/comfy_auto.py. A fake allocator stands in for torch's CUDA
counters (the part tells it what its real CPU tensors take): a part allocates a fixed per-call
buffer (a weight cast) and a per-token intermediate, a "rope" outside it a peak of its own."""

from typing import Any

import torch
from torch import nn

PER_TOKEN = 1000  # bytes of a part's intermediate per token (250 float32)
FIXED = 4004  # bytes a part's call allocates whatever its tokens (1001 float32: no
# multiple of a chunk's tokens)
AT_START = 10**9
SLACK = 64 * 16  # the part's own small outputs (x * 2) count as scaling too: 16 bytes a token


class FakeAllocator:
    """torch's counters as CudaMeter reads them: what is allocated now, and the peaks since
    the last reset."""

    def __init__(self) -> None:
        self.now = AT_START
        self.peak = AT_START

    def take(self, nbytes: int) -> None:
        self.now += nbytes
        self.peak = max(self.peak, self.now)

    def give(self, nbytes: int) -> None:
        self.now -= nbytes

    # the CudaMeter interface
    def allocated(self, device: Any) -> int:
        return self.now

    def reset_peak(self, device: Any) -> None:
        self.peak = self.now

    def peaks(self, device: Any) -> Any:
        from comfyui_wan_blockswap.callbacks.comfy_auto import Peaks

        return Peaks(self.peak, self.peak + 2**20)  # the pool keeps a MiB beyond


class TokenWisePart(nn.Module):
    """Works on each token on its own: a fixed buffer, then PER_TOKEN bytes a token."""

    def __init__(self, allocator: FakeAllocator) -> None:
        super().__init__()
        self.allocator = allocator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cast = torch.ones(FIXED // 4)  # no token dimension: the same whatever the chunk
        self.allocator.take(cast.nbytes)
        hidden = torch.ones(x.shape[0], x.shape[1], PER_TOKEN // 4)
        self.allocator.take(hidden.nbytes)
        self.allocator.give(hidden.nbytes)
        self.allocator.give(cast.nbytes)
        del hidden, cast
        return x * 2


def _chunked_forward(allocator, part, x, rope_peak: int, observer) -> torch.Tensor:
    from comfyui_wan_blockswap.wan_blockswap.token_chunks import TokenChunkedForward

    chunker = TokenChunkedForward(part, chunk_tokens=8)
    chunker.install()
    chunker.observer = observer
    allocator.take(rope_peak)  # a step outside the part with a peak of its own
    allocator.give(rope_peak)
    try:
        with torch.no_grad():  # chunks run only without autograd
            out = part(x)
    finally:
        chunker.remove()
    assert chunker.chunked_calls == (x.shape[1] > 8)
    return out


def _interrupted_in_a_first_chunk(part_class: type) -> Any:
    """The estimate of a chunked forward whose part (``part_class``) raised an interrupt in
    its first chunk."""
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    allocator = FakeAllocator()
    estimate = WholePartEstimate(allocator, torch.device("cpu"))
    try:
        _chunked_forward(allocator, part_class(allocator), torch.ones(1, 32, 4), 0, estimate)
    except KeyboardInterrupt:
        pass
    return estimate


def test_the_whole_need_scales_what_grows_with_the_tokens_and_keeps_earlier_peaks(pack):
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    allocator = FakeAllocator()
    part = TokenWisePart(allocator)
    x = torch.ones(1, 32, 4)  # four chunks of 8 tokens
    estimate = WholePartEstimate(allocator, torch.device("cpu"))
    # the rope's peak is above a chunk's and below the whole part's
    rope = 20 * PER_TOKEN
    out = _chunked_forward(allocator, part, x, rope, estimate)
    assert torch.equal(out, x * 2)
    # the resets inside the forward lose nothing: the rope's peak is still the forward's
    assert estimate.peaks().allocated == AT_START + rope
    assert estimate.peaks().reserved == AT_START + rope + 2**20
    whole = estimate.whole_peaks()
    # whole: one fixed buffer and every token's intermediate (not four fixed buffers)
    expected = AT_START + FIXED + 32 * PER_TOKEN
    assert expected <= whole.allocated <= expected + SLACK
    assert whole.reserved == whole.allocated + 2**20  # grown by as much


def test_a_part_below_the_forwards_peak_even_whole_adds_nothing(pack):
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    allocator = FakeAllocator()
    estimate = WholePartEstimate(allocator, torch.device("cpu"))
    x = torch.ones(2, 32, 4)  # a batch of two: 64 tokens' worth per whole call
    rope = 100 * PER_TOKEN
    _chunked_forward(allocator, TokenWisePart(allocator), x, rope, estimate)
    assert estimate.whole_peaks() == estimate.peaks()
    assert estimate.peaks().allocated == AT_START + rope


def test_a_forward_that_cut_nothing_is_its_own_whole(pack):
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    allocator = FakeAllocator()
    estimate = WholePartEstimate(allocator, torch.device("cpu"))
    x = torch.ones(1, 8, 4)  # one chunk's worth: called through
    _chunked_forward(allocator, TokenWisePart(allocator), x, 0, estimate)
    assert estimate.whole_peaks() == estimate.peaks()
    assert estimate.peaks().allocated == AT_START + FIXED + 8 * PER_TOKEN


def test_a_forward_stopped_inside_a_first_chunk_leaves_no_dispatch_mode(pack):
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    class Stops(TokenWisePart):
        def forward(self, x):
            raise KeyboardInterrupt  # an interrupt mid-chunk

    estimate = _interrupted_in_a_first_chunk(Stops)
    assert _get_current_dispatch_mode() is not None  # the mode is still entered
    estimate.abandon()  # what the adapter's finally does
    assert _get_current_dispatch_mode() is None


def test_a_swap_that_runs_whole_tells_the_whole_need_only_and_growth_grows_both(pack):
    """Once a shape was seen cut, a forward of a swap that runs its parts whole (a new batch
    size measured under that plan) raises the whole need, never the cut one; a forward out
    of memory grows both; core is answered the need of the swap in use."""
    from comfyui_wan_blockswap.callbacks import comfy_auto

    model = nn.Linear(1, 1)
    one, two = (1, 16, 8, 8), (2, 16, 8, 8)
    comfy_auto.record(model, one, 100, uncond=False, chunked=True, whole=300)
    need = comfy_auto.measured(model, one)
    assert (need.per_sample, need.whole_per_sample) == (100, 300)
    assert comfy_auto.record(model, two, 800, uncond=True, cutting=False)
    assert (need.per_sample, need.whole_per_sample) == (100, 400)
    assert need.batches == {1, 2} and need.uncond
    assert need.in_use(cutting=True) == 100 and need.in_use(cutting=False) == 400
    comfy_auto.grow_after_oom(model, two)
    assert (need.per_sample, need.whole_per_sample) == (125, 500)

    class Base:  # core's BaseModel as CalibratedMemoryRequired sees it
        diffusion_model = model

    base = Base()  # held: the answer holds it weakly
    answer = comfy_auto.CalibratedMemoryRequired(base)
    comfy_auto.note_cutting(model, True)
    assert answer(two) == 2 * 125 / comfy_auto.COND_BATCH_FACTOR
    comfy_auto.note_cutting(model, False)
    assert answer(two) == 2 * 500 / comfy_auto.COND_BATCH_FACTOR


def test_a_shape_never_cut_has_one_need_either_way(pack):
    from comfyui_wan_blockswap.callbacks import comfy_auto

    model = nn.Linear(1, 1)
    shape = (1, 16, 1, 8, 8)
    comfy_auto.record(model, shape, 100, uncond=False, cutting=False)
    need = comfy_auto.measured(model, shape)
    assert not need.chunked and need.in_use(True) == need.in_use(False) == 100
    # a forward that cut but whose whole need is not known offers no whole plan
    comfy_auto.record(model, (1, 16, 2, 8, 8), 100, uncond=False, chunked=True)
    assert comfy_auto.measured(model, (1, 16, 2, 8, 8)).whole_per_sample == 0


def test_a_compiled_forward_leaves_the_whole_need_unknown(pack, monkeypatch):
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    allocator = FakeAllocator()
    estimate = WholePartEstimate(allocator, torch.device("cpu"))
    _chunked_forward(allocator, TokenWisePart(allocator), torch.ones(1, 32, 4), 0, estimate)
    assert estimate.unwatched  # the adapter then records no whole need: parts stay cut


class FlattenedPart(TokenWisePart):
    """Core's fp8 and quantized Linears flatten the tokens of a batch into rows, multiply,
    and reshape back: the intermediate has batch x tokens rows, and the reshaped tensor is a
    view whose base's Python object dies first (a review found both missed)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        hidden = rows @ torch.ones(x.shape[-1], PER_TOKEN // 4)  # batch x tokens rows
        self.allocator.take(hidden.nbytes)
        hidden = hidden.reshape(x.shape[0], x.shape[1], -1)
        activated = torch.nn.functional.gelu(hidden)
        self.allocator.take(activated.nbytes)
        self.allocator.give(hidden.nbytes)
        self.allocator.give(activated.nbytes)
        del hidden, activated
        return x * 2


def test_flattened_rows_and_views_under_inference_mode_are_not_undercounted(pack):
    from comfyui_wan_blockswap.callbacks.comfy_auto import WholePartEstimate

    for batch in (1, 2):
        allocator = FakeAllocator()
        estimate = WholePartEstimate(allocator, torch.device("cpu"))
        x = torch.ones(batch, 32, 4)
        with torch.inference_mode():  # as ComfyUI samples
            _chunked_forward(allocator, FlattenedPart(allocator), x, 0, estimate)
        # whole: the intermediate and its activation for every token at once
        assert estimate.whole_peaks().allocated >= AT_START + batch * 32 * 2 * PER_TOKEN


def test_a_first_chunk_that_raised_inside_another_mode_leaves_only_that_mode(pack):
    from torch.utils._python_dispatch import (
        TorchDispatchMode,
        _get_current_dispatch_mode_stack,
        is_in_torch_dispatch_mode,
    )

    class Other(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    other = Other()

    class EntersAndStops(TokenWisePart):
        def forward(self, x):
            other.__enter__()  # never left: the part raises
            raise KeyboardInterrupt

    estimate = _interrupted_in_a_first_chunk(EntersAndStops)
    estimate.abandon()
    try:
        assert _get_current_dispatch_mode_stack() == [other]  # ours is gone, theirs kept
        assert is_in_torch_dispatch_mode()  # theirs still counts as a mode
    finally:
        other.__exit__(None, None, None)
    assert _get_current_dispatch_mode_stack() == []
    # torch's in-mode flag is back to what it was before ours (a review found it left on)
    assert not is_in_torch_dispatch_mode()


def test_the_count_passes_tensors_without_a_shape_through(pack):
    from comfyui_wan_blockswap.callbacks.comfy_auto import _leave, _TokenScaledBytes

    counting = _TokenScaledBytes(2)
    counting.__enter__()
    try:
        nested = torch.nested.nested_tensor([torch.ones(2, 3), torch.ones(4, 3)]) * 2
        doubled = torch.ones(1, 4, 3) * 2
    finally:
        _leave(counting)
    # a nested tensor has no shape to read (a review found the mode raising on it)
    assert nested.is_nested and torch.equal(doubled, torch.full((1, 4, 3), 2.0))
    assert counting.peak >= doubled.nbytes
