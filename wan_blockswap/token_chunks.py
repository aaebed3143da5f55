"""Running a block's token-wise parts over a few tokens at a time: a lower activation peak.

[Note: token chunks]
In a streamed plan (the least VRAM) the weights in flight are a layer or two, and a forward's
activations set the peak. With comfy-kitchen's fused rope (its triton backend; real installs
have its CUDA one), core and ours alike ran out of memory at 5.5 GiB free on an H100 (40
Wan-14B blocks, 81 frames of 832x480) asking for the 864 MiB of the feed-forward network's
intermediate (benchmarks/results/comfyui_dynamic_h100/session16_floor40_triton_rope.json): that
intermediate, and its GELU beside it, are 2.7x the hidden size each, for every token at once.
A feed-forward network works on each token on its own, so running it over slices of the tokens
gives the same numbers while its intermediate exists for one slice at a time (on the H200, a
2-block core WanModel of Wan-14B's shapes, random fp16 weights, batch 1, 32,760 tokens cut by
torch.tensor_split into 4 and 8 chunks, equalled the whole bit for bit:
benchmarks/results/activation_peaks_h200.json; and this class's cut, in the ComfyUI node on an
H100, 8 blocks, bf16, batch 1, into 4 chunks of 8,190, equalled core's output:
comfyui_dynamic_h100/session17_8blocks_token_chunks.json; a batch of two, 2 x 32,760 tokens of
Wan-14B's FFN widths in bf16, equalled the whole on an H100: tests/test_token_chunks.py, run in
comfyui_tests_h100_session18). With it ours ran at 4.0 GiB free there, where it had needed
6.0 like core (session16_floor40_token_chunks_triton_rope.json), and at 3.5 in session 17.
The layout names such parts (``BlockListLayout.token_wise``, Wan's ``ffn``), and the engine:
- chunks in every plan (``SwapConfig.chunk_tokens`` > 0): ComfyUI's auto measures a latent
  shape's need once and plans slot and streamed plans alike from it, so the forward must need
  the same in both; only without autograd (a slice-assigned output is not what training
  wants), and only a call with one ``(batch, tokens, channels)`` tensor of more tokens than a
  chunk; anything else calls through. The matrix products over 8,192 rows stay large enough to
  run at full rate;
- makes each such part one swap unit (``units.layer_units``): its layers run once per chunk,
  and a unit's hooks fetch before the part and release after it, once per call. That unit
  costs where nothing is cut: a streamed plan's window holds its largest unit, so on an H100
  at 1 frame (1,560 tokens; 8 Wan-14B blocks, 4 GiB free) the whole FFN as one unit left
  914 MB of weights resident where its two layers as units had left 1,169, and a step took
  0.0887 s instead of 0.0776 (comfyui_dynamic_h100/session17_8blocks_token_chunks.json).
  A layout without token-wise parts (``ModelLayout.without_token_wise``) cuts the units as
  before; ComfyUI's auto plans with it a latent whose measured forward cut nothing
  (``chunked_calls``) where that moves fewer bytes, and a latent that was cut where the need
  it would have whole (estimated around each cut call's first chunk: ``FirstChunkObserver``,
  [Note: the need without chunks] in ``callbacks/comfy_auto.py``) leaves a plan that moves no
  more bytes, and keeps the token-wise units once they came back (latents cut and uncut
  taking turns would repack the model every prompt); a library user whose sequences stay
  under a chunk can pass ``chunk_tokens=0``;
- puts the chunking in the part's ``forward`` as an instance attribute, which ``remove``
  takes back; a part whose ``forward`` someone else replaced already is left alone. The handle
  is recorded before the attribute is set ([Note: apply is a transaction]).
Equal outputs are measured, not promised: a matrix product of fewer rows may run another
kernel, whose rounding of the last bit can differ. The tokens are cut into chunks of nearly
equal size by torch.tensor_split's rule (32,760 into four of 8,190, as measured on the H200),
never a large chunk and a small tail, whose few rows are the likeliest to get a kernel of their own. On the CPU, BLAS
rounds differently for some row counts (an fp32 FFN cut into 5-row chunks differed by 1e-6;
16 and 24 rows matched), so the suite's equality tests use row counts that match there.
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

import torch
from torch import nn

from .errors import BlockSwapConfigError


class FirstChunkObserver(Protocol):
    """Told around the first chunk of every cut call: what a part took for one chunk tells
    what it would take whole (ComfyUI's auto weighs a latent's need with and without chunks
    by it: [Note: the need without chunks] in ``callbacks/comfy_auto.py``)."""

    def first_chunk_starts(self, tokens: int) -> None:
        """Before the part runs over the first chunk's input (``tokens`` of them)."""

    def first_chunk_ended(self, chunks: int) -> None:
        """After the first chunk's forward returned, before the output is allocated; the
        call is cut into ``chunks`` chunks of nearly equal size."""


class TokenChunkedForward:
    """A token-wise module's ``forward`` while a swap is applied: its class's forward over
    ``chunk_tokens`` tokens at a time. Holds the module weakly (the module holds this)."""

    def __init__(self, module: nn.Module, chunk_tokens: int) -> None:
        self._module = weakref.ref(module)
        self.chunk_tokens = chunk_tokens
        self.chunked_calls = 0  # calls cut into chunks: whether a latent's tokens reach this
        self.observer: FirstChunkObserver | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self._module()
        assert module is not None, "called through a collected module"
        forward = type(module).forward
        x = args[0] if len(args) == 1 and not kwargs else None
        if (
            not isinstance(x, torch.Tensor)
            or x.dim() != 3
            or x.shape[1] <= self.chunk_tokens
            or torch.is_grad_enabled()
        ):
            return forward(module, *args, **kwargs)
        self.chunked_calls += 1
        batch, tokens = x.shape[:2]
        contiguous = x.is_contiguous()
        # chunks of nearly equal size, the longer first (torch.tensor_split's rule): no tail
        count = -(-tokens // self.chunk_tokens)
        base, longer = divmod(tokens, count)
        out = None
        start = 0
        for index in range(count):
            size = base + (index < longer)
            piece = x[:, start : start + size]
            if contiguous:  # as the whole was: a strided piece (batch > 1) takes F.linear's
                piece = piece.contiguous()  # unfused bias add, which rounds twice in bf16
            observer = self.observer if index == 0 else None
            if observer is not None:  # after the slice: run whole, the part copies nothing
                observer.first_chunk_starts(size)
            part = forward(module, piece)
            if observer is not None:
                observer.first_chunk_ended(count)
            if not isinstance(part, torch.Tensor) or part.shape[:2] != piece.shape[:2]:
                raise BlockSwapConfigError(
                    f"{type(module).__name__} is named token-wise in the model layout "
                    f"(BlockListLayout.token_wise) but gave {type(part).__name__} "
                    f"{tuple(getattr(part, 'shape', ()))} for {tuple(x.shape)} input sliced "
                    f"along its tokens; take it out of token_wise, or pass chunk_tokens=0"
                )
            if out is None:
                out = part.new_empty((batch, tokens, *part.shape[2:]))
            out[:, start : start + size] = part
            start += size
            del part  # before the next slice's intermediate exists
        return out

    def install(self) -> None:
        """Become the module's ``forward``, unless someone else's forward is there already."""
        module = self._module()
        if module is not None and "forward" not in module.__dict__:
            module.forward = self  # type: ignore[method-assign]

    def remove(self) -> None:
        """Give the module its class's forward back."""
        module = self._module()
        if module is not None and module.__dict__.get("forward") is self:
            del module.forward
