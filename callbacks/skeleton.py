"""Empty models to load checkpoints into, and the map from model keys to file keys.

A skeleton has its parameters on the meta device (buffers real, as ``accelerate``'s
``init_empty_weights(include_buffers=False)`` leaves them): nothing is allocated until the
loader knows where each tensor goes.

Files come from the internet, so a model built from one is bounded by the file. The counts,
shapes and config values it is built from first build it entirely on the meta device (no
memory), stopped once it holds far more parameters of some shape than the file has tensors
of that shape, or more parameters, buffers or modules than its tensor count allows: a file
never makes us build much more than it can hold. That dry build's keys and shapes must
match the file and its buffers fit twice the file's size (64 MiB at least) before the real
build allocates anything. Shapes that size the model must have elements (``[0, 10**9]`` costs no byte), and
every error the building code raises on the file's values becomes a
:class:`CheckpointMismatchError` naming the file.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, Mapping

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from .. import model_configs
from ..model_configs.base import ArchConfig

from .checkpoint import Checkpoint, CheckpointError, _load_json, checkpoint_error

logger = logging.getLogger("wan_blockswap")

# Prefixes checkpoints put in front of the transformer's own keys.
KNOWN_PREFIXES = (
    "",
    "model.diffusion_model.",
    "diffusion_model.",
    "model.",
    "net.",
    "transformer.",
)

MAX_CONFIG_BYTES = 2**20  # a diffusers config.json is a few KB
# Buffers (rotary tables and the like) are not in the file but sized from its config: a
# model may hold twice the file's bytes of them, and 64 MiB whatever the file.
MIN_BUFFER_BUDGET = 64 * 2**20
# The dry build stops once it made this many more parameters of one shape than the file has
# tensors of that shape: enough for a few missing tensors to reach the key check, which names
# them, while an absurd count or size stops within a few layers.
SHAPE_SLACK = 64
# Nor may it make more parameters or buffers (these are not all in the file) than the file
# has tensors plus this ...
TENSOR_SLACK = 1024
# ... nor more modules than this many per tensor (activations, dropouts, containers hold none).
MODULES_PER_TENSOR = 4
# config.json keys with one of these words count layers: each layer holds at least one tensor.
COUNT_WORDS = frozenset({"layers", "blocks", "depth", "depths"})
NOT_THIS_MODEL = (
    "The file is corrupt or not a checkpoint of this architecture: re-download it, or pass a "
    "skeleton model that fits it"
)


class CheckpointMismatchError(CheckpointError):
    """The file's tensors do not fit the model (missing/unexpected keys, shapes)."""


@dataclass
class Skeleton:
    """A meta-device model and, for each of its state-dict keys, the file key to read."""

    model: nn.Module
    key_map: dict[str, str]
    arch: ArchConfig | None


@dataclass(frozen=True)
class _Plan:
    """A diffusers model to build from values read from the file (``kwargs`` or ``config``)."""

    cls: type
    kwargs: dict | None
    config: dict | None
    source: str  # where the values come from, for messages

    def make(self) -> nn.Module:
        if self.config is not None:  # a copy: from_config must not change the plan
            return self.cls.from_config(dict(self.config))
        return self.cls(**self.kwargs)


def state_keys(model: nn.Module) -> list[str]:
    """The keys ``model.state_dict()`` would have, without touching any tensor."""
    return list(model.state_dict(keep_vars=True).keys())


def match_skeleton(model: nn.Module, checkpoint: Checkpoint) -> Skeleton:
    """Pair a caller's skeleton with the file: the file prefix that makes most keys match."""
    names = state_keys(model)
    key_map = _prefix_key_map(names, checkpoint)
    check_keys(checkpoint, names, key_map)
    arch = model_configs.match(model)
    return Skeleton(model, key_map, arch)


