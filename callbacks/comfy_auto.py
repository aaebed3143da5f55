"""What preset "auto" knows of a forward's VRAM beside the weights, and how it tells core.

[Note: auto plans]
Preset "auto" plans when core is about to load the model for a sampling run: only then is
the latent known. The weights get the free VRAM (with dynamic VRAM, what aimdo can give back
too), plus what loaded models hold (core unloads them for ours), minus a reserve for the
forward. Core decides three things from its own estimate of that reserve
(``BaseModel.memory_required``), and a plan that ignores them is undone by core:
- at load, ``load_models_gpu`` frees (partially unloading the other loaded models: the text
  encoder, the VAE, the other Wan 2.2 A14B expert) until the estimate for both conditionings
  in one batch, plus its reserve, is free;
- then it loads a model only as far as the estimate for one batch plus its extra reserve,
  and at least ``minimum_inference_memory()`` (0.8 GiB plus that reserve), stays free: below
  that current core shrinks a loaded model into its slow per-use casting from RAM (on the
  H200 it shrank ours by 0.6 GiB at every cfg-5 prompt of a 1-frame run: benchmarks/results/
  comfyui_dynamic_h200/run7_server.log; core 0.3.64 does not shrink);
- while sampling, it runs the conditional and unconditional passes as one batch only when
  1.5 times the estimate for that batch is free (``comfy/samplers.py``): otherwise every step
  runs two forwards, and a plan that streams weights moves them twice.
Core's estimate is generic (on Wan about twice what a forward allocates), so once a forward of
a latent shape has run, the private model's ``memory_required`` answers from what it really
took instead (:class:`CalibratedMemoryRequired`). The need is, per sample of the batch, the
larger of the allocated peak above what was allocated before it times MEASURED_MARGIN and the
allocator's reserved peak above the same (VRAM it held beyond live tensors, which on the H200
at 81 frames was 0.9 GiB more: planning from 1.1x the allocated peak alone ran out of memory),
less our own weights in flight. The margin covers what the metered forward cannot show: it runs
over an empty pool, and later forwards share the pool with the resident weights. Core's server
allocates through ``backend:cudaMallocAsync`` (``cuda_malloc.py``), whose pool a forward's
large activations fragment: on the H100 at 81 frames (8 Wan-14B blocks, 7 GiB free) a forward
measured at 3.28 GiB allocated and 3.74 GiB reserved ran out of memory with 4.11 GiB (1.25x)
kept for it, and ran with 5.05 GiB (about 1.54x) kept, as fast as core
(comfyui_dynamic_h100.json, session 16). The allocator's cache is emptied before that forward:
cached blocks that earlier work (the text encoder, the last prompt's decode) left in the pool count
in the reserved peak but are no need of the forward. Read over a pool holding them, a 1-frame
Wan forward's 0.31 GiB looked like 0.61 GiB (H100, comfyui_dynamic_h100/run1_server.log), and
core's batching rule doubled the error. So each latent shape is measured once per batch size,
on the first forward, and later forwards of it run unmetered (but see [Note: a forward out of
memory]). Core is answered that need over COND_BATCH_FACTOR: its batching rule then asks for
exactly the need to be free, and the need has its margin already. Answered whole, the two
margins stacked: on the H100 at 1 frame (8 Wan-14B blocks, 4 GiB free) a batch of both
conditionings that allocated about 0.8 GiB had 1.73 GiB kept for it, room that could have held
weights (comfyui_dynamic_h100.json, session 18). Core's load rules and cond batching count that
figure on the private model only: core's own model keeps core's estimate.
The reserve is then what the forward needs and core's rules need left free (:func:`reserves`):
- for one conditioning per forward, the need plus core's extra reserve, or core's least
  inference memory where that is more (its shrink rule: below it core unloads part of ours);
- for one batch of both conditionings, where a run of this shape had an unconditional pass
  (cfg > 1), the batch's need, or what core's shrink rule asks (one conditioning's figure plus the
  extra reserve, at least that least inference memory) where that is more. Beside the batch's
  need every plan keeps BATCH_ROOM_UP_FRONT (absorbed where core's floor is more), while
  core is still told the need alone: should less than the need be free when a step runs,
  core's batching rule, which reads the free VRAM then, runs the conditionings as two forwards,
  each with the room of two, and each moving the streamed weights. On an H100 at 81 frames
  (40 Wan-14B blocks, 10-12 GiB free) plans that kept the batch's need alone found about 40, 70
  and 80 MiB less free at the step (sessions 24 and 28), and the split and the re-plan after it
  cost a prompt 20.5 s against 16.1; 128 MiB, at most a few ms of copies a step at 1 frame
  and none that show at 81, would have kept all three batched; in session 29 (H100, 81
  frames, 12 GiB free) the second timed prompt no longer split (0.995x core's prompt time
  against session 28's 1.26x).
  The adapter logs a split once per plan, and where less than the batch's need was free then,
  later plans of the latent keep beside the need what was taken of the VRAM the plan had left
  (its reserve, what its whole units did not fill, a streamed plan's window) when the step
  read, plus BATCH_SHORTFALL_SLACK (``note_batch_shortfall``; what was taken includes the
  room, so it is counted once), or BATCH_ROOM_UP_FRONT where that is more. That cannot grow
  without end: where the batch's reserve leaves a plan that moves more than two forwards of
  one conditioning each, the adapter plans for those, and keeps no room for a batch. On an
  H100 at 1 frame with 4 GiB free, where the floor left 0.09 GiB above the batch's need, ours'
  16-step prompts spread from 1.30 to 2.19 s, as if some steps ran that way
  (comfyui_dynamic_h100.json, session 21). The margin's evidence is from
  single forwards (above); a batch above core's floor has not run on a GPU with this reserve. In
  session 22's two runs of that plan no step ran apart, and ours ran at 0.78x and 0.83x core's
  time.
The adapter picks the plan that moves fewest bytes per step. Before any forward of a shape
ran, the reserve is core's own estimate for one batch.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    _pop_mode,
    _push_mode,
)
from torch.utils._pytree import tree_leaves

import comfy.model_management
import comfy.sampler_helpers

from ..wan_blockswap import ModelLayout, SwapConfig

GIB = 2**30
MEASURED_MARGIN = 1.6  # on the allocated peak; see [Note: auto plans]
OOM_GROWTH = 1.25  # a shape's need after one of its forwards ran out of memory; see below
# core runs conditionings as one batch when this times its estimate is free (comfy/samplers.py)
COND_BATCH_FACTOR = 1.5
# kept beside what a step was seen to read less than the plan left (core's rule is strict)
BATCH_SHORTFALL_SLACK = 64 * 2**20
# kept free beside a batch's need by every plan, not asked of core: see [Note: auto plans]
BATCH_ROOM_UP_FRONT = 128 * 2**20


@dataclass
class ShapeNeed:
    """What forwards of one latent shape (without its batch) needed beside the weights."""

    per_sample: int = 0  # bytes, for each sample of a forward's batch (the largest seen)
    uncond: bool = False  # a forward of this shape ran an unconditional pass (cfg > 1)
    batches: set[int] = field(default_factory=set)  # batch sizes measured
    grown: bool = False  # grown after running out of memory since the last plan
    chunked: bool = False  # a measured forward ran token-wise parts in chunks
    # per sample had every token-wise part run whole (0: not known): [Note: the need without
    # chunks]
    whole_per_sample: int = 0
    # kept free beside the need of both conditionings in one batch: what was taken of a plan's
    # free VRAM where core ran them apart, plus BATCH_SHORTFALL_SLACK (the largest seen)
    batch_shortfall: int = 0

    def in_use(self, cutting: bool) -> int:
        """Bytes per sample for a swap that cuts token-wise parts into chunks (``cutting``)
        or runs them whole."""
        return self.per_sample if cutting else max(self.per_sample, self.whole_per_sample)


# diffusion model -> latent shape without the batch -> what its forwards needed
_needs: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, ShapeNeed]]" = (
    weakref.WeakKeyDictionary()
)
# diffusion model -> whether the swap applied to it cuts token-wise parts into chunks
_cutting: "weakref.WeakKeyDictionary[torch.nn.Module, bool]" = weakref.WeakKeyDictionary()


def note_cutting(diffusion_model: torch.nn.Module, cutting: bool) -> None:
    """A swap was applied to ``diffusion_model`` that cuts token-wise parts or not: which of
    a shape's needs answers core from now on."""
    _cutting[diffusion_model] = cutting


