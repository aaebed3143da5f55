"""The donor allocation string (issue #19): parsing, planning, and describe() round trips.

Pure Python, no torch, no GPU. The property tests keep hypothesis' database off (nothing is
written into the repository) and stay small: the whole file runs in a few seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from comfyui_wan_blockswap.wan_blockswap.donor_allocation import (
    DEFAULT_DONOR,
    EXAMPLE,
    AllocationEntry,
    StoragePlan,
    allocation_for_donor,
    format_allocation,
    normalize_device,
    parse_allocation,
    plan_storage,
)
from comfyui_wan_blockswap.wan_blockswap.errors import BlockSwapConfigError

GIB = 2**30
MIB = 2**20
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def _entry(device: str, kind: str, value: float = 0.0) -> AllocationEntry:
    return AllocationEntry(device, kind, float(value))


def _plan(text: str, units, compute: str = "cuda:0", available=None) -> StoragePlan:
    return plan_storage(parse_allocation(text), units, compute, available)


# ---------------------------------------------------------------------------------------------
# Parsing valid strings
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, nbytes",
    [
        ("cpu,8gb", 8 * GIB),
        ("cpu,8g", 8 * GIB),
        ("cpu,8gib", 8 * GIB),
        ("cpu,2.5gb", 5 * GIB // 2),
        ("cpu,.5gb", GIB // 2),
        ("cpu,512mb", 512 * MIB),
        ("cpu,512m", 512 * MIB),
        ("cpu,512mib", 512 * MIB),
        ("cpu,4kb", 4096),
        ("cpu,4k", 4096),
        ("cpu,4kib", 4096),
        ("cpu,1tb", 2**40),
        ("cpu,1t", 2**40),
        ("cpu,1tib", 2**40),
        ("cpu,1000b", 1000),
        ("cpu,0gb", 0),
        ("cpu,1.5b", 1),  # units are whole bytes: a fraction never holds one more
        ("cpu,8 gb", 8 * GIB),
        ("cpu,1e1mb", 10 * MIB),
    ],
)
def test_byte_amounts_use_binary_units(text, nbytes):
    (entry,) = parse_allocation(text)
    assert entry == _entry("cpu", "bytes", nbytes)
    assert entry.value == int(entry.value)


@pytest.mark.parametrize(
    "text, value",
    [("cuda:1,25%", 25.0), ("cuda:1,12.5%", 12.5), ("cuda:1,100%", 100.0), ("cuda:1,0 %", 0.0)],
)
def test_percent_amounts(text, value):
    assert parse_allocation(text) == (_entry("cuda:1", "percent", value),)


def test_star_and_mixed_entries_keep_their_order():
    assert parse_allocation("cpu,*") == (_entry("cpu", "rest"),)
    assert parse_allocation("cuda:1,8gb;cuda:2,25%;cpu,*") == (
        _entry("cuda:1", "bytes", 8 * GIB),
        _entry("cuda:2", "percent", 25),
        _entry("cpu", "rest"),
    )
    assert parse_allocation("cpu,*;cuda:3,1gb")[0].device == "cpu"


def test_whitespace_case_and_a_trailing_semicolon():
    expected = (
        _entry("cuda:0", "bytes", 8 * GIB),
        _entry("cuda:2", "rest"),
        _entry("cpu", "percent", 10),
    )
    assert parse_allocation("  CUDA , 8GB ;Cuda : 2,* ;\tCPU,10 %; ") == expected
    assert parse_allocation("cuda:0,8gb;cuda:2,*;cpu,10%;") == expected


def test_device_names_are_normalised():
    assert normalize_device("cuda") == "cuda:0"
    assert normalize_device("CUDA:07") == "cuda:7"
    assert normalize_device(" Cpu ") == "cpu"
    assert parse_allocation("cuda,1gb")[0].device == "cuda:0"


def test_percentages_may_reach_exactly_100_and_the_star_then_gets_nothing():
    entries = parse_allocation("cuda:1,33.3%;cuda:2,33.3%;cuda:3,33.4%;cpu,*")
    assert [e.kind for e in entries] == ["percent"] * 3 + ["rest"]
    plan = plan_storage(entries, [10] * 10, "cuda:0")
    assert plan.bytes_per_device == {"cuda:1": 30, "cuda:2": 30, "cuda:3": 30, "cpu": 10}
    # exact percentages: the star gets 0 bytes
    plan = _plan("cuda:1,50%;cuda:2,50%;cpu,*", [10] * 4)
    assert plan.bytes_per_device["cpu"] == 0
    assert plan.describe() == "cuda:1,20b;cuda:2,*"  # 0.01gb would take in a third unit


def test_format_allocation_gives_the_entries_back():
    text = "cuda:1,8gb;cuda:2,12.5%;cuda:3,1536mb;cpu,*"
    entries = parse_allocation(text)
    assert format_allocation(entries) == text
    assert parse_allocation(format_allocation(entries)) == entries
    assert format_allocation(parse_allocation("cpu,1000b")) == "cpu,1000b"


# ---------------------------------------------------------------------------------------------
# Parsing errors: each names the entry and the fix
# ---------------------------------------------------------------------------------------------


def _error(text: str) -> str:
    with pytest.raises(BlockSwapConfigError) as caught:
        parse_allocation(text)
    return str(caught.value)


@pytest.mark.parametrize("text", ["", "   ", ";", " ; "])
def test_empty_allocation(text):
    message = _error(text)
    assert "empty" in message and EXAMPLE in message


@pytest.mark.parametrize("text", ["cpu,1gb;;cuda:1,*", ";cpu,*"])
def test_empty_entry_in_the_middle(text):
    message = _error(text)
    assert repr(text) in message and "empty entry" in message and "';'" in message


@pytest.mark.parametrize(
    "entry", ["cpu", "cpu,1gb,2gb", ",8gb", "cpu,", "cpu 8gb", "cpu:8gb", "cpu,8 g b", "cpu,gb"]
)
def test_malformed_entries(entry):
    message = _error(f"cuda:1,1gb;{entry};cuda:2,*")
    assert repr(entry) in message
    assert "DEVICE,AMOUNT" in message or "write a size" in message
    assert EXAMPLE in message


@pytest.mark.parametrize("device", ["gpu", "mps", "cuda:", "cuda:-1", "cuda:x", "cuda1", "xpu:0"])
def test_unknown_devices(device):
    message = _error(f"{device},8gb")
    assert repr(f"{device},8gb") in message
    assert "unknown device" in message and "cuda:N" in message and EXAMPLE in message


@pytest.mark.parametrize("amount, unit", [("8zb", "'zb'"), ("8gigs", "'gigs'"), ("8pb", "'pb'")])
def test_unknown_units(amount, unit):
    message = _error(f"cpu,{amount}")
    assert f"'cpu,{amount}'" in message and unit in message
    assert "gb" in message and EXAMPLE in message


def test_a_bare_number_needs_a_unit():
    message = _error("cpu,8")
    assert "'cpu,8'" in message and "no unit" in message and "gb" in message


@pytest.mark.parametrize(
    "amount", ["-1gb", "-0.5%", "nangb", "nan%", "infgb", "inf%", "-inf gb", "infinity mb"]
)
def test_negative_and_non_finite_amounts(amount):
    message = _error(f"cpu,{amount}")
    assert f"'cpu,{amount}'" in message
    assert "finite" in message and "negative" in message and EXAMPLE in message


def test_absurd_amounts():
    message = _error("cpu,1e300tb")
    assert "'cpu,1e300tb'" in message and "*" in message
    assert parse_allocation("cpu,1e-999gb")[0].value == 0
    # a huge exponent is refused before it is computed (it would take minutes)
    assert "write a size" in _error("cpu,1e-999999999gb")


@pytest.mark.parametrize(
    "text, first, second",
    [
        ("cpu,1gb;CPU,*", "cpu,1gb", "CPU,*"),
        ("cuda,1gb;cuda:0,2gb", "cuda,1gb", "cuda:0,2gb"),
        ("cuda:1,1gb;cpu,*;cuda:1,5%", "cuda:1,1gb", "cuda:1,5%"),
    ],
)
def test_a_device_named_twice(text, first, second):
    message = _error(text)
    assert repr(first) in message and repr(second) in message
    assert "once" in message and EXAMPLE in message


def test_more_than_one_star():
    message = _error("cuda:1,*;cpu,*")
    assert "'cuda:1,*'" in message and "'cpu,*'" in message
    assert "amount" in message and EXAMPLE in message


@pytest.mark.parametrize(
    "text, entry", [("cuda:1,60%;cpu,50%", "cpu,50%"), ("cpu,100.5%", "cpu,100.5%")]
)
def test_percentages_over_100(text, entry):
    message = _error(text)
    assert repr(entry) in message and "100%" in message and ",*" in message


def test_not_a_string():
    with pytest.raises(BlockSwapConfigError, match="string"):
        parse_allocation(None)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------


def test_donors_fill_in_the_order_named_and_a_unit_that_does_not_fit_spills():
    plan = _plan("cuda:1,2.5gb;cuda:2,1gb;cpu,*", [GIB] * 6)
    assert plan.devices == ("cuda:1", "cuda:1", "cuda:2", "cpu", "cpu", "cpu")
    assert plan.bytes_per_device == {"cuda:1": 2 * GIB, "cuda:2": GIB, "cpu": 3 * GIB}
    assert plan.units_on("cuda:2") == (2,)
    assert plan.units_on("CPU") == (3, 4, 5)


def test_a_unit_is_never_split_and_later_units_do_not_jump_back():
    # unit 1 (3 GiB) does not fit cuda:1's remaining 2 GiB; unit 2 (1 GiB) would, but donors
    # are filled in runs, so it follows unit 1
    plan = _plan("cuda:1,3gb;cpu,*", [GIB, 3 * GIB, GIB])
    assert plan.devices == ("cuda:1", "cpu", "cpu")


def test_a_donor_too_small_for_the_next_unit_is_skipped():
    plan = _plan("cuda:1,1gb;cuda:2,4gb;cpu,*", [2 * GIB, 2 * GIB, 2 * GIB])
    assert plan.devices == ("cuda:2", "cuda:2", "cpu")
    assert plan.bytes_per_device["cuda:1"] == 0
    assert plan.describe() == "cuda:2,4.00gb;cpu,*"


def test_percent_is_of_the_swapped_bytes():
    plan = _plan("cuda:1,25%;cpu,*", [GIB] * 8)
    assert plan.devices == ("cuda:1",) * 2 + ("cpu",) * 6


def test_a_star_named_first_leaves_the_later_amounts():
    plan = _plan("cpu,*;cuda:1,2gb", [GIB] * 5)
    assert plan.devices == ("cpu",) * 3 + ("cuda:1",) * 2
    plan = _plan("cpu,*;cuda:1,50%", [GIB] * 4)
    assert plan.devices == ("cpu", "cpu", "cuda:1", "cuda:1")


def test_no_units_and_zero_byte_units():
    plan = _plan("cuda:1,1gb;cpu,*", [])
    assert plan.devices == () and plan.bytes_per_device == {"cuda:1": 0, "cpu": 0}
    assert plan.describe() == "cuda:1,*"
    assert _plan("cuda:1,0gb;cpu,*", [0, 0, 1]).devices == ("cuda:1", "cuda:1", "cpu")


def test_leftover_units_name_the_bytes_and_suggest_cpu_star():
    with pytest.raises(BlockSwapConfigError) as caught:
        _plan("cuda:1,2gb", [GIB] * 5)
    message = str(caught.value)
    assert str(3 * GIB) in message and "3.00 GiB" in message
    assert "cpu,*" in message and "'cuda:1,2gb;cpu,*'" in message


def test_leftover_with_cpu_amount_or_misplaced_star_suggests_the_fix():
    with pytest.raises(BlockSwapConfigError, match=r"give cpu '\*'.*'cuda:1,1gb;cpu,\*'"):
        _plan("cpu,1gb;cuda:1,1gb", [GIB] * 3)
    with pytest.raises(BlockSwapConfigError, match=r"'\*' entry last.*'cuda:1,50%;cpu,\*'"):
        _plan("cpu,*;cuda:1,50%", [3 * GIB] * 3)  # 4.5 GiB each side: the third unit is left


def test_the_compute_device_cannot_be_a_donor():
    for text, compute in [
        ("cuda:0,8gb;cpu,*", "cuda:0"),
        ("cuda:0,8gb;cpu,*", "cuda"),
        ("cuda,8gb;cpu,*", "cuda:0"),
        ("cpu,*", "cpu"),
        ("cuda:1,*", "CUDA:1"),
    ]:
        with pytest.raises(BlockSwapConfigError) as caught:
            _plan(text, [GIB], compute)
        message = str(caught.value)
        assert "the device the model runs on" in message
        assert "vram_budget_gb" in message and EXAMPLE in message
    with pytest.raises(BlockSwapConfigError, match="'cuda:0,8gb'"):
        _plan("cuda:0,8gb;cpu,*", [GIB], "cuda:0")


def test_available_memory_limits_fixed_amounts():
    with pytest.raises(BlockSwapConfigError) as caught:
        _plan("cuda:1,8gb;cpu,*", [GIB] * 3, available={"cuda:1": 6 * GIB})
    message = str(caught.value)
    assert str(8 * GIB) in message and str(6 * GIB) in message
    assert "'cuda:1,8gb'" in message and "'cuda:1,6.00gb;cpu,*'" in message
    # a percentage is resolved first: 50% of 10 GiB does not fit 4 GiB
    with pytest.raises(BlockSwapConfigError, match=str(5 * GIB)):
        _plan("cuda:1,50%;cpu,*", [GIB] * 10, available={"cuda:1": 4 * GIB})
    # within the limit, or a device without a limit: fine
    plan = _plan("cuda:1,4gb;cpu,*", [GIB] * 10, available={"cuda:1": 4 * GIB, "cuda:2": 0})
    assert plan.bytes_per_device == {"cuda:1": 4 * GIB, "cpu": 6 * GIB}


def test_available_memory_limits_what_the_star_gets():
    with pytest.raises(BlockSwapConfigError) as caught:
        _plan("cuda:1,*", [GIB] * 3, available={"cuda": GIB, "cuda:1": 2 * GIB})
    message = str(caught.value)
    assert str(3 * GIB) in message and str(2 * GIB) in message and "'cuda:1,*'" in message
    with pytest.raises(BlockSwapConfigError, match="give cpu at most 1.00gb"):
        _plan("cpu,*", [GIB] * 3, available={"cpu": GIB})
    assert _plan("cpu,*", [GIB] * 3, available={"cpu": 3 * GIB}).devices == ("cpu",) * 3


def test_unit_sizes_must_be_byte_counts():
    with pytest.raises(ValueError, match="unit_bytes"):
        _plan("cpu,*", [1, -1])
    with pytest.raises(ValueError, match="unit_bytes"):
        _plan("cpu,*", [1.5])


def test_an_empty_entry_list_and_a_bad_compute_device():
    with pytest.raises(BlockSwapConfigError, match="names no device"):
        plan_storage((), [1], "cuda:0")
    with pytest.raises(BlockSwapConfigError, match="unknown device 'tpu'"):
        _plan("cpu,*", [1], "tpu")


# ---------------------------------------------------------------------------------------------
# describe(): the allocation actually used, pasted back
# ---------------------------------------------------------------------------------------------


def test_describe_rounds_up_to_hundredths_of_a_gib():
    units = [700 * MIB] * 11 + [GIB] * 4  # 7.52 GiB (7.51.. rounded up) on cuda:1
    plan = _plan("cuda:1,7.6gb;cpu,*", units)
    assert plan.bytes_per_device["cuda:1"] == 11 * 700 * MIB
    assert plan.describe() == "cuda:1,7.52gb;cpu,*"
    assert _plan(plan.describe(), units).devices == plan.devices


def test_describe_writes_exact_bytes_where_rounding_would_take_in_the_next_unit():
    units = [1000] * 6  # far below 0.01 GiB: rounding up would swallow every unit
    plan = _plan("cuda:1,2000b;cuda:2,2500b;cpu,*", units)
    assert plan.describe() == "cuda:1,2000b;cuda:2,2000b;cpu,*"
    assert _plan(plan.describe(), units).devices == plan.devices


def _amount(draw, kind: str, total: int) -> str:
    if kind == "gb":
        return f"{draw(st.integers(0, 2000)) / 100:.2f}gb"
    if kind == "b":
        return f"{draw(st.integers(0, max(total, 1)))}b"
    return f"{draw(st.integers(0, 25))}%"  # four of them stay within 100%


@st.composite
def _allocation(draw, total: int) -> str:
    """A few donors with mixed amounts, usually with a '*' somewhere (mostly last)."""
    donors = draw(st.permutations(["cuda:1", "cuda:2", "cuda:3", "cpu"]))
    donors = donors[: draw(st.integers(1, 4))]
    star = draw(st.sampled_from([None, len(donors) - 1, len(donors) - 1, 0]))
    parts = []
    for index, device in enumerate(donors):
        if index == star:
            parts.append(f"{device},*")
        else:
            parts.append(
                f"{device},{_amount(draw, draw(st.sampled_from(['gb', 'b', '%'])), total)}"
            )
    return ";".join(parts)


@st.composite
def _units_and_allocation(draw, small: bool):
    if small:  # smaller than the 0.01 GiB rounding: exercises the exact-bytes fallback
        units = draw(st.lists(st.integers(0, 5 * MIB), max_size=10))
    else:  # real blocks: 0.01 GiB .. 4 GiB
        units = draw(st.lists(st.integers(GIB // 100 + 1, 4 * GIB), max_size=10))
    return units, draw(_allocation(sum(units)))


def _round_trip(units, text):
    try:
        plan = _plan(text, units)
    except BlockSwapConfigError:
        assume(False)  # units left over: nothing to describe
    described = plan.describe()
    again = _plan(described, units)
    assert again.devices == plan.devices, (text, described)
    assert again.describe() == described
    # the stored bytes add up, and every donor that got a unit is in the description
    assert sum(plan.bytes_per_device.values()) == sum(units)
    assert {d for d in plan.devices} == {p.split(",")[0] for p in described.split(";")} or not units


@PROPERTY
@given(_units_and_allocation(small=False))
def test_describe_round_trips_with_real_block_sizes(case):
    units, text = case
    _round_trip(units, text)
    # and the description is in hundredths of a GiB, as a user would type it
    described = _plan(text, units).describe()
    assert all(p.endswith("gb") or p.endswith("*") for p in described.split(";"))


@PROPERTY
@given(_units_and_allocation(small=True))
def test_describe_round_trips_with_tiny_units(case):
    _round_trip(*case)


@PROPERTY
@given(_units_and_allocation(small=False))
def test_format_allocation_round_trips(case):
    entries = parse_allocation(case[1])
    assert parse_allocation(format_allocation(entries)) == entries


# ---------------------------------------------------------------------------------------------
# A single donor device, and the import boundary
# ---------------------------------------------------------------------------------------------


def test_allocation_for_donor():
    assert DEFAULT_DONOR == "cpu"
    assert allocation_for_donor(DEFAULT_DONOR) == "cpu,*"
    assert allocation_for_donor("CUDA") == "cuda:0,*"
    assert allocation_for_donor(" cuda:2 ") == "cuda:2,*"
    assert _plan(allocation_for_donor("cuda:1"), [GIB] * 3).devices == ("cuda:1",) * 3
    for bad in ["gpu", "", "cuda:-1", None, 1]:
        with pytest.raises(BlockSwapConfigError, match="cuda:1"):
            allocation_for_donor(bad)  # type: ignore[arg-type]


def test_the_module_imports_no_torch():
    """The module itself stays pure: loaded alone (not through the package, whose engine
    imports torch), it pulls in no torch."""
    code = (
        "import importlib.util, sys, types\n"
        "from pathlib import Path\n"
        "root = Path(sys.argv[1]) / 'wan_blockswap'\n"
        "pkg = types.ModuleType('engine'); pkg.__path__ = [str(root)]; sys.modules['engine'] = pkg\n"
        "for name in ('errors', 'donor_allocation'):\n"
        "    spec = importlib.util.spec_from_file_location(f'engine.{name}', root / f'{name}.py')\n"
        "    module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module\n"
        "    spec.loader.exec_module(module)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(sys.modules['engine.donor_allocation'].allocation_for_donor('cuda'))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cuda:0,*"
