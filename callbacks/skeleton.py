"""Empty models to load checkpoints into, and the map from model keys to file keys.

A skeleton has its parameters on the meta device (buffers real, as ``accelerate``'s
``init_empty_weights(include_buffers=False)`` leaves them): nothing is allocated until the
loader knows where each tensor goes.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
from dataclasses import dataclass

from torch import nn

from .. import model_configs
from ..model_configs.base import ArchConfig

from .checkpoint import Checkpoint, CheckpointError

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


class CheckpointMismatchError(CheckpointError):
    """The file's tensors do not fit the model (missing/unexpected keys, shapes)."""


@dataclass
class Skeleton:
    """A meta-device model and, for each of its state-dict keys, the file key to read."""

    model: nn.Module
    key_map: dict[str, str]
    arch: ArchConfig | None


def state_keys(model: nn.Module) -> list[str]:
    """The keys ``model.state_dict()`` would have, without touching any tensor."""
    return list(model.state_dict(keep_vars=True).keys())


def match_skeleton(model: nn.Module, checkpoint: Checkpoint) -> Skeleton:
    """Pair a caller's skeleton with the file: the file prefix that makes most keys match."""
    names = state_keys(model)
    records = checkpoint.records
    best = max(KNOWN_PREFIXES, key=lambda p: sum((p + n) in records for n in names))
    key_map = {n: best + n for n in names if (best + n) in records}
    check_keys(checkpoint, names, key_map)
    arch = model_configs.match(model)
    return Skeleton(model, key_map, arch)


def build_skeleton(checkpoint: Checkpoint) -> Skeleton:
    """A skeleton for ``checkpoint`` from its own config (diffusers folders) or, for layouts
    a model config knows how to rebuild (ComfyUI/original Wan files), from its shapes."""
    config_path = os.path.join(os.path.dirname(checkpoint.paths[0]), "config.json")
    if os.path.exists(config_path) and len(checkpoint.paths) >= 1:
        model = _diffusers_from_config(config_path)
        if model is not None:
            return match_skeleton(model, checkpoint)
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
    shapes = {key: checkpoint.records[name].shape for key, name in stripped.items()}
    kwargs = recipe.config_from_shapes(shapes)
    cls = getattr(importlib.import_module("diffusers"), recipe.diffusers_class)
    model = _empty(cls, kwargs)
    if recipe.key_converter:
        module_name, func_name = recipe.key_converter.rsplit(".", 1)
        convert = getattr(importlib.import_module(module_name), func_name)
        # Converters rename keys and carry values along: values are our file keys.
        renamed = convert({key: name for key, name in stripped.items()})
    else:
        renamed = dict(stripped)
    names = state_keys(model)
    key_map = {n: renamed[n] for n in names if n in renamed}
    unexpected = set(renamed) - set(names)
    check_keys(checkpoint, names, key_map, extra=sorted(renamed[k] for k in unexpected))
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


def _stripped_keys(checkpoint: Checkpoint) -> dict[str, str]:
    """The file's keys without the prefix they all share, to their full names."""
    prefix = _common_prefix(checkpoint)
    return {name[len(prefix) :]: name for name in checkpoint.records}


def _common_prefix(checkpoint: Checkpoint) -> str:
    for prefix in KNOWN_PREFIXES[1:]:
        if checkpoint.records and all(k.startswith(prefix) for k in checkpoint.records):
            return prefix
    return ""


def _diffusers_from_config(config_path: str) -> nn.Module | None:
    try:
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{config_path}: unreadable model config ({error})") from error
    class_name = config.get("_class_name") if isinstance(config, dict) else None
    if not class_name:
        return None
    diffusers = importlib.import_module("diffusers")
    cls = getattr(diffusers, class_name, None)
    if cls is None:
        raise CheckpointError(f"{config_path}: diffusers has no model class {class_name!r}")
    return _empty(cls, None, config)


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
        model = cls.from_config(config) if config is not None else cls(**kwargs)
    return model.eval().requires_grad_(False)
