"""Applying a swap is a transaction: an interrupt (Ctrl-C) or a failed allocation at any step
leaves the model either fully swapped or bit-identical to before, with nothing registered.

The interrupt is injected at every line the engine executes during ``apply_block_swap``: a
trace function counts the line events of frames in the package and raises at the k-th one,
for every k (CPython delivers Ctrl-C between bytecodes, so every line boundary is a place
where it can land). An allocation failure is injected the same way at every host-buffer
allocation.
"""

from __future__ import annotations

import copy
import functools
import os
import sys

import pytest
import torch

import comfyui_wan_blockswap
from comfyui_wan_blockswap.wan_blockswap import apply_block_swap
from comfyui_wan_blockswap.wan_blockswap import get_block_swap as active_swap
from comfyui_wan_blockswap.wan_blockswap import storage
from comfyui_wan_blockswap.wan_blockswap.engine import BlockSwap
from comfyui_wan_blockswap.wan_blockswap.storage import registered_host_bytes
from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout

PACKAGE = os.path.dirname(os.path.abspath(comfyui_wan_blockswap.__file__))
TEST_DIR = os.path.dirname(os.path.abspath(__file__))


class Injected(BaseException):
    """Stands for KeyboardInterrupt without upsetting pytest if it escapes."""


# Package code that runs inside apply's span but not in its control flow: the garbage
# collector's callback, a slot pool's finalizer and ``__del__`` methods (an exception there is
# swallowed, never seen by apply).
NOT_APPLY = {"_trim_if_pending", "prune", "__del__"}


@functools.cache
def _traced(code) -> bool:
    """Whether lines of ``code`` count: the package's own, not the tests', not NOT_APPLY.
    Cached per code object: the trace function runs for every call while tracing."""
    name = code.co_filename
    return (
        name.startswith(PACKAGE)
        and not name.startswith(TEST_DIR)
        # by any name on its path: a comprehension inside a function has a code object of its own
        and not NOT_APPLY.intersection(getattr(code, "co_qualname", code.co_name).split("."))
    )


class LineInterrupter:
    """Raise ``error`` at the ``at``-th line event in the package's frames (0: only count).

    With ``from_place`` only lines from the start of ``BlockSwap._place`` on are traced and
    counted (in ``BlockSwap.apply``, which called it, too): before it, apply only reads the
    model. Tracing is switched on as ``_place`` is entered (by a wrapper of it defined here,
    outside the package, so never counted), so the ~15,000 lines before it run untraced in
    every trial. Once the error is raised nothing more is traced: what runs after it (apply's
    undo) is no place this trial injects at, and tracing it would only slow the trial."""

    def __init__(self, at: int, error: BaseException, from_place: bool = False) -> None:
        self.at, self.error, self.lines = at, error, 0
        self.from_place = from_place
        self._place = None

    def __enter__(self) -> "LineInterrupter":
        if not self.from_place:
            sys.settrace(self._global)
            return self
        self._place = place = BlockSwap._place

        def traced_place(swap, chosen):
            sys.settrace(self._global)  # from the next frame on: _place's own
            sys._getframe(1).f_trace = self._local  # BlockSwap.apply: what follows _place
            return place(swap, chosen)

        BlockSwap._place = traced_place
        return self

    def __exit__(self, *exc) -> None:
        sys.settrace(None)
        if self._place is not None:
            BlockSwap._place = self._place

    def _global(self, frame, event, arg):
        return self._local if _traced(frame.f_code) else None

    def _local(self, frame, event, arg):
        if event == "line":
            self.lines += 1
            if self.lines == self.at:
                sys.settrace(None)
                raise self.error
        return self._local


def snapshot(model: torch.nn.Module) -> dict:
    state = {}
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        state[name] = (
            tensor,  # the same object must come back (a Parameter others hold)
            tensor.detach().clone(),
            tensor.stride(),
            tensor.storage_offset(),
            tensor.device,
            tensor.requires_grad,
        )
    return state


def assert_untouched(model: torch.nn.Module, before: dict) -> None:
    now = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert now.keys() == before.keys()
    for name, (obj, values, stride, offset, device, grad) in before.items():
        tensor = now[name]
        assert tensor is obj, name
        assert tensor.device == device and tensor.requires_grad == grad, name
        assert tensor.stride() == stride and tensor.storage_offset() == offset, name
        assert torch.equal(tensor, values), f"{name} changed"
    for module in model.modules():
        assert not module._forward_pre_hooks and not module._forward_hooks, module
        assert "forward" not in module.__dict__, module  # a token chunker left behind
        assert not getattr(module, "_state_dict_hooks", None), module
        assert not getattr(module, "_state_dict_pre_hooks", None), module
    assert active_swap(model) is None


