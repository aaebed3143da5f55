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


def inner_layer_hooks(scheduler: PrefetchScheduler, index: int) -> tuple[Any, Any]:
    """Hooks for a layer inside unit ``index`` whose module is a part, not a leaf (a grouped
    or token-wise part): a host that calls the layer itself rather than through the part
    (ComfyUI's CausalWanModel calls its cross-attention's q, k, v and o so) gets the unit's
    weights, fetched like any miss. The unit then stays in use until another unit is waited
    for or the forward ends (``PrefetchScheduler.lingering``): such calls come in runs (q,
    norm_q, o), and releasing after each would copy the whole part again for the next one.
    Called through the part, the unit is in use already and these do nothing. See [Note:
    grouped parts]."""
    scheduler_ref = weakref.ref(scheduler)
    fetched: list[bool] = []  # per call in progress (they may nest): whether it fetched

    @torch.compiler.disable
    def before(module: nn.Module, args: Any) -> None:
        scheduler = scheduler_ref()
        fetched.append(False)  # first: the post-hook runs even if the pre-hook fails
        if scheduler is not None and index not in scheduler.in_use:
            # marked before waiting: wait may bind the unit and then fail (a prefetch after
            # it); the post-hook must still let it go
            fetched[-1] = True
            scheduler.wait(index)

    @torch.compiler.disable
    def after(module: nn.Module, args: Any, output: Any) -> None:
        scheduler = scheduler_ref()
        if fetched and fetched.pop() and scheduler is not None and index in scheduler.in_use:
            scheduler.lingering.add(index)  # released at the next other unit's wait

    return before, after


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