def is_cutting(diffusion_model: torch.nn.Module) -> bool:
    return _cutting.get(diffusion_model, True)


def shape_key(shape: Any) -> tuple:
    """A latent's shape without its batch: conditionings batch differently per run."""
    return tuple(int(n) for n in shape[1:])


def measured(diffusion_model: torch.nn.Module, shape: Any) -> ShapeNeed | None:
    """What forwards of ``shape`` needed, if one ran."""
    return _needs.get(diffusion_model, {}).get(shape_key(shape))


def is_measured(diffusion_model: torch.nn.Module, shape: Any) -> bool:
    """Whether a forward of ``shape``, batch included, was measured already."""
    need = measured(diffusion_model, shape)
    return need is not None and int(shape[0]) in need.batches


def planning_layout(
    diffusion_model: torch.nn.Module, shape: Any, layout: ModelLayout, options: SwapConfig
) -> ModelLayout:
    """The layout to plan ``shape`` with: the architecture's ``layout`` until a forward of
    it was measured, then without token-wise parts if that forward cut none into chunks (or
    if ``options`` cut none). A part that runs whole needs no unit of its own, and its layers
    as units of their own leave more of the budget to resident weights ([Note: token
    chunks])."""
    need = measured(diffusion_model, shape)
    if options.chunk_tokens and (need is None or need.chunked):
        return layout
    return layout.without_token_wise()


