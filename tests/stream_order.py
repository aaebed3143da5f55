"""A recording stand-in for the device streams: the happens-before order of every copy, decode
and compute step, checked on the CPU.

On the CPU every operation runs at once, so a missing ``wait_event`` cannot show as a wrong
output. Here the scheduler runs against :class:`RecordingStreams`, which keeps a vector clock per
stream the way CUDA orders work: operations on one stream are ordered, ``record`` snapshots a
stream's clock into an event, ``wait`` joins an event into a stream, ``synchronize`` joins
everything. A dispatch mode logs every aten operation with the bytes it reads and writes and
the stream it was queued on; allocating a tensor counts as a write by the allocating stream
(the caching allocator hands memory out in that stream's order). A race is two accesses to
overlapping bytes from different streams, at least one a write, neither ordered before the
other. Every tensor an operation touches is kept alive until the check, so the CPU allocator
never reuses an address and an address names one buffer.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from comfyui_wan_blockswap.wan_blockswap.streams import DeviceStreams


class FakeStream:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<stream {self.name}>"


@dataclass
class FakeEvent:
    clock: dict[str, int] | None = None  # None: never recorded (waiting on it is a no-op)
    tag: str = ""


@dataclass
class Access:
    stream: str
    clock: dict[str, int]
    write: bool
    start: int
    end: int
    what: str


@dataclass
class Race:
    first: Access
    second: Access

    def __str__(self) -> str:
        a, b = self.first, self.second
        kinds = f"{'write' if a.write else 'read'}/{'write' if b.write else 'read'}"
        return f"{kinds} race: {a.what} on {a.stream} and {b.what} on {b.stream}"


def _ordered(a: Access, b: Access) -> bool:
    """Whether ``a`` happens before ``b``."""
    return a.clock[a.stream] <= b.clock.get(a.stream, 0)


class RecordingStreams(DeviceStreams):
    """CPU streams that record the order CUDA would give them. ``skip_waits``: (stream name,
    event tag) pairs whose waits are dropped, to check that the checker sees the race."""

    def __init__(self, device: torch.device, timing: bool = False, skip_waits=()) -> None:
        self.device = device
        self.is_cuda = False
        self.timing = timing
        self.compute = FakeStream("compute")
        self.copy_stream = FakeStream("copy")
        self.decode_stream = FakeStream("decode")
        self.clocks: dict[str, dict[str, int]] = {
            s.name: {s.name: 0} for s in (self.compute, self.copy_stream, self.decode_stream)
        }
        self.skip_waits = set(skip_waits)
        self.skipped = 0
        self._local = threading.local()

    # -- the DeviceStreams interface --------------------------------------------------------

    def compute_stream(self) -> FakeStream:
        return self.compute

    def new_event(self, timing: bool | None = None) -> FakeEvent:
        return FakeEvent()

    def on(self, stream: Any) -> contextlib.AbstractContextManager:
        return self._on(stream)

    @contextlib.contextmanager
    def _on(self, stream: Any) -> Iterator[None]:
        stack = self._stack()
        stack.append(stream if stream is not None else self.current())
        try:
            yield
        finally:
            stack.pop()

    def record(self, event: Any, stream: Any) -> None:  # type: ignore[override]
        if event is not None:
            event.clock = dict(self.clocks[stream.name])

    def wait(self, stream: Any, event: Any) -> None:  # type: ignore[override]
        if stream is None or event is None or event.clock is None:
            return
        if (stream.name, event.tag) in self.skip_waits:
            self.skipped += 1
            return
        clock = self.clocks[stream.name]
        for name, tick in event.clock.items():
            clock[name] = max(clock.get(name, 0), tick)

    def synchronize(self) -> None:
        joined: dict[str, int] = {}
        for clock in self.clocks.values():
            for name, tick in clock.items():
                joined[name] = max(joined.get(name, 0), tick)
        for clock in self.clocks.values():
            clock.update(joined)

    # -- for the recorder ---------------------------------------------------------------------

    def _stack(self) -> list:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def current(self) -> FakeStream:
        stack = self._stack()
        return stack[-1] if stack else self.compute

    def tick(self) -> tuple[str, dict[str, int]]:
        """One operation queued on the current stream: its stream and clock."""
        name = self.current().name
        clock = self.clocks[name]
        clock[name] += 1
        return name, dict(clock)


def tag_events(scheduler: Any) -> None:
    """Name the events of the scheduler's memory by their role, for ``skip_waits``."""
    provider = scheduler.provider
    for flight in provider.flights:
        for tag in ("ready", "freed", "copied"):
            event = getattr(flight, tag)
            if isinstance(event, FakeEvent):
                event.tag = tag
    pool = getattr(provider, "pool", None)  # fixed slots: the pool's events
    for tag in ("ready", "freed", "copied", "landed", "consumed"):
        for event in getattr(pool, tag, None) or ():
            if isinstance(event, FakeEvent):
                event.tag = tag


MAX_RACES = 20
_ALLOCATING = {"empty", "empty_strided", "empty_like", "zeros", "ones", "full", "new_empty"}


@dataclass
class AccessLog(TorchDispatchMode):
    """Logs every aten operation's byte ranges against the current stream's clock."""

    streams: RecordingStreams
    accesses: dict[int, list[Access]] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)
    races: list[Race] = field(default_factory=list)

    def __post_init__(self) -> None:
        super().__init__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view:  # a view (slice, detach, view) is metadata: no kernel touches bytes
            return out
        stream, clock = self.streams.tick()
        schema = func._schema
        name = schema.name.split("::")[-1]
        written = set()
        for i, argument in enumerate(schema.arguments):
            if argument.alias_info is not None and argument.alias_info.is_write:
                value = args[i] if i < len(args) else kwargs.get(argument.name)
                written.update(id(t) for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor))
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        for tensor in inputs:
            self._log(tensor, stream, clock, id(tensor) in written, name)
        if name in _ALLOCATING:
            for tensor in tree_flatten(out)[0]:
                if isinstance(tensor, torch.Tensor):
                    self._log(tensor, stream, clock, True, f"{name} (allocation)")
        return out

    def _log(self, tensor: torch.Tensor, stream: str, clock: dict, write: bool, what: str):
        # ``.data =`` under inference mode (core's sampling) dispatches this shallow-copy
        # check: it compares tensor types and reads no bytes, so it is no access
        if what == "_has_compatible_shallow_copy_type":
            return
        if tensor.device.type != "cpu" or tensor.numel() == 0:
            return
        self.keep.append(tensor)  # no address is reused while the log lives
        storage = tensor.untyped_storage()
        base = storage.data_ptr()
        start = tensor.data_ptr()
        size = tensor.element_size()
        span = 1 + sum((n - 1) * abs(s) for n, s in zip(tensor.shape, tensor.stride()))
        access = Access(stream, clock, write, start, start + span * size, what)
        history = self.accesses.setdefault(base, [])
        if len(self.races) >= MAX_RACES:  # enough to report; the rest only costs time
            history.append(access)
            return
        for earlier in history:
            if earlier.stream == stream or not (earlier.write or write):
                continue
            if earlier.end <= access.start or access.end <= earlier.start:
                continue
            if not _ordered(earlier, access):
                self.races.append(Race(earlier, access))
        history.append(access)
