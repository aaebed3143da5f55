"""Whether a plan's copies would hide behind a latent's compute: preset "auto" may then run
token-wise parts whole though that moves more bytes.

[Note: copies hidden behind compute]
Token chunks ([Note: token chunks] in wan_blockswap/token_chunks.py) cost time: 0.67% of an
81-frame forward outside the server, and in the server on an H100 (8 Wan-14B blocks, 7 GiB
free) the node ran at 1.018x core's s/it with them and 0.998x without
(benchmarks/results/comfyui_dynamic_h100/session20_81f_7gib_no_chunks.json). Auto runs them
whole where the plan the whole need leaves moves no more bytes ([Note: the need without
chunks] in ``comfy_auto``). With a fused rope the FFN's intermediate sets the peak, so the
whole need is larger, fewer weights stay resident, and the chunks stay: the real 14B (40
blocks) at 81 frames with 7 GiB free ran equal to core and no faster (session 27,
``benchmark_run17``). Yet there a forward took 3963 ms and its raw copies 528 ms: the larger
plan's extra bytes would most likely hide behind compute as the others do. With fixed slots a
swapped block's copy runs beside the compute of the blocks before it, at least one block's
with two slots or more; where a DiT's blocks are alike, copies that take at most HIDDEN_SHARE
of the forward leave each block's copy (every block swapped, the worst case) about that share
of a block's compute. So, where both plans are two fixed slots or more at the same forwards
per step, the whole plan also wins when its copies, at the link rate
``transfer_compression="auto"`` timed (the engine's ``BlockSwap.copy_rate``, the fastest
seen), take at most HIDDEN_SHARE of a forward's wall time for that latent shape (the least per
sample seen, under whatever plan ran it, counted for the latent's batch alone as if core ran
the two conditionings apart; compute taken as linear in the batch). A forward that waited on
its copies reads about as long as they take, so the rule seldom holds where copies are
exposed; a latent not timed yet, or a swap whose copies were never timed (transfer compression
off), keeps the old rule. Once a latent ran whole and its cut units came back, they stay
(``keeps_token_wise``: a latent near the share could otherwise repack the model twice).
Measured on an H100 in session 28 (``benchmark_run18``): 0.986-0.987x core's prompt time once
settled against the default's 0.993-0.995x, but its switch repacks the model (40-46 s for the
first timed prompt), so it stays off unless RUN_WHOLE_WHERE_COPIES_HIDE is set (the
benchmark's ``ours_whole_hidden`` arm sets it).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

# Off: measured slightly faster once settled, but its repack costs more (see the note)
RUN_WHOLE_WHERE_COPIES_HIDE = False
# The share of a forward's time that a plan's copies may take and still count as hidden
HIDDEN_SHARE = 0.5
PENDING_CLOCKS = 8  # forwards of one shape whose times are not read yet, at most


class ForwardClock(Protocol):
    """Reads a forward's stopped clock without synchronising (``comfy_auto.CudaMeter``)."""

    def clock_ms(self, token: Any) -> float | None:
        """The stopped clock's milliseconds, None while its forward still runs."""


@dataclass
class _ShapeTimes:
    ms_per_sample: float = 0.0  # the least seen; 0: none read yet
    pending: list = field(default_factory=list)  # (stopped clock, samples) not read yet


# diffusion model -> latent shape without its batch -> its forwards' times
_times: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, _ShapeTimes]]" = (
    weakref.WeakKeyDictionary()
)
# diffusion model -> the fastest link rate its swaps' timed copies ran at, bytes per ms
_rates: "weakref.WeakKeyDictionary[torch.nn.Module, float]" = weakref.WeakKeyDictionary()


def note_forward(
    diffusion_model: torch.nn.Module, shape_key: tuple, samples: int, clock: Any
) -> None:
    """A forward of ``samples`` samples of ``shape_key`` ran, timed by the stopped ``clock``."""
    times = _times.setdefault(diffusion_model, {}).setdefault(shape_key, _ShapeTimes())
    if len(times.pending) < PENDING_CLOCKS:
        times.pending.append((clock, max(1, samples)))


def note_copy_rate(diffusion_model: torch.nn.Module, bytes_per_ms: float) -> None:
    """The swap's timed copies ran at ``bytes_per_ms`` (0: none timed)."""
    if bytes_per_ms > _rates.get(diffusion_model, 0.0):
        _rates[diffusion_model] = bytes_per_ms


def ms_per_sample(diffusion_model: torch.nn.Module, shape_key: tuple, clock: ForwardClock) -> float:
    """The least time per sample a forward of ``shape_key`` took (0: none read yet)."""
    times = _times.get(diffusion_model, {}).get(shape_key)
    if times is None:
        return 0.0
    waiting = []
    for token, samples in times.pending:
        ms = clock.clock_ms(token)
        if ms is None:
            waiting.append((token, samples))
        elif ms > 0 and (not times.ms_per_sample or ms / samples < times.ms_per_sample):
            times.ms_per_sample = ms / samples
    times.pending = waiting
    return times.ms_per_sample


def copies_hide(
    diffusion_model: torch.nn.Module,
    shape_key: tuple,
    samples_per_forward: int,
    moved_per_forward: int,
    clock: ForwardClock,
) -> bool:
    """Whether ``moved_per_forward`` bytes of copies take at most HIDDEN_SHARE of a forward
    of ``samples_per_forward`` samples of ``shape_key`` ([Note: copies hidden behind
    compute]); False where the forward or the link was never timed."""
    if not RUN_WHOLE_WHERE_COPIES_HIDE:
        return False
    rate = _rates.get(diffusion_model, 0.0)
    per_sample = ms_per_sample(diffusion_model, shape_key, clock)
    if rate <= 0 or per_sample <= 0:
        return False
    return moved_per_forward / rate <= HIDDEN_SHARE * per_sample * samples_per_forward