def note_batch_shortfall(diffusion_model: torch.nn.Module, shape: Any, taken: float) -> int:
    """Core ran a step of ``shape`` as two forwards for want of free VRAM, where ``taken``
    bytes of what the plan had left free were in use: later plans keep that much and
    BATCH_SHORTFALL_SLACK beside the batch's need ([Note: auto plans]). What they keep beside
    it (0 for a shape not measured)."""
    entry = measured(diffusion_model, shape)
    if entry is None:
        return 0
    entry.batch_shortfall = max(entry.batch_shortfall, int(taken) + BATCH_SHORTFALL_SLACK)
    return entry.batch_shortfall


def note_uncond(diffusion_model: torch.nn.Module, shape: Any) -> None:
    """A forward of ``shape`` ran an unconditional pass (measured or not)."""
    _needs.setdefault(diffusion_model, {}).setdefault(shape_key(shape), ShapeNeed()).uncond = True


def record(
    diffusion_model: torch.nn.Module,
    shape: Any,
    need: int,
    uncond: bool,
    chunked: bool = False,
    whole: int | None = None,
    cutting: bool = True,
) -> bool:
    """Keep one forward's ``need`` (bytes beside the weights, for its whole batch) for its
    latent shape, whether it ran token-wise parts in chunks, and its need had they run
    ``whole`` (unknown when not given for a forward that cut; ``need`` for one that did
    not). A forward of a swap that does not cut (``cutting``) tells the whole need only, once
    the shape was seen cut. True when that shape's need per sample grew."""
    entry = _needs.setdefault(diffusion_model, {}).setdefault(shape_key(shape), ShapeNeed())
    entry.uncond = entry.uncond or uncond
    entry.chunked = entry.chunked or chunked
    entry.batches.add(int(shape[0]))
    samples = max(1, int(shape[0]))
    per_sample = -(-need // samples)
    if whole is None and not chunked:
        whole = need
    whole_per_sample = 0 if whole is None else -(-max(need, whole) // samples)
    grew = whole_per_sample > entry.whole_per_sample
    entry.whole_per_sample = max(entry.whole_per_sample, whole_per_sample)
    if (cutting or not entry.chunked) and per_sample > entry.per_sample:
        entry.per_sample = per_sample
        grew = True
    return grew


# [Note: a forward out of memory]
# A forward's reserved peak depends on how the allocator's cached segments were cut before it,
# and the one metered forward cannot bound every later one. On an H100 (8 Wan-14B blocks, 81
# frames, 7 GiB free, comfyui_dynamic_h100.json) a shape measured at 3.72 GiB ran its later
# forwards in 4.11 GiB until one stopped with 3.68 GiB allocated, asking for 864 MiB more, and
# 2 GiB held in split cached pieces. Two things keep that from ending a prompt:
# - a re-plan empties the cache before the weights load (``comfy_adapter._fit``), so resident
#   blocks and slots get segments of their own instead of pieces of cached activation
#   segments, which they would otherwise keep cut for as long as the model stays loaded;
# - an unmetered forward that runs out of memory runs once more over an emptied cache (its
#   activations are all freed by then, so every segment it cut goes back), and the shape's
#   need grows by OOM_GROWTH for the next plan. That second run is not metered: with resident
#   weights loaded, the reserved peak counts their segments too (a metered retry on the H100
#   read about 1.6x the first need and streamed every layer from then on). A metered forward
#   that runs out of memory already ran over an emptied cache: its error goes to core as it
#   is, and so does a second failure.
# The need grows once per plan: retries in one sampling run all ran on the plan the growth is
# for. Not transparent to every wrapper: a stateful one inside ours (core's EasyCache updates
# its change rate before calling on) sees the step twice, so that step may come out as a run
# without the failure would not. The grown need also answers core's cond batching at once.
# On the H100 run above, a first form of the retry (metered) fired once in each of ours' arms
# (in its third prompt) and every prompt finished; the final form is tested on the CPU.


def is_vram_oom(error: BaseException) -> bool:
    """Whether ``error`` is CUDA running out of memory: torch's own error, or the engine's
    ``InsufficientMemoryError`` raised from it (a streamed layer's buffer, slots taken at a
    forward). Core's other OOM kinds (an AcceleratorError with code 2) are left to core."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error.__cause__, torch.cuda.OutOfMemoryError)


def grow_after_oom(diffusion_model: torch.nn.Module, shape: Any) -> None:
    """A forward of ``shape`` ran out of memory: plan more for it from now on; once per
    plan, since the plan (what the growth is for) changes only at the next one."""
    entry = measured(diffusion_model, shape)
    if entry is not None and not entry.grown:
        entry.per_sample = int(entry.per_sample * OOM_GROWTH)
        entry.whole_per_sample = int(entry.whole_per_sample * OOM_GROWTH)
        entry.grown = True


def new_plan(diffusion_model: torch.nn.Module) -> None:
    """A plan is being made for ``diffusion_model``: its shapes may grow once more."""
    for entry in _needs.get(diffusion_model, {}).values():
        entry.grown = False


def forward_need(before: int, allocated_peak: int, reserved_peak: int, ours: int) -> int:
    """A forward's need beside the weights from torch's counters: see [Note: auto plans]."""
    allocated = allocated_peak - before - ours
    reserved = reserved_peak - before - ours
    return max(0, int(allocated * MEASURED_MARGIN), reserved)


class Peaks(NamedTuple):
    allocated: int
    reserved: int


class CudaMeter:
    """torch's CUDA allocation counters (host bookkeeping: reading them never syncs)."""

    def applies(self, device: torch.device) -> bool:
        return device.type == "cuda"

    def allocated(self, device: torch.device) -> int:
        return torch.cuda.memory_allocated(device)

    def reset_peak(self, device: torch.device) -> None:
        torch.cuda.reset_peak_memory_stats(device)

    def release_cached(self, device: torch.device) -> None:
        """Hand the allocator's unused cached blocks back, so the reserved peak that follows
        counts only what the next forward holds (synchronises: once per measured shape)."""
        with torch.cuda.device(device):
            torch.cuda.empty_cache()

    def peaks(self, device: torch.device) -> Peaks:
        return Peaks(
            torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
        )

    def start_clock(self, device: torch.device) -> Any:
        """Events on the device's current stream: never synchronises ([Note: copies hidden
        behind compute] in ``copy_headroom``)."""
        start = torch.cuda.Event(enable_timing=True)
        start.record(torch.cuda.current_stream(device))
        return start, device

    def stop_clock(self, token: Any) -> Any:
        start, device = token
        end = torch.cuda.Event(enable_timing=True)
        end.record(torch.cuda.current_stream(device))
        return start, end

    def clock_ms(self, token: Any) -> float | None:
        start, end = token
        return start.elapsed_time(end) if end.query() else None

    def describe(self, device: torch.device, peaks: Peaks) -> str:
        free, _ = torch.cuda.mem_get_info(device)
        allocated, reserved = peaks
        return (
            f"allocated peak {allocated / GIB:.2f} GiB, reserved peak {reserved / GIB:.2f} GiB, "
            f"free now {free / GIB:.2f} GiB"
        )


# [Note: the need without chunks]
# Token chunks ([Note: token chunks] in wan_blockswap/token_chunks.py) lower a forward's peak
# only where a token-wise part's intermediate sets it, and they cost time. With core's Python
# rope (comfy-kitchen without its CUDA backend) the rope's temporaries set it: on an H100 (8
# Wan-14B blocks, 81 frames, 7 GiB free) a forward with chunks needed 4.78 GiB and one without
# 4.77, and the default node at 1.018x core's s/it ran at 0.998x with chunks off
# (benchmarks/results/comfyui_dynamic_h100/session20_81f_7gib_no_chunks.json; outside the
# server chunks cost 0.67% of a forward alone and 1.5% on top of streaming:
# streamed_overhead_h100.json). With a fused rope the FFN's intermediate sets it and chunks
# bought 2 GiB (40 blocks, 81 frames: session16_floor40_token_chunks_triton_rope.json).
# So the metered forward also estimates what it would have needed with every token-wise part
# run whole, from the first chunk of each cut call (:class:`WholePartEstimate`):
# - torch's allocated peak over that chunk, above what was allocated when the call began (its
#   peak counters are reset there; the peaks before are kept and added back), is the chunk's
#   transient: what scales with the tokens, and what each call allocates whatever its size (a
#   weight cast per call, say);
# - the bytes of the tensors the chunk creates with a dimension that is a multiple of its
#   token count (a TorchDispatchMode adds up every new storage an op returns; a flattened
#   batch of tokens counts too, views and in-place results do not; an op's own temporaries
#   are not seen: under inference mode a Linear is one op) bound the part that scales: run
#   whole, it is that many times the chunks larger. Frees are not followed, so the sum is at least what
#   lives at once: a review found that following them through the tensors' Python objects
#   missed a flattened fp8 Linear's rows and a view's base under inference mode, and read a
#   whole need up to 35% low, where the plan could then run out of memory.
# A first form scaled the whole transient by the chunks, and on that H100 read 5.61 GiB where
# the forward without chunks needed 4.77 (arithmetic on those figures puts about 0.13 GiB in
# each chunk's transient that does not scale: one FFN weight's size in bf16), so auto kept
# the chunks. The forward's whole peak is now the larger of its measured peak and the largest
# call's ``at call + transient + (chunks - 1) x token-scaled bytes`` (those capped at the
# transient), an upper bound where every scaling tensor passes the dispatcher; the reserved
# peak grows by as much. This form is tested on the CPU only: no GPU run has measured it yet.
# Planning weighs the plans the two needs leave (``comfy_adapter._runs_whole``): whole where
# that moves fewer bytes per step, or as many through a window no smaller or one that holds
# two of its largest units. A compiled forward is not watched (its whole need stays unknown,
# and its parts stay cut), and tensor subclasses' bytes are not counted as scaling.


def _storage_of(tensor: Any) -> tuple[int | None, int]:
    """A plain tensor's storage address and size; (None, 0) for anything else (a wrapper
    subclass such as comfy-kitchen's quantized tensors has no storage of its own to count)."""
    if type(tensor) is not torch.Tensor and type(tensor) is not torch.nn.Parameter:
        return None, 0
    try:
        storage = tensor.untyped_storage()
        return storage.data_ptr(), storage.nbytes()
    except (RuntimeError, NotImplementedError):
        return None, 0


class _TokenScaledBytes(TorchDispatchMode):
    """Adds up the bytes of every new tensor with a dimension that is a multiple of
    ``tokens`` (a flattened batch of them too); outputs that alias an input (views, in-place
    results) are not new. Frees are not followed: the sum bounds what lives at once from
    above (a tensor's Python object may die while a view keeps its storage)."""

    def __init__(self, tokens: int) -> None:
        super().__init__()
        self.tokens = tokens
        self.peak = 0  # bytes allocated so far: at least the most alive at once

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        out = func(*args, **(kwargs or {}))
        seen = {_storage_of(t)[0] for t in tree_leaves((args, kwargs))}
        for tensor in tree_leaves(out):
            if not isinstance(tensor, torch.Tensor) or tensor.is_nested:  # no shape to read
                continue
            if not self._scales(tensor.shape):
                continue
            key, nbytes = _storage_of(tensor)
            if key is None or key in seen:
                continue
            seen.add(key)
            self.peak += nbytes
        return out

    def _scales(self, shape: Any) -> bool:
        return any(n and n % self.tokens == 0 for n in shape)


# TorchDispatchMode's stacks of the in-mode flags it saved on entering (as torch names them;
# older releases have fewer)
_SAVED_MODE_FLAGS = (
    "old_dispatch_mode_flags",
    "old_non_infra_dispatch_mode_flags",
    "old_without_ignore_compile_internals_dispatch_mode_flags",
)


def _leave(mode: TorchDispatchMode) -> None:
    """Take ``mode`` off torch's dispatch mode stack, wherever it is: a part that raised may
    have left modes of its own above it, which go back on after."""
    stack = _get_current_dispatch_mode_stack()
    if mode not in stack:
        return
    if stack[-1] is mode:
        mode.__exit__(None, None, None)  # restores torch's in-mode flags too
        return
    above = [_pop_mode() for _ in range(len(stack) - 1 - stack.index(mode))]
    _pop_mode()  # ours, without its __exit__: the flags stay those of the modes above, ...
    for other in reversed(above):
        _push_mode(other)
    # ... and the one just above ours restores, when it exits, what ours found on entering
    for flags in _SAVED_MODE_FLAGS:
        saved, theirs = getattr(mode, flags, None), getattr(above[-1], flags, None)
        if saved and theirs:
            theirs[-1] = saved[-1]


class WholePartEstimate:
    """Watches the first chunk of every cut call in one metered forward (a
    ``FirstChunkObserver``): see [Note: the need without chunks]."""

    def __init__(self, meter: "CudaMeter", device: torch.device) -> None:
        self.meter, self.device = meter, device
        self.whole_allocated_peak = 0  # the allocated peak with every cut part run whole
        self._earlier = Peaks(0, 0)  # the forward's peaks before the last reset
        self._at_call = 0
        self._counting: _TokenScaledBytes | None = None
        self.unwatched = False  # a first chunk ran unwatched: the whole need is not known

    def first_chunk_starts(self, tokens: int) -> None:
        if torch.compiler.is_compiling():  # a compiled forward is not metered per chunk
            self.unwatched = True
            return
        if self._counting is not None:  # a first chunk that raised inside the forward
            self.abandon()
            self.unwatched = True
        self._earlier = self.peaks()
        self._at_call = self.meter.allocated(self.device)
        self.meter.reset_peak(self.device)
        counting = _TokenScaledBytes(tokens)
        counting.__enter__()
        self._counting = counting  # once entered: abandon() leaves only a mode it entered

    def first_chunk_ended(self, chunks: int) -> None:
        counting, self._counting = self._counting, None
        if counting is None:  # not watched: see first_chunk_starts
            return
        _leave(counting)
        transient = max(0, self.meter.peaks(self.device).allocated - self._at_call)
        scaled = min(counting.peak, transient)
        whole = self._at_call + transient + (chunks - 1) * scaled
        self.whole_allocated_peak = max(self.whole_allocated_peak, whole)

    def abandon(self) -> None:
        """The forward stopped inside a first chunk: leave the dispatch mode it entered."""
        counting, self._counting = self._counting, None
        if counting is not None:
            _leave(counting)

    def peaks(self) -> Peaks:
        """The forward's peaks so far, over every reset."""
        now = self.meter.peaks(self.device)
        return Peaks(
            max(now.allocated, self._earlier.allocated), max(now.reserved, self._earlier.reserved)
        )

    def whole_peaks(self) -> Peaks:
        """The forward's peaks had every cut part run whole."""
        measured = self.peaks()
        more = max(0, self.whole_allocated_peak - measured.allocated)
        return Peaks(measured.allocated + more, measured.reserved + more)


class CalibratedMemoryRequired:
    """The private model's ``memory_required``: what forwards of that latent shape took, per
    sample times the batch asked about, over COND_BATCH_FACTOR, once one ran; core's estimate
    before that. Holds its model weakly (it lives on the model)."""

    def __init__(self, base_model: Any) -> None:
        self.model = weakref.ref(base_model)

    def __call__(self, input_shape: Any, cond_shapes: Any = None, **kwargs: Any) -> float:
        model = self.model()
        assert model is not None, "called through a collected model"
        need = measured(model.diffusion_model, input_shape)
        if need is not None and need.per_sample:
            per_sample = need.in_use(is_cutting(model.diffusion_model))
            # core's batching rule multiplies this by COND_BATCH_FACTOR: see [Note: auto plans]
            return per_sample * int(input_shape[0]) / COND_BATCH_FACTOR
        if cond_shapes is not None:
            kwargs["cond_shapes"] = cond_shapes
        return type(model).memory_required(model, input_shape, **kwargs)


def calibrate(base_model: Any) -> None:
    """Have core ask ``base_model`` (a private model) for measured needs where there are any."""
    if not isinstance(vars(base_model).get("memory_required"), CalibratedMemoryRequired):
        base_model.memory_required = CalibratedMemoryRequired(base_model)


class Reserve(NamedTuple):
    """VRAM to leave free beside the weights, and the forwards a sampling step then runs for
    each conditioning pass of the latent batch."""

    bytes: float
    forwards_per_step: int
    why: str
    cond_batch: bool = False  # kept for both conditionings in one batch


def reserves(patcher: Any, noise_shape: Any, conds: dict, cutting: bool = True) -> list[Reserve]:
    """The reserves worth planning for this latent with a swap that cuts token-wise parts
    into chunks (``cutting``) or runs them whole, best first: see [Note: auto plans]."""
    mm = comfy.model_management
    floor = mm.minimum_inference_memory()
    extra = mm.extra_reserved_memory()
    need = measured(patcher.model.diffusion_model, noise_shape)
    if need is None or not need.per_sample:
        one = comfy.sampler_helpers.estimate_memory(patcher, noise_shape, conds)[1]
        return [Reserve(max(floor, one + extra), 1, "core's estimate")]
    one = need.in_use(cutting) * int(noise_shape[0])
    single = max(floor, one + extra)
    if not need.uncond:
        return [Reserve(single, 1, "measured")]
    shrinks_below = max(floor, one / COND_BATCH_FACTOR + extra)  # core's shrink rule
    batched = max(shrinks_below, 2 * one + max(need.batch_shortfall, BATCH_ROOM_UP_FRONT))
    return [
        Reserve(batched, 1, "measured; both conditionings in one batch", cond_batch=True),
        Reserve(single, 2, "measured; one conditioning per forward"),
    ]


def free_vram(patcher: Any, device: torch.device) -> float:
    """Free VRAM as ``patcher``'s core reads it: with what aimdo can give back, where core has
    that (``patcher`` None: torch's and the driver's free memory alone)."""
    free_of = getattr(patcher, "get_free_memory", None)
    if callable(free_of):
        return free_of(device)
    return comfy.model_management.get_free_memory(device)


def available_vram(patcher: Any) -> float:
    """VRAM the model's weights could have: free now (with what aimdo can give back), plus
    what every loaded model on the device holds (core unloads them to make room)."""
    mm = comfy.model_management
    device = patcher.load_device
    free = free_vram(patcher, device)
    loaded = sum(
        entry.model.loaded_size()
        for entry in mm.current_loaded_models
        if entry.model is not None and entry.device == device
    )
    return free + loaded
