"""Models built from a checkpoint are bounded by the file (issue #15).

Every count, shape and config value the loader builds a model from comes from a file off
the internet. For generated files of at most 4 MB -- ComfyUI-layout Wan files with stray or
absurd block indices, zero-element tensors of huge dimensions, missing keys and wrong ranks,
and diffusers folders whose config.json holds absurd counts, absurd sizes or values of the
wrong type -- ``load_swapped`` either loads the model or raises :class:`CheckpointError`
naming the file, within a few seconds, its peak RSS growing by at most 256 MB. Files are
written as a header followed by a hole (sparse), so only the header costs disk or time.

Budget: well under a minute on two cores (BOUNDED_SKELETON_EXAMPLES sets a longer run);
hypothesis' database is off so nothing is written into the repository.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import struct
import tempfile
import time

import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from comfyui_wan_blockswap.callbacks import skeleton
from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError, open_checkpoint
from comfyui_wan_blockswap.callbacks.lazy_loader import load_swapped
from comfyui_wan_blockswap.callbacks.skeleton import CheckpointMismatchError, build_skeleton
from comfyui_wan_blockswap.model_configs.wan import (
    comfy_state_shapes,
    diffusers_config_from_comfy_shapes,
)
from comfyui_wan_blockswap.wan_blockswap.errors import BlockSwapConfigError
from writers import COMFY_PREFIX

diffusers = pytest.importorskip("diffusers")

FUZZ = settings(
    max_examples=int(os.environ.get("BOUNDED_SKELETON_EXAMPLES", "150")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_FILE_BYTES = 4 * 2**20
MAX_RSS_GROWTH = 256 * 2**20
WATCHDOG_S = 5

# The smallest real Wan shape: hidden size 128 (one head), two blocks; about 1.2 MB in bf16.
SHAPES = comfy_state_shapes(128, 256, 2, text_dim=32, freq_dim=16)
HUGE = st.sampled_from([10**7, 10**8, 10**12, 2**62, 10**30])


# ---------------------------------------------------------------------------------------------
# The property
# ---------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


@contextlib.contextmanager
def _bounded():
    """Fail instead of hanging (SIGALRM) or growing: the peak RSS (VmHWM, reset first through
    /proc/self/clear_refs) may grow by at most MAX_RSS_GROWTH. POSIX/Linux only; elsewhere
    the checks are skipped."""
    measure = os.path.exists("/proc/self/clear_refs")
    if measure:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")  # peak RSS := current RSS
        before = _status_bytes("VmRSS")
    alarm = hasattr(signal, "SIGALRM")
    if alarm:

        def on_alarm(signum, frame):
            raise TimeoutError(f"building the model took over {WATCHDOG_S} s")

        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(WATCHDOG_S)
    try:
        yield
    finally:
        if alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
    if measure:
        growth = _status_bytes("VmHWM") - before
        assert growth < MAX_RSS_GROWTH, f"peak RSS grew by {growth / 2**20:.0f} MiB"


def load_or_refuse(path: str, named: str) -> str:
    """The property: "loaded", or "refused" with a CheckpointError naming ``named`` (the
    file or its config.json). A model that loads but has no block to swap may instead be
    refused by the swap options (BlockSwapConfigError): the file is fine, the option is not."""
    with _bounded():
        try:
            model, swap, _ = load_swapped(path, device="cpu", blocks_to_swap=1)
        except CheckpointError as error:
            assert named in str(error), str(error)
            return "refused"
        except BlockSwapConfigError as error:
            assert "blocks_to_swap must be in 0..0" in str(error), str(error)
            return "no blocks"
    swap.remove()
    return "loaded"


ITEMSIZE = {"BF16": 2, "F32": 4, "U8": 1}


def data_bytes(entries: dict[str, tuple[str, list[int]]]) -> int:
    return sum(ITEMSIZE[dtype] * math.prod(shape) for dtype, shape in entries.values())


def write_header_only(path: str, entries: dict[str, tuple[str, list[int]]]) -> int:
    """A safetensors file of ``name -> (dtype, shape)`` whose data is a hole, at most
    MAX_FILE_BYTES in all; returns its size."""
    header, offset = {}, 0
    for name, (dtype, shape) in entries.items():
        nbytes = ITEMSIZE[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    assert 8 + len(blob) + offset <= MAX_FILE_BYTES
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(blob)) + blob)
        handle.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


# ---------------------------------------------------------------------------------------------
# ComfyUI-layout files: the model's size comes from the tensor shapes
# ---------------------------------------------------------------------------------------------

_small_shape = st.lists(st.integers(1, 64), min_size=0, max_size=3)
_zero_shape = st.one_of(
    st.tuples(st.just(0), HUGE).map(list),
    st.tuples(HUGE, st.just(0)).map(list),
    st.tuples(HUGE, st.just(0), HUGE).map(list),
    st.just([0]),
)
_index = st.one_of(st.integers(0, 4), HUGE, st.sampled_from(["01", "x", "-1", "٣", ""]))
_mutation = st.one_of(
    st.tuples(st.just("drop"), st.sampled_from(sorted(SHAPES))),
    st.tuples(st.just("zero"), st.sampled_from(sorted(SHAPES)), _zero_shape),
    st.tuples(st.just("reshape"), st.sampled_from(sorted(SHAPES)), _small_shape),
    st.tuples(
        st.just("add"),
        st.sampled_from(["blocks.", "vace_blocks."]),
        _index,
        st.sampled_from(["ffn.0.weight", "modulation", "x"]),
        _small_shape,
    ),
    st.tuples(st.just("vace"), st.integers(1, 3)),
)


def _mutate(shapes: dict[str, list[int]], mutation: tuple) -> None:
    kind = mutation[0]
    if kind == "drop":
        shapes.pop(mutation[1], None)
    elif kind in ("zero", "reshape"):
        shapes[mutation[1]] = mutation[2]
    elif kind == "add":
        _, prefix, index, suffix, shape = mutation
        shapes[f"{prefix}{index}.{suffix}"] = shape
    else:  # vace blocks shaped like main block 0, and their patch embedding
        for i in range(mutation[1]):
            for key, shape in SHAPES.items():
                if key.startswith("blocks.0."):
                    shapes["vace_" + key.replace("blocks.0.", f"blocks.{i}.")] = list(shape)
        shapes["vace_patch_embedding.weight"] = [128, 96, 1, 2, 2]


@FUZZ
@given(
    mutations=st.lists(_mutation, max_size=3),
    prefix=st.sampled_from([COMFY_PREFIX, ""]),
)
def test_comfy_layout_files_load_or_are_refused_within_bounds(mutations, prefix):
    shapes = {key: list(shape) for key, shape in SHAPES.items()}
    for mutation in mutations:
        _mutate(shapes, mutation)
    entries = {prefix + k: ("BF16", s) for k, s in shapes.items()}
    assume(data_bytes(entries) <= MAX_FILE_BYTES - 2**16)  # room for the header
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "wan.safetensors")
        write_header_only(path, entries)
        outcome = load_or_refuse(path, "wan.safetensors")
    event(outcome)
    if not mutations:
        assert outcome == "loaded"


# ---------------------------------------------------------------------------------------------
# Diffusers folders: the model's size comes from config.json
# ---------------------------------------------------------------------------------------------


def _diffusers_base(vace: bool) -> tuple[dict, dict[str, list[int]]]:
    """A tiny config and the state shapes of the model it builds (diffusers key names)."""
    config = diffusers_config_from_comfy_shapes(SHAPES)
    cls = diffusers.WanTransformer3DModel
    if vace:
        cls = diffusers.WanVACETransformer3DModel
        config.update(vace_layers=[0], vace_in_channels=96)
    with torch.device("meta"):
        model = cls(**config)
    shapes = {k: list(t.shape) for k, t in model.state_dict(keep_vars=True).items()}
    config = {"_class_name": cls.__name__, **config, "patch_size": list(config["patch_size"])}
    return config, shapes


BASES = {vace: _diffusers_base(vace) for vace in (False, True)}
CONFIG_KEYS = sorted(BASES[True][0]) + ["rope_max_seq_len", "pos_embed_seq_len", "image_dim"]
_json_scalar = st.one_of(
    st.integers(-3, 300),
    HUGE,
    HUGE.map(lambda v: -v),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.none(),
    st.booleans(),
)
_json_value = st.recursive(
    _json_scalar,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
_class_name = st.sampled_from(
    [
        "FluxTransformer2DModel",
        "HunyuanVideoTransformer3DModel",
        "CosmosTransformer3DModel",
        "AutoencoderKL",
        "DiffusionPipeline",
        "__class__",
        "no_such_class",
        "load_image",
    ]
)


@FUZZ
@given(
    vace=st.booleans(),
    changes=st.lists(
        st.one_of(
            st.tuples(st.sampled_from(CONFIG_KEYS), _json_value),
            st.tuples(st.just("_class_name"), st.one_of(_class_name, _json_scalar)),
            st.tuples(st.sampled_from(["num_layers", "vace_layers"]), HUGE),
            st.tuples(st.just("vace_layers"), st.lists(st.integers(0, 10**9), max_size=5)),
        ),
        max_size=3,
    ),
    drop=st.sets(st.integers(0, 400), max_size=2),
    whole=st.one_of(st.none(), st.just([]), st.just("text"), st.just(7)),
)
def test_diffusers_folders_load_or_are_refused_within_bounds(vace, changes, drop, whole):
    config, shapes = BASES[vace]
    config = dict(config)
    for key, value in changes:
        config[key] = value
    keys = sorted(shapes)
    kept = {k: ("BF16", shapes[k]) for i, k in enumerate(keys) if i not in drop}
    with tempfile.TemporaryDirectory() as folder:
        write_header_only(os.path.join(folder, "diffusion_pytorch_model.safetensors"), kept)
        with open(os.path.join(folder, "config.json"), "w") as handle:
            json.dump(config if whole is None else whole, handle)
        outcome = load_or_refuse(folder, folder)
    event(outcome)
    if not changes and not drop and whole is None:
        assert outcome == "loaded"


# ---------------------------------------------------------------------------------------------
# The reviewer's cases, by name
# ---------------------------------------------------------------------------------------------


def _comfy_file(folder, **changes) -> str:
    shapes = {key: list(shape) for key, shape in SHAPES.items()}
    for key, shape in changes.items():
        if shape is None:
            del shapes[key]
        else:
            shapes[key] = shape
    path = os.path.join(folder, "wan.safetensors")
    write_header_only(path, {COMFY_PREFIX + k: ("BF16", s) for k, s in shapes.items()})
    return path


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"blocks.100000000.x": [1]}, r"numbered up to 100000000: no blocks\.2\b"),
        ({"blocks.3.x": [1]}, r"numbered up to 3: no blocks\.2\b"),
        ({"text_embedding.0.weight": [0, 10**7]}, r"text_embedding\.0\.weight.*no elements"),
        ({"text_embedding.0.weight": [10**7, 0]}, r"text_embedding\.0\.weight.*no elements"),
        ({"head.modulation": [0, 2, 2**40]}, r"head\.modulation.*no elements"),
        ({"patch_embedding.weight": None}, r"no tensor 'patch_embedding\.weight'"),
        ({"blocks.0.ffn.0.weight": None}, r"no tensor 'blocks\.0\.ffn\.0\.weight'"),
        ({"patch_embedding.weight": [128, 16]}, r"patch_embedding\.weight.*not 5 dimensions"),
        ({"head.modulation": [1, 2, 100]}, r"hidden size 100.*multiple of 128"),
        ({"head.head.weight": [64, 128, 1]}, r"head\.head\.weight.*not 2 dimensions"),
        ({"vace_blocks.5.x": [1], "vace_patch_embedding.weight": [128, 96, 1, 2, 2]}, "vace"),
    ],
)
def test_malformed_comfy_files_are_refused_naming_the_problem(tmp_path, changes, message):
    path = _comfy_file(tmp_path, **changes)
    with _bounded(), pytest.raises(CheckpointMismatchError, match=message) as info:
        load_swapped(path, device="cpu", blocks_to_swap=1)
    assert "wan.safetensors" in str(info.value) and "corrupt" in str(info.value)


def _diffusers_folder(folder, vace=False, **changes) -> str:
    config, shapes = BASES[vace]
    write_header_only(
        os.path.join(folder, "diffusion_pytorch_model.safetensors"),
        {k: ("BF16", s) for k, s in shapes.items()},
    )
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump({**config, **changes}, handle)
    return str(folder)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_layers": 10**8}, r"num_layers = 100000000 asks for more layers"),
        ({"vace_layers": [0, 10**9]}, r"vace_layers = .* asks for more layers"),
        ({"rope_max_seq_len": 10**8}, r"buffers alone would take \d+ MiB"),
        ({"rope_max_seq_len": 10**7, "num_layers": 2}, r"buffers alone"),
        ({"ffn_dim": 10**9}, r"ffn\.net\.0\.proj\.weight is \[1000000000, 128\]"),
        ({"text_dim": 10**7}, r"linear_1\.weight is \[128, 10000000\]"),
        ({"num_attention_heads": 10**9}, r"failed \(RuntimeError: Storage size"),
        ({"num_attention_heads": 2}, r"model's scale_shift_table is \[1, 2, 256\]"),
        ({"patch_size": [1, 10**10, 2]}, r"is \[128, 16, 1, 10000000000, 2\]"),
        ({"patch_size": [1, 2**62, 2**62]}, r"building a WanTransformer3DModel.*failed"),
        ({"num_layers": "40"}, r"failed \(TypeError"),
        ({"num_layers": 2.5}, r"failed \(TypeError"),
        ({"num_layers": None}, r"failed \(TypeError"),
        ({"num_layers": -1}, r"unexpected keys in the file"),
        ({"_class_name": "DiffusionPipeline"}, r"no diffusers model class"),
        ({"_class_name": "__class__"}, r"no diffusers model class"),
        ({"_class_name": 5}, r"no diffusers model class"),
        ({"_class_name": "FluxTransformer2DModel"}, r"FluxTransformer2DModel with over \d+ \["),
    ],
)
def test_absurd_config_json_is_refused_before_building(tmp_path, changes, message):
    folder = _diffusers_folder(tmp_path, **changes)
    start = time.perf_counter()
    with _bounded(), pytest.raises(CheckpointError, match=message):
        load_swapped(folder, device="cpu", blocks_to_swap=1)
    assert time.perf_counter() - start < WATCHDOG_S


def test_huge_or_nested_config_json_is_refused(tmp_path):
    folder = _diffusers_folder(tmp_path)
    with open(tmp_path / "config.json", "w") as handle:
        handle.write('{"_class_name": "WanTransformer3DModel", "x": "' + "y" * 2**20 + '"}')
    with pytest.raises(CheckpointError, match="over 1 MiB"):
        load_swapped(folder, device="cpu")
    with open(tmp_path / "config.json", "w") as handle:
        handle.write('{"a": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_swapped(folder, device="cpu")


def test_valid_tiny_files_load(tmp_path):
    assert load_or_refuse(_comfy_file(tmp_path), "wan.safetensors") == "loaded"
    for vace in (False, True):
        folder = tmp_path / f"vace{vace}"
        folder.mkdir()
        assert load_or_refuse(_diffusers_folder(folder, vace), str(folder)) == "loaded"


# ---------------------------------------------------------------------------------------------
# Worst cases: a 4 MB header of tensors that cost no byte
# ---------------------------------------------------------------------------------------------


def _many_records(count: int) -> dict[str, tuple[str, list[int]]]:
    return {f"blocks.{i}.z": ("BF16", [0]) for i in range(count)}


def test_a_header_full_of_block_indices_builds_no_more_than_the_file_holds(tmp_path):
    """25,000 contiguous block indices of zero-size tensors say num_layers=25,000: the
    build stops at the first block the file has no tensors for."""
    entries = {COMFY_PREFIX + k: ("BF16", list(s)) for k, s in SHAPES.items()}
    entries.update({COMFY_PREFIX + k: v for k, v in _many_records(25_000).items()})
    path = str(tmp_path / "wan.safetensors")
    size = write_header_only(path, entries)
    assert 2**20 < size <= MAX_FILE_BYTES
    with _bounded(), pytest.raises(CheckpointMismatchError, match=r"with over \d+ \[128\] param"):
        load_swapped(path, device="cpu", blocks_to_swap=1)


def test_a_config_asking_for_every_record_as_a_layer_stops_at_the_first_unfillable(tmp_path):
    config, shapes = BASES[False]
    entries = {k: ("BF16", [0]) for k in shapes} | _many_records(50_000)
    write_header_only(str(tmp_path / "diffusion_pytorch_model.safetensors"), entries)
    with open(tmp_path / "config.json", "w") as handle:
        json.dump({**config, "num_layers": len(entries)}, handle)
    with (
        _bounded(),
        pytest.raises(CheckpointMismatchError, match=r"with over 64 \[.*the file has no tensors"),
    ):
        load_swapped(str(tmp_path), device="cpu", blocks_to_swap=1)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def test_block_count_is_the_number_of_distinct_indices():
    from comfyui_wan_blockswap.model_configs.wan import _count

    assert _count({"blocks.0.a": (1,), "blocks.1.a": (1,), "blocks.1.b": (1,)}, "blocks.") == 2
    # keys whose index is no plain number are left for the key check to name
    assert _count({"blocks.0.a": (1,), "blocks.01.a": (1,), "blocks.x.a": (1,)}, "blocks.") == 1
    assert _count({}, "blocks.") == 0
    with pytest.raises(ValueError, match=r"up to 9: no blocks\.1, blocks\.2"):
        _count({"blocks.0.a": (1,), "blocks.9.a": (1,), "blocks.5.a": (1,)}, "blocks.")


def test_the_build_watch_is_removed_whatever_happens(tmp_path):
    from torch.nn.modules import module as torch_module

    hooks = (
        torch_module._global_parameter_registration_hooks,
        torch_module._global_buffer_registration_hooks,
        torch_module._global_module_registration_hooks,
    )
    before = [len(h) for h in hooks]
    folder = _diffusers_folder(tmp_path, ffn_dim=10**9)
    with open_checkpoint(folder) as checkpoint, pytest.raises(CheckpointMismatchError):
        build_skeleton(checkpoint)
    assert [len(h) for h in hooks] == before
    torch.nn.Linear(3, 3)  # and other code building modules is not watched


def test_buffers_are_bounded_by_twice_the_file_size(tmp_path, monkeypatch):
    """Wan's rotary tables take 1 MiB at the default 1024 positions, under twice this 1.1 MB
    file; at 4096 positions (4 MiB) they are refused once the 64 MiB floor is out of the way."""
    monkeypatch.setattr(skeleton, "MIN_BUFFER_BUDGET", 0)
    assert load_or_refuse(_diffusers_folder(tmp_path), str(tmp_path)) == "loaded"
    folder = _diffusers_folder(tmp_path, rope_max_seq_len=4096)
    with open_checkpoint(folder) as checkpoint, pytest.raises(CheckpointMismatchError) as info:
        build_skeleton(checkpoint)
    assert "buffers alone would take 4 MiB" in str(info.value)
