"""Load a checkpoint straight into a block-swapped model, tensor by tensor.

Resident tensors go from the file to the GPU, swapped tensors from the file into their
block's page-locked host buffer (``readinto``, one copy, no mapping that would keep file
pages in this process). The whole model never sits in VRAM, nor twice in RAM: peak RAM is
the swapped bytes plus one staging tensor, peak VRAM the resident weights plus one tensor.

Dtypes: fp32/fp16 tensors are cast to the compute dtype as they are read (modules a diffusers
class keeps in fp32 stay fp32); fp8 and GGUF-quantized Linear weights stay in their file form
(see :mod:`callbacks.lowbit_layers`); other quantized tensors are dequantized at load.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from .. import model_configs

from ..wan_blockswap import BlockSwap, HostBuffer, SwapConfig
from ..wan_blockswap.api import resolve_device
from ..wan_blockswap.config import DEFAULT_CHUNK_TOKENS
from ..wan_blockswap.engine import measure_model
from ..wan_blockswap.model_sizes import unit_layout
from ..wan_blockswap.plan import ModelSizes

from .checkpoint import Checkpoint, TensorRecord, open_checkpoint
from .gguf_dequant import SUPPORTED_TYPES, UnsupportedQuantTypeError, dequantize
from .lowbit_layers import to_cast_linear, to_gguf_linear
from .progress import TerminalProgress
from .skeleton import CheckpointMismatchError, Skeleton, build_skeleton, match_skeleton

logger = logging.getLogger("wan_blockswap")

Progress = Callable[[int, int, str], None]
FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
READ_THREADS = 8


# VRAM a cast or dequantization of one resident tensor may use at a time, while loading.
DECODE_CHUNK_BYTES = 64 * 2**20


@dataclass
class LoadReport:
    """What a lazy load did."""

    path: str
    format: str
    arch: str
    load_s: float = 0.0
    file_bytes: int = 0
    resident_bytes: int = 0
    swapped_bytes: int = 0
    block_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)
    # seconds per phase: open (header), skeleton, apply (plan, placeholders), stream (read)
    phases: dict[str, float] = field(default_factory=dict)


@dataclass
class Entry:
    """One file tensor and what to do with it."""

    name: str  # the model's key
    record: TensorRecord
    target: torch.dtype
    raw: bool  # the file bytes are the stored bytes: read straight into the destination


def load_swapped(
    path: str,
    config: SwapConfig | None = None,
    *,
    skeleton: nn.Module | None = None,
    device: torch.device | str | None = None,
    compute_dtype: torch.dtype | None = None,
    progress: Progress | bool | None = None,
    **options: object,
) -> tuple[nn.Module, BlockSwap, LoadReport]:
    """Load ``path`` into a block-swapped model without ever holding it whole.

    Args:
        path: a ``.safetensors`` file (ComfyUI single file, with or without the
            ``model.diffusion_model.`` prefix), a diffusers folder or index JSON, or a ``.gguf``.
        config: swap options (or pass them as keyword ``options``).
        skeleton: the model to load into, parameters on the meta device; ``None`` builds one
            from the file (diffusers folders; ComfyUI/original Wan files).
        device: compute device (default ``cuda`` if available).
        compute_dtype: dtype fp32/fp16 weights are cast to; default bf16, with a warning
            naming the cast when the file holds weights of another float dtype.
        progress: ``True`` draws a progress bar on stderr; a callable is called as
            ``progress(done_bytes, total_bytes, label)`` after each tensor (label: the block).

    Returns:
        ``(model, swap, report)``; ``swap.remove()`` frees everything.

    Raises:
        CheckpointError: missing, corrupt or pickle files; keys or shapes that do not fit.
        InsufficientMemoryError: the plan does not fit in RAM or VRAM (checked before anything
            is allocated).
    """
    if config is None:
        config = SwapConfig.from_options(**options)
    device = resolve_device(device)
    if progress is True:
        progress = TerminalProgress()
    elif progress is False:
        progress = None
    start = time.perf_counter()
    phases: dict[str, float] = {}

    def phase_done(name: str) -> None:
        phases[name] = time.perf_counter() - start - sum(phases.values())

    with open_checkpoint(path) as checkpoint:
        phase_done("open")
        plan = (
            build_skeleton(checkpoint) if skeleton is None else match_skeleton(skeleton, checkpoint)
        )
        entries = _prepare(plan, checkpoint, compute_dtype or torch.bfloat16)
        if compute_dtype is None:
            _warn_default_cast(path, entries)
        layout = (plan.arch or model_configs.detect(plan.model)).layout
        phase_done("skeleton")
        swap = BlockSwap.apply(plan.model, config, layout, device, allocate_empty=False)
        phase_done("apply")
        try:
            stream_into(checkpoint, entries, swap, device, progress)
        except BaseException:
            swap.remove(restore=False)
            raise
        phase_done("stream")
        report = LoadReport(
            path=str(path),
            format=checkpoint.format,
            arch=plan.arch.name if plan.arch else "generic",
            load_s=time.perf_counter() - start,
            file_bytes=sum(e.record.nbytes for e in entries),
            resident_bytes=swap.plan.resident_bytes,
            swapped_bytes=swap.plan.swapped_bytes,
            block_bytes=swap.plan.slot_bytes,
            phases=phases,
        )
        for entry in entries:
            name = str(entry.record.dtype or f"gguf:{entry.record.qtype}")
            report.dtypes[name] = report.dtypes.get(name, 0) + 1
    logger.info(
        "loaded %s in %.1f s: %.2f GiB resident, %.2f GiB in host memory",
        path,
        report.load_s,
        report.resident_bytes / 2**30,
        report.swapped_bytes / 2**30,
    )
    return plan.model, swap, report


def _warn_default_cast(path: object, entries: list[Entry]) -> None:
    """The default compute dtype is not silent where it changes the file's weights."""
    cast = {
        str(e.record.dtype).replace("torch.", "")
        for e in entries
        if e.target == torch.bfloat16 and e.record.dtype not in (None, torch.bfloat16)
    }
    if cast:
        logger.warning(
            "%s: %s weights are cast to bfloat16, the default compute_dtype; pass "
            "compute_dtype= to choose another",
            path,
            " and ".join(sorted(cast)),
        )


