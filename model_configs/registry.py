"""Matching architecture records against a module or a checkpoint's keys."""

from __future__ import annotations

import importlib
import os
import pkgutil
from typing import Iterable

from torch import nn

from . import cosmos, flux, hunyuan_video, wan
from .base import ArchConfig, Variant
from .generic import generic_config

# Every module of this package that defines CONFIGS is a family of records: a new
# architecture is a new module here, not an edit of this list. Known families first, in
# the order presets are listed; new ones after, by module name.
_KNOWN = (wan, hunyuan_video, flux, cosmos)


def _families() -> list:
    modules = list(_KNOWN)
    for info in sorted(pkgutil.iter_modules(_package_path())):
        module = importlib.import_module(f"{__package__}.{info.name}")
        if hasattr(module, "CONFIGS") and module not in modules:
            modules.append(module)
    return modules


def _package_path() -> list[str]:
    return [os.path.dirname(os.path.abspath(__file__))]


# Records with required paths (VACE) must be tried before the plain ones of the same class;
# the sort is stable, so otherwise family order holds.
IN_FAMILY_ORDER: tuple[ArchConfig, ...] = tuple(
    config for module in _families() for config in module.CONFIGS
)
CONFIGS: tuple[ArchConfig, ...] = tuple(
    sorted(IN_FAMILY_ORDER, key=lambda config: -len(config.required_paths))
)


def all_configs() -> tuple[ArchConfig, ...]:
    return CONFIGS


def get_config(name: str) -> ArchConfig:
    for config in CONFIGS:
        if config.name == name:
            return config
    raise KeyError(f"no model config named {name!r}; known: {[c.name for c in CONFIGS]}")


def match(model: nn.Module) -> ArchConfig | None:
    """The record for ``model``'s class and structure, or ``None``."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for config in CONFIGS:
        if not names.intersection(config.class_names):
            continue
        if not all(_has_path(model, p) for p in config.required_paths):
            continue
        if any(_has_path(model, p) for p in config.forbidden_paths):
            continue
        if all(_has_path(model, bl.path) for bl in config.layout.block_lists):
            return config
    return None


def detect(model: nn.Module) -> ArchConfig:
    """The record for ``model``, or one built by the generic rule."""
    return match(model) or generic_config(model)


def detect_from_keys(keys: Iterable[str]) -> ArchConfig | None:
    """The record whose ``detect_keys`` all appear among checkpoint ``keys`` (prefix-free).

    The most specific record (most detect keys) wins, so VACE beats plain Wan.
    """
    keyset = set(keys)
    found = [c for c in CONFIGS if c.detect_keys and all(k in keyset for k in c.detect_keys)]
    if not found:
        return None
    return max(found, key=lambda c: len(c.detect_keys) + len(c.required_paths))


def variant_of(config: ArchConfig, model: nn.Module) -> Variant | None:
    """The named size of ``model``, from its first main list's length and hidden size."""
    main = config.layout.lists_with_role("main")
    if not main or not config.hidden_param:
        return None
    container = _get_path(model, main[0].path)
    blocks = [m for m in container._modules.values() if m is not None]
    if not blocks:
        return None
    try:
        hidden = _get_path(blocks[0], config.hidden_param).shape[-1]
    except AttributeError:
        return None
    for variant in config.variants:
        if variant.num_blocks == len(blocks) and variant.hidden_size == hidden:
            return variant
    return None


def _get_path(root: object, path: str) -> object:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(root: nn.Module, path: str) -> bool:
    try:
        return _get_path(root, path) is not None
    except AttributeError:
        return False
