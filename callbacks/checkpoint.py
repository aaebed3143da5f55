"""Safe, lazy access to checkpoint files: headers at open, tensor bytes only on request.

The block-swap loader streams every tensor from disk straight into its destination (a pinned
host buffer or a staging tensor), so this layer parses only metadata up front and hands out
raw bytes with :meth:`Checkpoint.read_into`, which has the kernel copy the file directly into
the caller's memory (``pread``/``readinto``): no intermediate copy and no ``mmap``, which
would keep the file's pages charged to this process's RSS while a 28 GB model streams by.

Files come from the internet, so every number in a header is distrusted: sizes, counts and
offsets are checked against the real file length before anything is allocated from them,
and every problem surfaces as a :class:`CheckpointError` naming the file, the tensor and the
fix.  Pickle formats are refused outright because unpickling runs arbitrary code.  GGUF
parsing lives in :mod:`callbacks.gguf_reader`, imported only when a ``.gguf`` is opened.
"""

from __future__ import annotations

import ctypes
import io
import json
import logging
import os
import threading
from dataclasses import dataclass

import torch

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointNotFoundError",
    "TensorRecord",
    "open_checkpoint",
]

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit is 100 MB
MAX_INDEX_BYTES = 64 * 1024 * 1024  # real *.index.json files are well under 1 MB
MAX_NDIM = 64  # more than any real tensor; bounds the work done per shape
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle")
SUPPORTED_FORMATS = (
    "a .safetensors file, a sharded *.safetensors.index.json, a diffusers model folder "
    "holding one of those, or a .gguf file"
)
REDOWNLOAD = "The file is corrupt, truncated or not a checkpoint: re-download or re-export it."

# safetensors dtype code -> torch attribute.  Codes after F8_E5M2 exist only in newer torch
# builds and are accepted where present; sub-byte F4/F6 types have no whole-byte itemsize.
_DTYPE_CODES = (
    "F64:float64 F32:float32 F16:float16 BF16:bfloat16 I64:int64 I32:int32 I16:int16 I8:int8 "
    "U8:uint8 BOOL:bool F8_E4M3:float8_e4m3fn F8_E5M2:float8_e5m2 U16:uint16 U32:uint32 "
    "U64:uint64 F8_E8M0:float8_e8m0fnu C64:complex64"
)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    code: getattr(torch, attr)
    for code, attr in (pair.split(":") for pair in _DTYPE_CODES.split())
    if hasattr(torch, attr)
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe, malformed or changed; the message says the fix.

    ``path`` and ``tensor`` (when known) let callers report or skip programmatically.
    """

    def __init__(self, message: str, *, path: str | None = None, tensor: str | None = None):
        super().__init__(message)
        self.path = path
        self.tensor = tensor


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The path does not exist; also a ``FileNotFoundError`` so generic handlers catch it."""


def checkpoint_error(
    path: str, problem: str, fix: str = REDOWNLOAD, *, tensor: str | None = None
) -> CheckpointError:
    """Build a :class:`CheckpointError` whose message always reads file, tensor, problem, fix."""
    where = path if tensor is None else f"{path}, tensor {tensor!r}"
    return CheckpointError(f"{where}: {problem}. {fix}", path=path, tensor=tensor)


_SNIFF = (
    (b"version https://git-lfs", "a Git LFS pointer, not the real file: run `git lfs pull`"),
    (b"<!DOCTYPE html", "an HTML page: the download saved an error or login page"),
    (b"<html", "an HTML page: the download saved an error or login page"),
    (b"PK\x03\x04", "a zip archive, i.e. a torch.save pickle checkpoint"),
    *((bytes([0x80, protocol]), "a Python pickle") for protocol in (2, 3, 4, 5)),
    (b"GGUF", "a GGUF file: give it the .gguf extension"),
)


def sniff(head: bytes) -> str:
    """Say what a file that failed to parse really is, from its first bytes, as a hint.

    Users often hand over a Git LFS pointer, an HTML error page or a renamed pickle; naming
    it turns a baffling "bad header" into an obvious fix.  Returns "" if nothing matches.
    """
    start = head.lstrip()
    hits = [hint for magic, hint in _SNIFF if start[: len(magic)].lower() == magic.lower()]
    return f" (it is {hits[0]})" if hits else ""