@dataclass(frozen=True)
class FileModel:
    """What a checkpoint's header says of the model it holds, nothing allocated: the sizes the
    planner sees once :func:`load_swapped` stored its weights, and the architecture."""

    sizes: ModelSizes
    arch: model_configs.ArchConfig
    variant: model_configs.Variant | None
    hidden_size: int


def read_file_model(
    path: str | os.PathLike,
    compute_dtype: torch.dtype = torch.bfloat16,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> FileModel:
    """The planner's view of the model in ``path`` (safetensors, GGUF or a diffusers folder),
    from its header and a meta skeleton: a plan for it needs no GPU and no weights read. Its
    units are cut as :func:`load_swapped` cuts them with ``chunk_tokens`` (0: token-wise parts
    are not units of their own; [Note: token chunks]).

    Raises:
        CheckpointError: the file cannot be read, or no skeleton can be built for it.
    """
    with open_checkpoint(path) as checkpoint:
        plan = build_skeleton(checkpoint)
        _prepare(plan, checkpoint, compute_dtype)
    built = model_configs.detect(plan.model)  # the skeleton's own class's record
    arch = plan.arch or built  # the file's, whose layout load_swapped plans with
    sizes = measure_model(plan.model, unit_layout(arch.layout, chunk_tokens))[1]
    variant = model_configs.variant_of(built, plan.model)
    main = [b for b in sizes.blocks if b.role == "main"]
    hidden = variant.hidden_size if variant is not None else 0
    if not hidden and main and built.hidden_param:
        block = plan.model.get_submodule(main[0].name)
        hidden = int(block.get_parameter(built.hidden_param).shape[-1])
    return FileModel(sizes, arch, variant, hidden)


def _prepare(plan: Skeleton, checkpoint: Checkpoint, compute_dtype: torch.dtype) -> list[Entry]:
    """Give every meta tensor its storage dtype (swapping in low-bit Linear layers), checking
    shapes and quant types before anything is allocated."""
    model = plan.model
    keep_fp32 = set(getattr(type(model), "_keep_in_fp32_modules", None) or ())

    def _keeps_fp32(name: str) -> bool:
        # diffusers keeps these modules in fp32 and reads their dtype to cast inputs
        return any(part in keep_fp32 for part in name.split("."))

    records = {name: checkpoint.records[key] for name, key in plan.key_map.items()}
    for name, record in records.items():
        module_path, _, attr = name.rpartition(".")
        owner = model.get_submodule(module_path) if module_path else model
        expected = tuple(getattr(owner, attr).shape)
        if tuple(record.shape) != expected:
            raise CheckpointMismatchError(
                f"{record.path}: tensor {record.name} has shape {tuple(record.shape)} but the "
                f"model's {name} is {expected}"
            )
        if record.qtype is not None and record.qtype not in SUPPORTED_TYPES:
            raise UnsupportedQuantTypeError(record.qtype, record.name)
        low_bit = record.qtype is not None or record.dtype in FP8_DTYPES
        if low_bit and attr == "weight" and type(owner) is nn.Linear and not _keeps_fp32(name):
            if record.qtype is not None:
                replacement = to_gguf_linear(owner, record.qtype, record.nbytes)
            else:
                replacement = to_cast_linear(owner, record.dtype)
            parent_path, _, child = module_path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, replacement)
    entries = []
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, record in records.items():
        tensor = tensors[name]
        if tensor.dtype == torch.uint8 and record.qtype is not None:  # GGUFLinear raw bytes
            target, raw = torch.uint8, True
        elif record.dtype in FP8_DTYPES and tensor.dtype == record.dtype:  # CastLinear weight
            target, raw = record.dtype, True
        elif record.dtype is not None and not record.dtype.is_floating_point:
            if tensor.is_floating_point():  # a float weight stored as integers reads as junk
                raise CheckpointMismatchError(
                    f"{record.path}: tensor {record.name} is stored as {record.dtype} but the "
                    f"model's {name} holds floating-point weights; the file is not a "
                    f"checkpoint of this model, or it is damaged"
                )
            target, raw = record.dtype, True
        else:
            target = torch.float32 if _keeps_fp32(name) else compute_dtype
            raw = record.qtype is None and record.dtype == target
        if tensor.dtype != target:
            tensor.data = torch.empty(tensor.shape, dtype=target, device="meta")
        entries.append(Entry(name, record, target, raw))
    return entries