READ_PHASE_STRIDE = 97

PLANS = {
    "blocks": dict(blocks_to_swap=2, prefetch_blocks=1),
    "layers_and_embeddings": dict(blocks_to_swap=2, swap_unit="layer", offload_txt_emb=True),
    "compressed": dict(blocks_to_swap=2, transfer_compression=True),
    "streamed": "streamed",
    # each block's FFN one layer unit, run 4 tokens at a time ([Note: token chunks])
    "token_chunks": dict(blocks_to_swap=2, swap_unit="layer", chunk_tokens=4),
}


def _layout(model, plan):
    return toy_layout(model, token_wise=("ffn",) if plan == "token_chunks" else ())


def _options(model, plan) -> dict:
    if plan == "streamed":
        return dict(vram_budget_gb=streamed_budget_gb(model, 64 * 2**10))
    return plan


@pytest.fixture(scope="module")
def base():
    model = make_toy(dim=16, ffn=32, depth=3, vace_depth=0).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(0, dim=16).items()}
    with torch.no_grad():
        expected = model(**inputs)
    return model, inputs, expected


def _check_trial(model, before, inputs, expected) -> str:
    """What an interrupted apply left: 'applied' or 'untouched' (each asserted whole)."""
    swap = active_swap(model)
    if swap is None:
        assert_untouched(model, before)
        assert registered_host_bytes() == 0
        return "untouched"
    with torch.no_grad():
        assert torch.equal(model(**inputs), expected)
    swap.remove()
    assert_untouched(model, before)
    return "applied"


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_an_interrupt_at_any_line_of_apply_leaves_the_model_whole(base, plan):
    template, inputs, expected = base
    options = _options(template, PLANS[plan])

    def apply_on(model):
        layout = _layout(model, plan)
        return lambda: apply_block_swap(model, layout=layout, device="cpu", **options)

    # Before _place apply only reads (measure, plan, check): every READ_PHASE_STRIDE-th line
    # there is enough; from _place on, every line.
    trials = []
    for from_place, stride in ((False, READ_PHASE_STRIDE), (True, 1)):
        probe = copy.deepcopy(template)
        with LineInterrupter(0, Injected(), from_place) as counter:
            apply_on(probe)()
        active_swap(probe).remove()
        assert counter.lines > 50, counter.lines
        trials += [(from_place, at) for at in range(1, counter.lines + 1, stride)]
    # One model for every trial: each trial leaves it untouched or asserts why not.
    model = copy.deepcopy(template)
    before = snapshot(model)
    outcomes = {"applied": 0, "untouched": 0}
    for from_place, at in trials:
        with LineInterrupter(at, Injected(), from_place):
            try:
                apply_on(model)()
            except Injected:
                pass
            finally:
                # Python reports a line event for a ``with`` line again as the block exits,
                # before __exit__: injected there, the exception skips _place's no_grad exit
                # and grad mode would stay off for every later test
                torch.set_grad_enabled(True)
        outcomes[_check_trial(model, before, inputs, expected)] += 1
    # an interrupt before the commit point leaves it untouched, after it applied
    assert outcomes["applied"] <= 5 and outcomes["untouched"] >= len(trials) - 5, outcomes


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_a_failed_host_allocation_at_any_unit_leaves_the_model_whole(base, plan, monkeypatch):
    template, inputs, expected = base
    options = _options(template, PLANS[plan])
    real = storage.HostBuffer.__init__
    calls = {"n": 0, "fail_at": 0}

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("injected: out of host memory")
        real(self, *args, **kwargs)

    monkeypatch.setattr(storage.HostBuffer, "__init__", counting)
    probe = copy.deepcopy(template)
    apply_block_swap(probe, layout=_layout(probe, plan), device="cpu", **options).remove()
    total = calls["n"]
    for fail_at in range(1, total + 1):
        calls.update(n=0, fail_at=fail_at)
        model = copy.deepcopy(template)
        before = snapshot(model)
        with pytest.raises(RuntimeError, match="injected"):
            apply_block_swap(model, layout=_layout(model, plan), device="cpu", **options)
        assert_untouched(model, before)
        assert registered_host_bytes() == 0