@dataclass(frozen=True, slots=True)
class TensorRecord:
    """Where one tensor's bytes live and what they are; holds no data.

    ``shape`` is PyTorch order (GGUF's reversed dims are flipped back).  ``dtype`` is the
    storage dtype of plain tensors and ``None`` for GGUF quantized ones, which carry their
    ``gguf.GGMLQuantizationType`` in ``qtype`` instead.  ``offset`` is absolute in ``path``.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    qtype: int | None
    nbytes: int
    path: str
    offset: int


class Checkpoint:
    """Parsed checkpoint metadata plus on-demand, copy-free reads of single tensors.

    Files are opened lazily on the first read and kept open until :meth:`close` (or the end
    of a ``with`` block).  Reads use ``os.preadv`` where available, so several threads may
    stream different tensors at once; elsewhere a per-file lock serialises seek+readinto.
    """

    def __init__(
        self,
        format: str,
        paths: tuple[str, ...],
        records: dict[str, TensorRecord],
        metadata: dict[str, object],
        file_sizes: dict[str, int],
    ) -> None:
        self.format = format
        self.paths = paths
        self.records = records
        self.metadata = metadata
        self._file_sizes = file_sizes  # seen at open: a changed size means a changed file
        self._files: dict[tuple[str, int], io.FileIO] = {}
        self._locks = {path: threading.Lock() for path in paths}
        self._guard = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<Checkpoint {self.format}: {len(self.records)} tensors, {len(self.paths)} file(s)>"

    @property
    def total_bytes(self) -> int:
        """The size of the checkpoint's files together, as seen when they were opened: what a
        model built from the file is bounded by."""
        return sum(self._file_sizes.values())

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close every file handle; safe to call repeatedly.  Later reads raise ValueError."""
        with self._guard:
            self._closed = True
            files, self._files = self._files, {}
        for handle in files.values():
            handle.close()

    def _handle(self, path: str) -> io.FileIO:
        """Open ``path`` once per thread, unbuffered, checking it still has its size.

        One descriptor per thread because the kernel keeps readahead state per open file:
        threads reading different blocks through one descriptor look like random access and
        lose readahead when the file is not cached yet.
        """
        key = (path, threading.get_ident())
        with self._guard:
            if self._closed:
                raise ValueError(f"{self!r} is closed; open the checkpoint again to read it")
            if key not in self._files:
                try:
                    handle = open(path, "rb", buffering=0)
                except OSError as exc:
                    raise checkpoint_error(path, f"cannot reopen it ({exc})", "Check it.") from None
                size = os.fstat(handle.fileno()).st_size
                if size != self._file_sizes[path]:
                    handle.close()
                    raise checkpoint_error(
                        path,
                        f"it changed since it was opened ({self._file_sizes[path]} -> {size} "
                        "bytes)",
                        "Do not modify checkpoints while they are in use; open it again.",
                    )
                if hasattr(os, "posix_fadvise"):  # a larger readahead window for cold files
                    os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
                self._files[key] = handle
            return self._files[key]

    def _record(self, name: str) -> TensorRecord:
        record = self.records.get(name)
        if record is None:
            raise KeyError(f"{name!r} is not a tensor of {self!r} (keys are as stored)")
        return record

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Fill ``out`` with the raw stored bytes of tensor ``name``, straight from the file.

        ``out`` must be a contiguous CPU ``torch.uint8`` tensor of exactly ``nbytes``
        elements (pinned memory is fine).  The kernel copies from the page cache into it
        directly, so a multi-GB tensor never exists twice in RAM.  A short read means the
        file shrank after opening and raises :class:`CheckpointError`.
        """
        record = self._record(name)
        if out.dtype != torch.uint8 or out.device.type != "cpu":
            raise TypeError(f"read_into needs a CPU uint8 tensor, got {out.dtype} on {out.device}")
        if not out.is_contiguous() or out.numel() != record.nbytes:
            raise ValueError(
                f"read_into({name!r}) needs a contiguous tensor of exactly {record.nbytes} "
                f"elements, got {out.numel()} (contiguous={out.is_contiguous()})"
            )
        if record.nbytes == 0:
            return
        handle = self._handle(record.path)
        view = memoryview((ctypes.c_ubyte * record.nbytes).from_address(out.data_ptr())).cast("B")
        done = 0
        try:
            while done < record.nbytes:
                got = self._read_at(record.path, handle, view[done:], record.offset + done)
                if not got:
                    raise checkpoint_error(
                        record.path,
                        f"short read: got {done} of {record.nbytes} bytes at offset "
                        f"{record.offset}; the file was truncated or replaced after opening",
                        "Do not modify checkpoints while in use; re-download it if corrupt.",
                        tensor=name,
                    )
                done += got
        except OSError as exc:
            raise checkpoint_error(
                record.path, f"reading failed ({exc})", "Check the disk.", tensor=name
            ) from exc

    def _read_at(self, path: str, handle: io.FileIO, buf: memoryview, offset: int) -> int:
        """One positioned read into ``buf``; may return fewer bytes (the caller loops)."""
        if hasattr(os, "preadv"):
            return os.preadv(handle.fileno(), [buf], offset)
        with self._locks[path]:  # no pread (Windows): seek+readinto pairs must not interleave
            handle.seek(offset)
            return handle.readinto(buf) or 0

    def read(self, name: str) -> torch.Tensor:
        """The raw bytes of tensor ``name`` as a new 1-D ``torch.uint8`` tensor."""
        out = torch.empty(self._record(name).nbytes, dtype=torch.uint8)
        self.read_into(name, out)
        return out


class _DuplicateKey(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """JSON object hook: a repeated key would silently hide a tensor, so refuse it."""
    result = dict(pairs)
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise _DuplicateKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def _load_json(path: str, raw: bytes, what: str) -> object:
    """Decode untrusted JSON, turning every way it can fail into a CheckpointError."""
    try:
        return json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        problem = f"the {what} is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    except _DuplicateKey as exc:
        problem = f"the {what} lists key {exc.args[0]!r} twice"
    except (ValueError, RecursionError) as exc:  # RecursionError: absurdly nested JSON
        problem = f"the {what} is not valid JSON ({type(exc).__name__}: {str(exc)[:200]})"
    raise checkpoint_error(path, problem)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)  # JSON true is no size


def _parse_entry(
    path: str, name: str, entry: object, data_size: int
) -> tuple[tuple[int, ...], torch.dtype, int, int]:
    """Validate one header entry; returns (shape, dtype, begin, end), offsets data-relative."""

    def bad(problem: str) -> CheckpointError:
        return checkpoint_error(path, problem, tensor=name)

    if not isinstance(entry, dict):
        raise bad(f"its header entry is a {type(entry).__name__}, not an object")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
        raise bad(f"its header entry lacks {', '.join(missing)}")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise bad(f"unknown dtype {str(code)[:40]!r} (supported: {', '.join(SAFETENSORS_DTYPES)})")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise bad(f"shape must be a list of at most {MAX_NDIM} ints")
    if not all(_is_int(dim) and dim >= 0 for dim in shape):
        raise bad(f"shape {str(shape)[:80]} must hold non-negative ints")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))):
        raise bad(f"data_offsets {str(offsets)[:80]} must be [begin, end] ints")
    begin, end = offsets
    if not 0 <= begin <= end <= data_size:
        raise bad(f"data_offsets [{begin}, {end}] fall outside the {data_size}-byte data section")
    numel = 0 if 0 in shape else 1
    for dim in shape:  # stop once past the data size: no bignum work from absurd shapes
        numel *= dim
        if numel > data_size:
            break
    dtype = SAFETENSORS_DTYPES[code]
    if numel * dtype.itemsize != end - begin:
        need = numel * dtype.itemsize if numel <= data_size else f"over {data_size}"
        raise bad(
            f"{code} shape {str(shape)[:80]} needs {need} bytes, data_offsets span {end - begin}"
        )
    return tuple(shape), dtype, begin, end


def read_safetensors_header(path: str) -> tuple[dict[str, TensorRecord], dict[str, object], int]:
    """Parse and validate a safetensors header; returns (records, __metadata__, file size).

    Records are ordered by data offset, the order their bytes follow in the file, so a
    loader walking them reads the file sequentially.
    """
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(32)
        header_len = int.from_bytes(head[:8], "little")
        if size < 8:
            problem = f"it is only {size} bytes long, too short for safetensors"
        elif header_len == 0:
            problem = "the safetensors header length field is 0"
        elif header_len > MAX_HEADER_BYTES:
            problem = f"the safetensors header length {header_len} exceeds the 100 MiB limit"
        elif header_len > size - 8:
            problem = f"the header length {header_len} exceeds the {size - 8} bytes after it"
        else:
            problem = ""
        if problem:
            raise checkpoint_error(path, problem + sniff(head))
        f.seek(8)
        raw = f.read(header_len)  # bounded by the checks above
    if len(raw) != header_len:
        raise checkpoint_error(path, "the file shrank while its header was being read")
    header = _load_json(path, raw, "header")
    if not isinstance(header, dict):
        raise checkpoint_error(path, f"the header is a JSON {type(header).__name__}, not object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise checkpoint_error(path, "__metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    spans = []
    for index, (name, entry) in enumerate(header.items()):
        shape, dtype, begin, end = _parse_entry(path, name, entry, data_size)
        spans.append((begin, end, index, name, shape, dtype))
    spans.sort()  # by begin, ties in header order
    records: dict[str, TensorRecord] = {}
    covered = prev_end = 0
    prev_name = None
    for begin, end, _, name, shape, dtype in spans:
        if end > begin:
            if begin < prev_end:
                raise checkpoint_error(
                    path, f"its bytes [{begin}, {end}) overlap those of {prev_name!r}", tensor=name
                )
            prev_end, prev_name, covered = end, name, covered + end - begin
        records[name] = TensorRecord(
            name, shape, dtype, None, end - begin, path, data_start + begin
        )
    if covered != data_size:  # the reference library refuses this; harmless for reading
        logger.warning("%s: %d data bytes belong to no tensor", path, data_size - covered)
    return records, metadata, size


def _read_index(path: str) -> tuple[dict[str, str], dict[str, object]]:
    """Load ``weight_map`` (tensor -> shard file name) and ``metadata`` from an index JSON."""
    with open(path, "rb") as f:
        raw = f.read(MAX_INDEX_BYTES + 1)
    if len(raw) > MAX_INDEX_BYTES:
        raise checkpoint_error(path, "the index file is over 64 MiB, far too large for an index")
    index = _load_json(path, raw, "index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise checkpoint_error(path, 'the index has no "weight_map" object naming tensors')
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise checkpoint_error(
                path, f"its shard {str(shard)[:80]!r} is no .safetensors", tensor=key
            )
        if shard != os.path.basename(shard) or "\\" in shard or shard.startswith(".."):
            raise checkpoint_error(
                path, f"shard {shard!r} is not in the index's folder", tensor=key
            )
    metadata = index.get("metadata")
    return weight_map, dict(metadata) if isinstance(metadata, dict) else {}


def _open_index(path: str) -> Checkpoint:
    """Open every shard an index names, checking each exists and holds its listed keys.

    Records come shard by shard (sorted names), each shard in data order.  Keys a shard
    holds but the index omits are kept (loaders of sharded models read whole shards).
    """
    weight_map, index_meta = _read_index(path)
    folder = os.path.dirname(path)
    shards = sorted(set(weight_map.values()))
    missing = [shard for shard in shards if not os.path.isfile(os.path.join(folder, shard))]
    if missing:
        raise checkpoint_error(
            path,
            f"{len(missing)} shard(s) named in the index are missing: {', '.join(missing)}",
            "Download every shard into the same folder as the index.",
        )
    records: dict[str, TensorRecord] = {}
    metadata: dict[str, object] = {}
    sizes: dict[str, int] = {}
    for shard in shards:
        shard_path = os.path.join(folder, shard)
        shard_records, shard_meta, sizes[shard_path] = read_safetensors_header(shard_path)
        for key, value in shard_meta.items():
            metadata.setdefault(key, value)
        for name, record in shard_records.items():
            if name in records:
                raise checkpoint_error(path, f"it is in {records[name].path} too", tensor=name)
            if name not in weight_map:
                logger.warning("%s: %r in %s is not listed in the index", path, name, shard)
            records[name] = record
    absent = [
        key
        for key, shard in weight_map.items()
        if key not in records or os.path.basename(records[key].path) != shard
    ]
    if absent:
        raise checkpoint_error(
            path,
            f"{len(absent)} tensor(s) listed in the index are not in the shard it names, e.g. "
            f"{', '.join(repr(key) for key in absent[:5])}",
            "The index and shards do not belong together: re-download the model folder.",
        )
    metadata.update(index_meta)
    return Checkpoint("safetensors", tuple(sizes), records, metadata, sizes)


def _pick_in_directory(path: str) -> str:
    """Choose the checkpoint inside a diffusers component folder, or explain why not."""
    entries = sorted(os.scandir(path), key=lambda entry: entry.name)
    names = [entry.name for entry in entries if entry.is_file()]
    candidates = [n for n in names if n.endswith(".safetensors.index.json")]
    candidates = candidates or [n for n in names if n.endswith(".safetensors")]
    if len(candidates) == 1:
        return os.path.join(path, candidates[0])
    if candidates:
        raise checkpoint_error(
            path,
            f"the folder holds several candidate checkpoints: {', '.join(candidates)}",
            "Pass the file or index you want instead of the folder.",
        )
    others = [n for n in names if n.lower().endswith(PICKLE_SUFFIXES + (".gguf",))]
    subdirs = [entry.name for entry in entries if entry.is_dir()]
    raise checkpoint_error(
        path,
        "the folder contains no *.safetensors.index.json and no *.safetensors file"
        + (f" (it holds {', '.join(others)})" if others else ""),
        "Pass a model component folder (e.g. .../transformer) or a file"
        + (f"; subfolders: {', '.join(subdirs[:20])}." if subdirs else "."),
    )


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Open a checkpoint for lazy reading, validating its headers but reading no tensor data.

    Accepts a ``.safetensors`` file, a sharded ``*.safetensors.index.json``, a diffusers
    component folder holding one of those, or a ``.gguf`` file.  Pickle formats are refused.
    Raises :class:`CheckpointError` (:class:`CheckpointNotFoundError` for a missing path).
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.exists(path):
        raise CheckpointNotFoundError(
            f"{path}: no such file or folder. Check the path and that the download finished.",
            path=path,
        )
    if os.path.isdir(path):
        path = _pick_in_directory(path)
    lower = path.lower()
    if lower.endswith(PICKLE_SUFFIXES + tuple(s + ".index.json" for s in PICKLE_SUFFIXES)):
        raise checkpoint_error(
            path,
            "pickle-based checkpoints (.ckpt/.pt/.pth/.bin/.pkl) can run arbitrary code when "
            "loaded, so they are never opened here",
            "Convert it to .safetensors (or download the safetensors version) and use that.",
        )
    if not lower.endswith((".safetensors", ".safetensors.index.json", ".gguf")):
        raise checkpoint_error(path, "unrecognised checkpoint type", f"Use {SUPPORTED_FORMATS}.")
    if not os.path.isfile(path):  # FIFOs and devices would block or never end
        raise checkpoint_error(path, "not a regular file", "Pass the checkpoint file itself.")
    if lower.endswith(".safetensors.index.json"):
        checkpoint = _open_index(path)
    else:
        if lower.endswith(".gguf"):
            from .gguf_reader import read_gguf_header  # gguf/numpy only when needed

            fmt, (records, metadata, size) = "gguf", read_gguf_header(path)
        else:
            fmt, (records, metadata, size) = "safetensors", read_safetensors_header(path)
        checkpoint = Checkpoint(fmt, (path,), records, metadata, {path: size})
    logger.debug("opened %s: %d tensors", path, len(checkpoint.records))
    return checkpoint