def build_skeleton(checkpoint: Checkpoint) -> Skeleton:
    """A skeleton for ``checkpoint`` from its own config (diffusers folders) or, for layouts
    a model config knows how to rebuild (ComfyUI/original Wan files), from its shapes.

    Raises:
        CheckpointError: no model can be built for the file, or the one its values describe
            does not fit it (:class:`CheckpointMismatchError`), checked before anything real
            is allocated.
    """
    config_path = os.path.join(os.path.dirname(checkpoint.paths[0]), "config.json")
    plan = _plan_from_config(config_path, checkpoint) if os.path.exists(config_path) else None
    if plan is not None:
        dry = _dry_build(checkpoint, plan)
        names = state_keys(dry)
        key_map = _prefix_key_map(names, checkpoint)
        check_keys(checkpoint, names, key_map)
        _check_sizes(checkpoint, dry, key_map, plan)
        model = _real_build(checkpoint, plan)
        return Skeleton(model, key_map, model_configs.match(model))
    stripped = _stripped_keys(checkpoint)
    arch = model_configs.detect_from_keys(stripped)
    if arch is None or arch.skeleton is None:
        what = f"a {arch.family} checkpoint in {arch.layout_kind} layout" if arch else "it"
        raise CheckpointError(
            f"{checkpoint.paths[0]}: cannot build a model for {what} without ComfyUI; pass a "
            f"skeleton model (for example a diffusers model created under "
            f"accelerate.init_empty_weights()) or load it through the ComfyUI node"
        )
    recipe = arch.skeleton
    source = f"the tensor shapes of this {arch.name} file"
    shapes = _FileShapes(checkpoint, stripped, arch.name)
    kwargs = _from_file(
        checkpoint, f"sizing the model from {source}", recipe.config_from_shapes, shapes
    )
    cls = getattr(importlib.import_module("diffusers"), recipe.diffusers_class)
    plan = _Plan(cls, kwargs, None, source)
    dry = _dry_build(checkpoint, plan)
    if recipe.key_converter:
        module_name, func_name = recipe.key_converter.rsplit(".", 1)
        convert = getattr(importlib.import_module(module_name), func_name)
        # Converters rename keys and carry values along: values are our file keys.
        renamed = _from_file(checkpoint, "renaming its keys", convert, dict(stripped))
    else:
        renamed = dict(stripped)
    names = state_keys(dry)
    key_map = {n: renamed[n] for n in names if n in renamed}
    unexpected = set(renamed) - set(names)
    check_keys(checkpoint, names, key_map, extra=sorted(renamed[k] for k in unexpected))
    _check_sizes(checkpoint, dry, key_map, plan)
    model = _real_build(checkpoint, plan)
    logger.info(
        "%s: %s checkpoint, loading into diffusers %s", checkpoint.paths[0], arch.name, cls.__name__
    )
    return Skeleton(model, key_map, arch)


