"""The hooks a swap puts on modules: before a swapped unit's module runs the scheduler waits
for its weights, after it they are released; state-dict hooks show the real weights."""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from .scheduler import PrefetchScheduler

# Hooks on swapped modules reach the scheduler and units weakly: a block holding its
# scheduler strongly would close a cycle (scheduler -> unit -> block -> hook -> scheduler),
# and the model could then only be freed by the cycle collector, late (see [Note: no strong
# path to the model]). The model's own hooks hold the BlockSwap, which holds the scheduler
# and the units.


def unit_pre_hook(scheduler: PrefetchScheduler, index: int) -> Any:
    scheduler_ref = weakref.ref(scheduler)

    @torch.compiler.disable
    def hook(module: nn.Module, args: Any) -> None:
        scheduler = scheduler_ref()
        if scheduler is not None:
            scheduler.wait(index)

    return hook


def unit_post_hook(scheduler: PrefetchScheduler, index: int) -> Any:
    scheduler_ref = weakref.ref(scheduler)

    @torch.compiler.disable
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        scheduler = scheduler_ref()
        if scheduler is not None:
            scheduler.release(index)

    return hook


def register_state_dict_hook(module: nn.Module, hook: Any) -> Any:
    register = getattr(module, "register_state_dict_post_hook", None)
    if register is None:  # torch < 2.5
        register = module._register_state_dict_hook
    method = weakref.WeakMethod(hook)

    def state_dict_hook(*args: Any) -> None:  # a plain function: torch tags it
        bound = method()
        if bound is not None:
            bound(*args)

    return register(state_dict_hook)
