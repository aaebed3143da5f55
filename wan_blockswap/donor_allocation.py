"""Where swapped blocks are stored: the allocation string and the plan it gives.

A user names the devices that hold the swapped units ("donors") in one string, the syntax
ComfyUI-MultiGPU's DisTorch users already write::

    cuda:1,8gb;cpu,*        first 8 GiB of swapped units on the second GPU, the rest in RAM
    cuda:1,25%;cuda:2,25%;cpu,*

Entries are ``DEVICE,AMOUNT`` separated by ``;``. ``DEVICE`` is ``cpu`` or ``cuda:N``
(``cuda`` is ``cuda:0``). ``AMOUNT`` is a size with a binary unit (``8gb`` = 8 * 2**30 bytes,
what the rest of the package means by GB), a percentage of the swapped bytes, or ``*``:
what the other entries leave.

:func:`parse_allocation` checks the text; :func:`plan_storage` assigns each swapped unit,
whole, to one donor. Both are pure (no torch), so options can be validated before anything
is loaded, and the plan can be tested on any machine. (Slightly over the ~400-line guide:
the parser and the planner share the meaning of every amount, ``*`` included.)
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Iterable, Literal, Mapping, Sequence

from .errors import BlockSwapConfigError

logger = logging.getLogger(__name__)

AmountKind = Literal["bytes", "percent", "rest"]

DEFAULT_DONOR = "cpu"
EXAMPLE = "cuda:1,8gb;cpu,*"  # shown in every error message: a string that works
GIB = 2**30
# Above this an amount is a typo, not a device; it also keeps ``value`` a sane float
MAX_AMOUNT_BYTES = 2**63

# Binary units whatever the spelling: the rest of the package (vram_budget_gb, logs) means
# 2**30 bytes by GB, and DisTorch users write "gb"
UNITS: dict[str, int] = {"b": 1}
for _power, _letter in enumerate("kmgt", start=1):
    UNITS.update(dict.fromkeys((_letter, f"{_letter}b", f"{_letter}ib"), 1024**_power))
# Largest first: format_allocation writes a byte amount in the largest unit that is exact
_FORMAT_UNITS = (("tb", 2**40), ("gb", 2**30), ("mb", 2**20), ("kb", 2**10), ("b", 1))

_DEVICE = re.compile(r"(?:cpu|cuda(?:\s*:\s*(?P<index>\d+))?)")
# At most three exponent digits: Fraction("1e-999999999") would build a billion-digit number
_AMOUNT = re.compile(
    r"(?P<number>[+-]?(?:nan|inf(?:inity)?|(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d{1,3})?))"
    r"\s*(?P<unit>%|[a-z]*)"
)


@dataclass(frozen=True)
class AllocationEntry:
    """One ``DEVICE,AMOUNT`` entry.

    Attributes:
        device: normalised device name, ``"cpu"`` or ``"cuda:N"``.
        kind: ``"bytes"`` (``value`` is a whole number of bytes), ``"percent"`` (``value`` is
            a percentage of the swapped bytes, 0..100) or ``"rest"`` (``*``; ``value`` is 0
            and unused).
        value: see ``kind``.
    """

    device: str
    kind: AmountKind
    value: float


@dataclass(frozen=True)
class StoragePlan:
    """Which donor stores each swapped unit.

    Attributes:
        devices: the device of each unit, in the order the units are used.
        bytes_per_device: bytes stored on every donor, in the order the allocation names
            them (0 for a donor that got no unit).
        unit_bytes: the units' sizes, as planned (kept so :meth:`describe` can round safely).
    """

    devices: tuple[str, ...]
    bytes_per_device: dict[str, int] = field(default_factory=dict)
    unit_bytes: tuple[int, ...] = ()

    def units_on(self, device: str) -> tuple[int, ...]:
        """Indices of the units stored on ``device``."""
        device = normalize_device(device)
        return tuple(i for i, on in enumerate(self.devices) if on == device)

    def describe(self) -> str:
        """The allocation actually used, as a string the user can paste back.

        Donors that got units, in order; each amount rounded UP to 0.01 gb (what a user
        reads and types), the last written ``*``. Rounding up never drops a unit, and it
        never takes in the next one either where units are at least 0.01 GiB (every real
        block); where it would, the exact byte count is written instead. So
        ``plan_storage(parse_allocation(plan.describe()), plan.unit_bytes, ...)`` stores every
        unit where this plan does.
        """
        used = [device for device in self.bytes_per_device if self.units_on(device)]
        if not used:  # nothing swapped: any donor does; name the first one
            return f"{next(iter(self.bytes_per_device), DEFAULT_DONOR)},*"
        parts = []
        for device in used[:-1]:
            last = self.units_on(device)[-1]
            stored = self.bytes_per_device[device]
            hundredths = -(-stored * 100 // GIB)  # ceil, in integers: no float error
            rounded = f"{hundredths // 100}.{hundredths % 100:02d}gb"
            following = self.unit_bytes[last + 1]  # exists: a later device has units
            if stored + following <= Fraction(hundredths * GIB, 100):
                rounded = f"{stored}b"  # the rounding would take in the next unit
            parts.append(f"{device},{rounded}")
        parts.append(f"{used[-1]},*")
        return ";".join(parts)


def normalize_device(text: str) -> str:
    """``"cpu"`` or ``"cuda:N"`` for a device name (``cuda`` is ``cuda:0``; any case).

    Raises:
        BlockSwapConfigError: not a device an allocation can name.
    """
    device = _device_or_none(text)
    if device is None:
        raise BlockSwapConfigError(
            f"unknown device {text!r}; name cpu or cuda:N (cuda:0 is the first GPU), "
            f"e.g. {EXAMPLE!r}"
        )
    return device


def parse_allocation(text: str) -> tuple[AllocationEntry, ...]:
    """Parse an allocation string such as ``"cuda:1,8gb;cpu,*"``.

    Checks everything that needs no model: syntax, devices, units, that no device is named
    twice, at most one ``*``, and that percentages add up to at most 100%.

    Raises:
        BlockSwapConfigError: the message quotes the offending entry and says how to fix it.
    """
    if not isinstance(text, str):
        raise BlockSwapConfigError(
            f"the allocation must be a string such as {EXAMPLE!r}, got {text!r}"
        )
    if not text.strip().strip(";").strip():
        raise BlockSwapConfigError(
            f"the allocation {text!r} is empty; name at least one device and amount, "
            f"e.g. {EXAMPLE!r} or 'cpu,*'"
        )
    raw = text.split(";")
    if not raw[-1].strip():
        raw.pop()  # one trailing ';' is allowed
    entries: list[AllocationEntry] = []
    named: dict[str, str] = {}  # device -> the entry that named it
    percent_total = Fraction(0)
    star = None
    for entry_text in raw:
        entry_text = entry_text.strip()
        if not entry_text:
            raise BlockSwapConfigError(
                f"the allocation {text!r} has an empty entry; remove the extra ';' "
                f"(only one at the very end is allowed), e.g. {EXAMPLE!r}"
            )
        entry, exact = _parse_entry(entry_text)
        if entry.device in named:
            raise BlockSwapConfigError(
                f"allocation entries {named[entry.device]!r} and {entry_text!r} both name "
                f"{entry.device}; give each device once, e.g. {EXAMPLE!r}"
            )
        named[entry.device] = entry_text
        if entry.kind == "rest":
            if star is not None:
                raise BlockSwapConfigError(
                    f"allocation entries {star!r} and {entry_text!r} both take the rest "
                    f"('*'); only one device can, give the others an amount, e.g. {EXAMPLE!r}"
                )
            star = entry_text
        elif entry.kind == "percent":
            percent_total += exact
            if percent_total > 100:
                raise BlockSwapConfigError(
                    f"allocation entry {entry_text!r} brings the percentages to "
                    f"{float(percent_total):g}%, over 100%; lower them or give the last "
                    f"device '*', e.g. 'cuda:1,50%;cpu,*'"
                )
        entries.append(entry)
    return tuple(entries)


def format_allocation(entries: Iterable[AllocationEntry]) -> str:
    """The canonical text of ``entries``: ``parse_allocation`` of it gives them back."""
    parts = []
    for entry in entries:
        if entry.kind == "rest":
            amount = "*"
        elif entry.kind == "percent":
            amount = f"{_plain(entry.value)}%"
        else:
            size = int(entry.value)
            name, unit = next((n, u) for n, u in _FORMAT_UNITS if size % u == 0)
            amount = f"{size // unit}{name}"
        parts.append(f"{entry.device},{amount}")
    return ";".join(parts)


def plan_storage(
    entries: Sequence[AllocationEntry],
    unit_bytes: Sequence[int],
    compute_device: str,
    available: Mapping[str, int] | None = None,
) -> StoragePlan:
    """Store each swapped unit, whole, on one donor device.

    Donors are filled in the order the allocation names them: each takes the next units
    while they fit within its amount, and the first unit that does not fit goes to the next
    donor. Units therefore stay in runs (the first blocks on one donor, the next on
    another), which keeps :meth:`StoragePlan.describe` short and exact.

    A percentage is of ``sum(unit_bytes)``. ``*`` takes what is left when its turn comes,
    less the amounts of the donors named after it, so ``cpu,*;cuda:1,8gb`` leaves the last
    8 GiB of units for cuda:1; a ``*`` named last takes everything left.

    Args:
        entries: from :func:`parse_allocation`.
        unit_bytes: the swapped units' sizes, in the order they are used.
        compute_device: the device the model runs on; it may not be a donor (the weights it
            keeps are set by ``blocks_to_swap`` / ``vram_budget_gb``).
        available: free bytes per device, where known; an amount larger than that is an
            error (for ``*``, the bytes it would get).

    Raises:
        BlockSwapConfigError: the compute device is a donor, an amount exceeds what is
            available, or units are left over.
    """
    sizes = tuple(unit_bytes)
    for size in sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"unit_bytes must be non-negative integers, got {size!r}")
    entries = tuple(entries)
    if not entries:
        raise BlockSwapConfigError(
            f"the allocation names no device; name at least one, e.g. {EXAMPLE!r}"
        )
    compute = normalize_device(compute_device)
    free = {normalize_device(name): int(nbytes) for name, nbytes in (available or {}).items()}
    total = sum(sizes)
    for entry in entries:
        if entry.device == compute:
            raise BlockSwapConfigError(
                f"allocation entry {format_allocation([entry])!r} names {compute}, the device "
                f"the model runs on; the weights kept there are set by blocks_to_swap or "
                f"vram_budget_gb, so list only other (donor) devices, e.g. {EXAMPLE!r}"
            )
    # Fixed amounts in bytes; checked against free memory before anything is placed, so the
    # error is about the string, whatever the units
    fixed = {entry.device: _fixed_bytes(entry, total) for entry in entries if entry.kind != "rest"}
    for entry in entries:
        if entry.kind != "rest" and entry.device in free:
            _check_free(entry, fixed[entry.device], free[entry.device])

    devices: list[str] = []
    bytes_per_device: dict[str, int] = {}
    for position, entry in enumerate(entries):
        if entry.kind == "rest":
            later = sum(fixed[e.device] for e in entries[position + 1 :])
            capacity = max(0, sum(sizes[len(devices) :]) - later)
        else:
            capacity = fixed[entry.device]
        stored = 0
        while len(devices) < len(sizes) and stored + sizes[len(devices)] <= capacity:
            stored += sizes[len(devices)]
            devices.append(entry.device)
        bytes_per_device[entry.device] = stored
        if entry.kind == "rest" and entry.device in free:
            _check_free(entry, stored, free[entry.device])

    if len(devices) < len(sizes):
        left = sizes[len(devices) :]
        raise BlockSwapConfigError(
            f"the allocation {format_allocation(entries)!r} leaves {sum(left)} bytes "
            f"({_gib(sum(left))}, {len(left)} of {len(sizes)} swapped units) with no device; "
            f"{_leftover_fix(entries, compute)}"
        )
    plan = StoragePlan(tuple(devices), bytes_per_device, sizes)
    logger.debug("swapped units stored as %s (%s)", plan.describe(), bytes_per_device)
    return plan


def allocation_for_donor(donor_device: str) -> str:
    """The allocation that stores every swapped unit on ``donor_device``: ``"DEVICE,*"``.

    Lets a single ``donor_device`` option share the allocation machinery.

    Raises:
        BlockSwapConfigError: not a device an allocation can name.
    """
    if not isinstance(donor_device, str):
        raise BlockSwapConfigError(
            f"donor_device must be a device name such as 'cpu' or 'cuda:1', got "
            f"{donor_device!r}"
        )
    return f"{normalize_device(donor_device)},*"


def _device_or_none(text: str) -> str | None:
    if not isinstance(text, str):
        return None
    match = _DEVICE.fullmatch(text.strip().lower())
    if match is None:
        return None
    if not match.group(0).startswith("cuda"):
        return "cpu"
    return f"cuda:{int(match.group('index') or 0)}"


def _parse_entry(text: str) -> tuple[AllocationEntry, Fraction]:
    """One entry, and its amount as an exact fraction (the percentages' sum is checked with
    it, so 33.3% + 33.3% + 33.4% is exactly 100%)."""
    parts = text.split(",")
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise BlockSwapConfigError(
            f"allocation entry {text!r} is not DEVICE,AMOUNT (entries are separated by ';'), "
            f"e.g. {EXAMPLE!r}"
        )
    device_text, amount_text = parts[0].strip(), parts[1].strip().lower()
    device = _device_or_none(device_text)
    if device is None:
        raise BlockSwapConfigError(
            f"allocation entry {text!r} names an unknown device {device_text!r}; name cpu or "
            f"cuda:N (cuda:0 is the first GPU), e.g. {EXAMPLE!r}"
        )
    if amount_text == "*":
        return AllocationEntry(device, "rest", 0.0), Fraction(0)
    match = _AMOUNT.fullmatch(amount_text)
    if match is None:
        raise BlockSwapConfigError(
            f"allocation entry {text!r} has amount {amount_text!r}; write a size such as "
            f"8gb or 2.5gb, a percentage such as 25%, or * for the rest, e.g. {EXAMPLE!r}"
        )
    number, unit = match.group("number"), match.group("unit")
    value = float(number)
    if not math.isfinite(value) or value < 0:
        raise BlockSwapConfigError(
            f"allocation entry {text!r} has amount {amount_text!r}; amounts must be finite "
            f"and not negative, e.g. {EXAMPLE!r}"
        )
    exact = Fraction(number)
    if unit == "%":
        return AllocationEntry(device, "percent", value), exact
    if unit not in UNITS:
        problem = f"has no unit in {amount_text!r}" if not unit else f"has unknown unit {unit!r}"
        raise BlockSwapConfigError(
            f"allocation entry {text!r} {problem}; use b, kb, mb, gb or tb (binary: "
            f"1gb = 2**30 bytes), % or *, e.g. {EXAMPLE!r}"
        )
    nbytes = math.floor(exact * UNITS[unit])  # units are whole bytes: a fraction never fits
    if nbytes > MAX_AMOUNT_BYTES:
        raise BlockSwapConfigError(
            f"allocation entry {text!r} asks for {amount_text}, more than any device has; "
            f"use * for 'the rest', e.g. {EXAMPLE!r}"
        )
    return AllocationEntry(device, "bytes", float(nbytes)), exact


def _fixed_bytes(entry: AllocationEntry, total: int) -> int:
    if entry.kind == "percent":
        # repr gives back the decimal the user wrote, so 25% of 4 bytes is exactly 1
        return math.floor(Fraction(repr(entry.value)) * total / 100)
    return int(entry.value)


def _check_free(entry: AllocationEntry, nbytes: int, free: int) -> None:
    if nbytes > free:
        room = max(0, free) * 100 // GIB  # hundredths of a GiB, rounded down: it fits
        most = f"{room // 100}.{room % 100:02d}gb"
        fix = (
            f"give it at most {most}, e.g. '{entry.device},{most};cpu,*'"
            if entry.device != "cpu"
            else f"give cpu at most {most} and another device the rest, e.g. 'cuda:1,*;cpu,{most}'"
        )
        raise BlockSwapConfigError(
            f"allocation entry {format_allocation([entry])!r} puts {nbytes} bytes "
            f"({_gib(nbytes)}) on {entry.device}, which has {free} bytes ({_gib(free)}) free; "
            f"{fix}"
        )


def _leftover_fix(entries: tuple[AllocationEntry, ...], compute: str) -> str:
    """How to place every unit: a '*' named last takes whatever the others leave."""
    star = next((entry for entry in entries if entry.kind == "rest"), None)
    if star is not None:
        fixed = [entry for entry in entries if entry is not star] + [star]
        return f"put the '*' entry last, so it takes what the others leave: {format_allocation(fixed)!r}"
    if compute != "cpu" and not any(entry.device == "cpu" for entry in entries):
        return f"add cpu,* to keep the rest in host memory: '{format_allocation(entries)};cpu,*'"
    # cpu named with an amount (or computing on cpu): that device, or the last, takes the rest
    last = next((e for e in entries if e.device == "cpu"), entries[-1])
    fixed = [entry for entry in entries if entry is not last]
    fixed.append(AllocationEntry(last.device, "rest", 0.0))
    return f"give {last.device} '*' instead of an amount: {format_allocation(fixed)!r}"


def _gib(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB"


def _plain(value: float) -> str:
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text