def check_keys(
    checkpoint: Checkpoint,
    names: list[str],
    key_map: dict[str, str],
    extra: list[str] | None = None,
) -> None:
    """Raise :class:`CheckpointMismatchError` naming the first missing and unexpected keys."""
    missing = [n for n in names if n not in key_map]
    used = set(key_map.values())
    unexpected = extra if extra is not None else [k for k in checkpoint.records if k not in used]
    if not missing and not unexpected:
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} model keys missing from the file (first: {missing[:5]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys in the file (first: {unexpected[:5]})")
    raise CheckpointMismatchError(
        f"{checkpoint.paths[0]} does not fit the model: {'; '.join(parts)}. Is this the right "
        f"architecture and variant for this model?"
    )


def file_arch(checkpoint: Checkpoint) -> model_configs.ArchConfig | None:
    """The architecture a file's keys name, building nothing (None: no record knows them)."""
    return model_configs.detect_from_keys(_stripped_keys(checkpoint))


def _prefix_key_map(names: list[str], checkpoint: Checkpoint) -> dict[str, str]:
    """Model key -> file key, through the known prefix that makes most keys match."""
    records = checkpoint.records
    best = max(KNOWN_PREFIXES, key=lambda p: sum((p + n) in records for n in names))
    return {n: best + n for n in names if (best + n) in records}


def _stripped_keys(checkpoint: Checkpoint) -> dict[str, str]:
    """The file's keys without the prefix they all share, to their full names."""
    prefix = _common_prefix(checkpoint)
    return {name[len(prefix) :]: name for name in checkpoint.records}


def _common_prefix(checkpoint: Checkpoint) -> str:
    for prefix in KNOWN_PREFIXES[1:]:
        if checkpoint.records and all(k.startswith(prefix) for k in checkpoint.records):
            return prefix
    return ""


class _FileShapes(Mapping):
    """Stripped key -> shape, for a recipe sizing the model from the file. Reading a tensor
    the file lacks, or one with no elements, is the file's error: a tensor of shape
    ``[0, 10**9]`` costs no byte, so it vouches for no dimension."""

    def __init__(self, checkpoint: Checkpoint, stripped: dict[str, str], arch: str) -> None:
        self._checkpoint = checkpoint
        self._names = stripped
        self._arch = arch

    def __getitem__(self, key: str) -> tuple[int, ...]:
        path = self._checkpoint.paths[0]
        name = self._names.get(key)
        if name is None:
            raise CheckpointMismatchError(
                f"{path}: it has no tensor {key!r}, which a {self._arch} checkpoint needs to "
                f"give the model's size. {NOT_THIS_MODEL}.",
                path=path,
            )
        shape = tuple(self._checkpoint.records[name].shape)
        if 0 in shape:
            raise CheckpointMismatchError(
                f"{path}: tensor {name!r} has shape {list(shape)[:8]} with no elements, so it "
                f"cannot give the model's size. {NOT_THIS_MODEL}.",
                path=path,
                tensor=name,
            )
        return shape

    def __contains__(self, key: object) -> bool:  # Mapping's would read the shape
        return key in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _from_file(checkpoint: Checkpoint, what: str, func: Callable, *args: object) -> object:
    """``func(*args)`` on values read from the file: whatever it raises is the file's fault,
    reported as such (diffusers' constructors and converters trust their arguments)."""
    try:
        return func(*args)
    except CheckpointError:
        raise
    except Exception as error:
        detail = str(error) if type(error) is ValueError else f"{type(error).__name__}: {error}"
        path = checkpoint.paths[0]
        raise CheckpointMismatchError(
            f"{path}: {what} failed ({detail[:300]}). {NOT_THIS_MODEL}.", path=path
        ) from error


@contextlib.contextmanager
def _bounded_by(checkpoint: Checkpoint, plan: _Plan) -> Iterator[None]:
    """Watch what this thread's constructors register and stop them, from inside, once
    they made far more of something than the file can account for: parameters of a shape
    (every parameter must match a tensor of its shape, so 10**8 layers, or a size no tensor
    of the file has, stop within a few layers), or parameters, buffers or modules in all."""
    path, records, name = checkpoint.paths[0], len(checkpoint.records), plan.cls.__name__
    file_shapes = Counter(tuple(record.shape) for record in checkpoint.records.values())
    used: Counter = Counter()
    limits = {
        "parameters": records + TENSOR_SLACK,
        "buffers": records + TENSOR_SLACK,
        "modules": MODULES_PER_TENSOR * records + TENSOR_SLACK,
    }
    counts = dict.fromkeys(limits, 0)
    thread = threading.get_ident()

    def on_parameter(module: nn.Module, attr: str, param: object) -> None:
        if param is None or threading.get_ident() != thread:
            return
        shape = tuple(param.shape)
        used[shape] += 1
        have = file_shapes[shape]
        if used[shape] > have + SHAPE_SLACK:
            where = f"{type(module).__name__}.{attr}"
            raise CheckpointMismatchError(
                f"{path}: {plan.source} describe a {name} with over {have + SHAPE_SLACK} "
                f"{list(shape)[:8]} parameters ({where}), where the file has {have or 'no'} "
                f"tensors of that shape. {NOT_THIS_MODEL}.",
                path=path,
            )
        count("parameters")

    def count(kind: str) -> None:
        counts[kind] += 1
        if counts[kind] > limits[kind]:
            raise CheckpointMismatchError(
                f"{path}: {plan.source} describe a {name} with over {limits[kind]} {kind}, "
                f"far more than the file's {records} tensors need. {NOT_THIS_MODEL}.",
                path=path,
            )

    def counter(kind: str) -> Callable:
        def hook(module: nn.Module, attr: str, value: object) -> None:
            if value is not None and threading.get_ident() == thread:
                count(kind)

        return hook

    handles = [
        torch_module.register_module_parameter_registration_hook(on_parameter),
        torch_module.register_module_buffer_registration_hook(counter("buffers")),
        torch_module.register_module_module_registration_hook(counter("modules")),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _dry_build(checkpoint: Checkpoint, plan: _Plan) -> nn.Module:
    """``plan`` built entirely on the meta device: exact shapes at no memory cost, stopped as
    soon as it holds anything the file cannot fill."""
    from diffusers.models.modeling_utils import no_init_weights

    what = f"building a {plan.cls.__name__} from {plan.source}"
    with _bounded_by(checkpoint, plan), torch.device("meta"), no_init_weights():
        model = _from_file(checkpoint, what, plan.make)
    if not isinstance(model, nn.Module):
        path = checkpoint.paths[0]
        raise CheckpointError(f"{path}: {plan.cls.__name__} built no torch module", path=path)
    return model


def _real_build(checkpoint: Checkpoint, plan: _Plan) -> nn.Module:
    """The skeleton itself (real buffers), once its dry build fitted the file."""
    what = f"building a {plan.cls.__name__} from {plan.source}"
    return _from_file(checkpoint, what, _empty, plan.cls, plan.kwargs, plan.config)


def _check_sizes(
    checkpoint: Checkpoint, dry: nn.Module, key_map: dict[str, str], plan: _Plan
) -> None:
    """Refuse, before the real build, a model whose tensors differ in shape from the file's
    or whose buffers (not in the file, sized by its config) would outweigh it."""
    path = checkpoint.paths[0]
    for name, tensor in dry.state_dict(keep_vars=True).items():
        record = checkpoint.records[key_map[name]]
        if tuple(record.shape) != tuple(tensor.shape):
            raise CheckpointMismatchError(
                f"{path}: tensor {record.name} has shape {list(record.shape)[:8]} but the "
                f"model's {name} is {list(tensor.shape)}. {NOT_THIS_MODEL}.",
                path=path,
                tensor=record.name,
            )
    buffer_bytes = sum(b.numel() * b.element_size() for b in dry.buffers())
    budget = max(2 * checkpoint.total_bytes, MIN_BUFFER_BUDGET)
    if buffer_bytes > budget:
        raise CheckpointMismatchError(
            f"{path}: {plan.source} describe a {plan.cls.__name__} whose buffers alone would "
            f"take {buffer_bytes / 2**20:.0f} MiB, more than the {budget / 2**20:.0f} MiB "
            f"allowed for a {checkpoint.total_bytes / 2**20:.1f} MiB file: a size in it is "
            f"absurd. {NOT_THIS_MODEL}.",
            path=path,
        )


def _plan_from_config(config_path: str, checkpoint: Checkpoint) -> _Plan | None:
    """The diffusers model a folder's config.json names (None: it names none)."""
    try:
        with open(config_path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise CheckpointError(f"{config_path}: unreadable model config ({error})") from error
    if len(raw) > MAX_CONFIG_BYTES:
        raise checkpoint_error(config_path, "it is over 1 MiB, not a diffusers model config")
    config = _load_json(config_path, raw, "model config")
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not class_name:
        return None
    cls = None
    if isinstance(class_name, str) and class_name.isidentifier() and class_name[0] != "_":
        from diffusers.models.modeling_utils import ModelMixin

        try:  # diffusers imports its classes on first access, which may fail
            cls = getattr(importlib.import_module("diffusers"), class_name, None)
        except Exception as error:
            logger.debug("diffusers.%s: %s", class_name, error)
        if not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
            cls = None
    if cls is None:
        raise CheckpointError(
            f"{config_path}: _class_name {str(class_name)[:80]!r} is no diffusers model class"
        )
    _check_counts(config_path, config, checkpoint)
    return _Plan(cls, None, config, f"the values in {config_path}")


def _check_counts(config_path: str, config: dict, checkpoint: Checkpoint) -> None:
    """Layer counts in a config.json must fit the file, whose layers each hold at least one
    tensor. (The dry build bounds everything else; this names the entry at fault.)"""
    limit = len(checkpoint.records)
    for key, value in config.items():
        if not COUNT_WORDS.intersection(key.lower().split("_")):
            continue
        largest, stack = 0, [value]
        while stack:  # lists of counts or indices (vace_layers), nested or not
            item = stack.pop()
            if isinstance(item, list):
                largest = max(largest, len(item))
                stack.extend(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                largest = max(largest, item)
        if largest > limit:
            raise CheckpointMismatchError(
                f"{config_path}: {key} = {str(value)[:80]} asks for more layers than the "
                f"{limit} tensors of {checkpoint.paths[0]} can hold (each layer holds at least "
                f"one). The config and the weights do not belong together, or one is corrupt.",
                path=checkpoint.paths[0],
            )


def _empty(cls: type, kwargs: dict | None, config: dict | None = None) -> nn.Module:
    try:
        from accelerate import init_empty_weights
    except ImportError as error:  # optional: only diffusers skeletons need it
        raise CheckpointError(
            "building a diffusers model without allocating its weights needs accelerate: "
            "pip install accelerate (or pip install 'comfyui-wan-blockswap[diffusers]')"
        ) from error
    from diffusers.models.modeling_utils import no_init_weights

    # no_init_weights: the random init would run on meta tensors for nothing (a fifth of the
    # time building a 14B skeleton takes)
    with init_empty_weights(include_buffers=False), no_init_weights():
        model = cls.from_config(dict(config)) if config is not None else cls(**kwargs)
    return model.eval().requires_grad_(False)