def stream_into(
    checkpoint: Checkpoint,
    entries: list[Entry],
    swap: BlockSwap,
    device: torch.device,
    progress: Progress | None,
) -> None:
    """Read every tensor once into its destination.

    Swapped tensors are read unit by unit on several threads, each thread page-locking the
    unit's host buffer and then reading the file straight into it, so pinning one unit
    overlaps reading another (the page cache copies at a few GB/s per core, and pinning
    costs about as much). Resident tensors, and anything needing a cast, go through one
    staging buffer on this thread meanwhile.
    """
    entries = sorted(entries, key=lambda e: (e.record.path, e.record.offset))
    units: dict[int, tuple[Any, list[tuple[Entry, int]]]] = {}  # a swap's unit, its entries
    others: list[Entry] = []
    for entry in entries:
        found = swap.swapped_tensor(entry.name)
        if found is None:
            others.append(entry)
        else:
            stored, index = found
            units.setdefault(id(stored), (stored, []))[1].append((entry, index))
    pin = device.type == "cuda"
    staging = HostBuffer(max((e.record.nbytes for e in others), default=0), pin=pin)
    total = sum(e.record.nbytes for e in entries)
    done = 0

    def report(entry: Entry) -> None:
        nonlocal done
        done += entry.record.nbytes
        if progress is not None:
            progress(done, total, _label(entry.name))

    def fill(unit: Any, items: list[tuple[Entry, int]]) -> None:
        def write(views: list[torch.Tensor]) -> None:
            for entry, index in items:
                view = views[index]
                if entry.raw and view.device.type == "cpu":
                    checkpoint.read_into(entry.record.name, view.reshape(-1).view(torch.uint8))
                else:  # decoded, or a unit stored on a donor GPU: through host memory
                    raw = torch.empty(entry.record.nbytes, dtype=torch.uint8)
                    checkpoint.read_into(entry.record.name, raw)
                    view.copy_(_decode(raw, entry.record, entry.target, entry.raw))

        swap.fill_unit(unit, write)

    workers = min(READ_THREADS, os.cpu_count() or 1)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="blockswap-load")
    try:
        futures = {pool.submit(fill, stored, items): items for stored, items in units.values()}
        with torch.no_grad():
            for entry in others:
                dest = swap.destination(entry.name)
                if entry.raw and dest.device.type == "cpu":
                    checkpoint.read_into(entry.record.name, dest.reshape(-1).view(torch.uint8))
                else:
                    raw = staging.tensor[: entry.record.nbytes]
                    checkpoint.read_into(entry.record.name, raw)
                    if entry.raw or dest.device.type == "cpu":
                        dest.copy_(_decode(raw, entry.record, entry.target, entry.raw))
                    else:
                        decode_into(dest, raw, entry.record, entry.target)
                report(entry)
        for future in as_completed(futures):
            future.result()
            for entry, _ in futures[future]:
                report(entry)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        staging.free()


def decode_into(
    dest: torch.Tensor, raw: torch.Tensor, record: TensorRecord, target: torch.dtype
) -> None:
    """Cast or dequantize ``raw`` (file bytes, on the CPU) into ``dest`` on its device.

    On the GPU this takes microseconds where the CPU took ~0.15 s for the fp8 file's casts
    and far longer for GGUF. It goes a few rows at a time so the temporaries stay under
    :data:`DECODE_CHUNK_BYTES` of VRAM: dequantizing the largest non-block tensor whole would
    need its full bf16 size on top of the resident weights (a Q4_K file broke the "resident +
    one block" VRAM bar that way). GGUF stores rows whole (quant blocks run along the last
    dimension), so a row range of the bytes is a row range of the tensor.
    """
    shape = tuple(record.shape)
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    flat = dest.view(rows, -1)
    row_bytes = record.nbytes // rows
    step = max(1, DECODE_CHUNK_BYTES // max(1, flat.shape[1] * flat.element_size()))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        part = raw[start * row_bytes : stop * row_bytes].to(dest.device)
        sub = replace(record, shape=(stop - start, shape[-1]) if len(shape) > 1 else shape)
        flat[start:stop].copy_(_decode(part, sub, target, False).reshape(stop - start, -1))


def _decode(raw: torch.Tensor, record: TensorRecord, target: torch.dtype, is_raw: bool):
    """File bytes as a tensor of the storage dtype, on ``raw``'s device."""
    if is_raw:
        return raw.view(target).view(record.shape) if target != torch.uint8 else raw
    if record.qtype is not None:
        return dequantize(raw, record.qtype, record.shape, dtype=target, name=record.name)
    return raw.view(record.dtype).view(record.shape).to(target)


def _label(name: str) -> str:
    """``blocks.12.attn1.to_q.weight`` -> ``blocks.12``: progress is reported per block."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit() or (part.startswith("block") and part[5:].isdigit()):
            return ".".join(parts[: i + 1])
    return parts[0]
