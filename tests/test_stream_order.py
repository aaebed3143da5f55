"""Stream ordering, checked on the CPU (see ``stream_order``): for fixed-slot, streamed,
compressed and VACE plans every read of a GPU buffer comes after its copy finished and every
overwrite after its last reader. Mutation check: with either of the scheduler's waits dropped
(the compute stream's wait on ``ready``, the copy stream's wait on ``freed``), the checker
finds the race, with fixed slots and with a streamed plan's window."""

from __future__ import annotations

import pytest
import torch

from comfyui_wan_blockswap.wan_blockswap import apply_block_swap, engine
from stream_order import AccessLog, FakeEvent, FakeStream, RecordingStreams, tag_events
from toy_models import make_toy, streamed_budget_gb, toy_inputs, toy_layout

PLANS = {
    "fixed slots": dict(blocks_to_swap=5, prefetch_blocks=1),
    "fixed slots, deep prefetch": dict(blocks_to_swap=6, prefetch_blocks=3),
    "layers": dict(blocks_to_swap=4, swap_unit="layer", offload_txt_emb=True),  # packed slots
    "compressed": dict(blocks_to_swap=5, prefetch_blocks=1, transfer_compression=True),
    # what auto's deeper look-ahead makes ([Note: look-ahead of compressed layer plans])
    "compressed layers, deep prefetch": dict(
        blocks_to_swap=4, swap_unit="layer", prefetch_blocks=3, transfer_compression=True
    ),
    "streamed": "streamed",
    "streamed, compressed": "streamed+compressed",
    "vace": dict(blocks_to_swap=6, vace_blocks_to_swap=2, prefetch_blocks=1),
}


def _options(model, plan) -> dict:
    if isinstance(plan, dict):
        return plan
    # a layer travels packed only if it fits in the window beside the one before it
    window = 4 * 2**20 if plan.endswith("compressed") else 64 * 2**10
    options = dict(vram_budget_gb=streamed_budget_gb(model, window), prefetch_blocks=2)
    if plan.endswith("compressed"):
        options["transfer_compression"] = True
    return options


def run_recorded(plan: str, skip_waits=(), forwards: int = 3, hold: bool | None = None, seen=None):
    """Apply ``plan`` to a bf16 toy
    against RecordingStreams (dims large enough that compressed transfers pack), run ``forwards`` forwards under the access log; return the
    log, the streams and whether outputs matched the unswapped model."""
    vace = 3 if plan == "vace" else 0
    model = make_toy(dim=256, ffn=512, depth=6, vace_depth=vace).to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(0, dim=256).items()}
    with torch.no_grad():
        expected = model(**inputs)
    made: list[RecordingStreams] = []

    def streams(device, timing=False):
        made.append(RecordingStreams(device, timing, skip_waits))
        return made[-1]

    patch = pytest.MonkeyPatch()
    patch.setattr(engine, "DeviceStreams", streams)
    try:
        swap = apply_block_swap(
            model, layout=toy_layout(model), device="cpu", **_options(model, PLANS[plan])
        )
    finally:
        patch.undo()
    recording = made[-1]
    if hold is not None:  # None: the engine's default
        swap.scheduler.hold_at_forward_edge = hold
    log = AccessLog(recording)
    same = True
    with torch.no_grad():
        for _ in range(forwards):
            swap.scheduler.allocate()
            tag_events(swap.scheduler)
            with log:
                out = model(**inputs)
            same = same and torch.equal(out, expected)
            if seen is not None:  # what is queued for the next forward
                seen.append([flight.index for flight in swap.scheduler.ahead])
    assert all(isinstance(f.ready, FakeEvent) for f in swap.scheduler.provider.flights)
    stats = swap.stats
    swap.remove()
    return log, recording, same, stats


@pytest.mark.parametrize("hold", [None, False], ids=["default order", "unheld order"])
@pytest.mark.parametrize("plan", list(PLANS))
def test_every_buffer_is_read_after_its_copy_and_overwritten_after_its_readers(plan, hold):
    log, streams, same, stats = run_recorded(plan, hold=hold)
    assert same
    assert stats.copies > 0
    assert sum(len(h) for h in log.accesses.values()) > 100  # the log saw the work
    used = {a.stream for history in log.accesses.values() for a in history}
    assert {"compute", "copy"} <= used, used
    if "compressed" in plan:
        assert "decode" in used
    assert not log.races, "\n".join(map(str, log.races[:5]))


@pytest.mark.parametrize(
    "plan, dropped",
    [
        ("fixed slots", ("compute", "ready")),
        ("fixed slots", ("copy", "freed")),
        ("fixed slots, deep prefetch", ("copy", "freed")),
        ("layers", ("compute", "ready")),
        ("layers", ("copy", "freed")),
        ("compressed", ("compute", "ready")),
        ("compressed", ("copy", "freed")),
        ("streamed", ("compute", "ready")),
        ("streamed", ("copy", "freed")),
        ("streamed, compressed", ("compute", "ready")),
    ],
)
def test_without_a_scheduler_wait_the_checker_finds_the_race(plan, dropped):
    """The mutation check: outputs are still right on the CPU, but the order is not."""
    log, streams, same, _ = run_recorded(plan, skip_waits=[dropped])
    assert streams.skipped > 0, f"no {dropped} wait happened"
    assert same  # the CPU cannot see it in the outputs ...
    assert log.races  # ... the checker does


@pytest.mark.parametrize(
    "plan", ["fixed slots, deep prefetch", "layers", "compressed", "streamed", "vace"]
)
def test_holding_copies_at_the_forward_edge_queues_one_unit_in_order(plan):
    """[Note: holding copies at a forward's edge] By default, between forwards only the next
    forward's first unit is queued; the rest follow its wait, in order, with the same
    outputs."""
    queued: list = []
    log, _, same, stats = run_recorded(plan, seen=queued)
    assert same
    assert not log.races, "\n".join(map(str, log.races[:5]))
    assert all(len(units) == 1 for units in queued), queued
    unheld: list = []
    _, _, _, unheld_stats = run_recorded(plan, hold=False, seen=unheld)
    if plan != "streamed":  # (a streamed window here holds one layer ahead anyway)
        assert all(len(units) > 1 for units in unheld), unheld  # unheld, more are queued
    assert stats.misses == unheld_stats.misses  # only the first forward's, learning the order


@pytest.mark.parametrize("waits", [True, False], ids=["as built", "without the pool's waits"])
def test_a_model_that_packs_after_compression_shares_the_pool_in_order(waits, monkeypatch):
    """[Note: packed slots]: "auto" drops compression in one of two models sharing a pool
    (Wan 2.2 A14B's experts); that model packs its slots in the same pool while the other
    still decodes into them. Taking the pool over, the packed one first waits for the
    slots' last writes (a prefetched unit's decode included); without that, a race."""
    from comfyui_wan_blockswap.wan_blockswap.packed_slots import PackedSlots

    shared = RecordingStreams(torch.device("cpu"))
    monkeypatch.setattr(engine, "DeviceStreams", lambda device, timing=False: shared)
    models = [make_toy(seed=s, dim=256, ffn=512, depth=6).to(torch.bfloat16) for s in (0, 1)]
    inputs = {k: v.to(torch.bfloat16) for k, v in toy_inputs(0, dim=256).items()}
    with torch.no_grad():
        expected = [m(**inputs) for m in models]
    swaps = [
        apply_block_swap(
            m,
            layout=toy_layout(m),
            device="cpu",
            blocks_to_swap=4,
            swap_unit="layer",
            transfer_compression=True,
        )
        for m in models
    ]
    packing, plain = swaps
    packing.drop_compression()
    packing._pack_slots_once_raw()
    assert isinstance(packing.scheduler.provider, PackedSlots)
    assert not isinstance(plain.scheduler.provider, PackedSlots) and plain.compressed
    assert packing.slot_pool_key() == plain.slot_pool_key()
    if not waits:
        allocate = PackedSlots.allocate

        def without_waits(provider, user, inference):
            shared.skip_waits.add(("copy", "ready"))
            try:
                allocate(provider, user, inference)
            finally:
                shared.skip_waits.discard(("copy", "ready"))

        monkeypatch.setattr(PackedSlots, "allocate", without_waits)
    log = AccessLog(shared)
    with torch.no_grad():
        for model, swap, want in [*zip(models[::-1], swaps[::-1], expected[::-1])] * 3:
            swap.scheduler.allocate()
            tag_events(swap.scheduler)
            with log:
                assert torch.equal(model(**inputs), want)
    for swap in swaps:
        swap.remove()
    if waits:
        assert not log.races, "\n".join(map(str, log.races[:5]))
    else:
        assert shared.skipped > 0 and log.races


class _TwoComputeStreams(RecordingStreams):
    """A host whose forwards compute on two streams in turn (the current one is compute)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.compute2 = FakeStream("compute2")
        self.clocks["compute2"] = {"compute2": 0}

    def compute_stream(self):
        current = self.current()
        return current if current.name.startswith("compute") else self.compute


def test_units_of_one_packed_slot_released_on_two_compute_streams_stay_ordered(monkeypatch):
    """[Note: packed slots]: a slot's units share its ``freed`` event; each release waits on
    it before recording it, so the record chains the releases of every compute stream and
    a copy into the emptied slot waits for all their reads (review of session 26: without
    the chain, 20 races)."""
    from comfyui_wan_blockswap.wan_blockswap.packed_slots import PackedSlots

    streams = _TwoComputeStreams(torch.device("cpu"))
    monkeypatch.setattr(engine, "DeviceStreams", lambda device, timing=False: streams)
    model = make_toy(dim=256, ffn=512, depth=6).to(torch.bfloat16)
    swap = apply_block_swap(
        model, layout=toy_layout(model), device="cpu", blocks_to_swap=4, swap_unit="layer"
    )
    scheduler = swap.scheduler
    assert isinstance(scheduler.provider, PackedSlots)
    log = AccessLog(streams)
    with torch.no_grad():
        for _ in range(3):
            scheduler.allocate()
            tag_events(scheduler)
            with log:
                scheduler.begin_forward()
                for index, stored in enumerate(swap.units):
                    with streams.on(streams.compute2 if index % 2 else streams.compute):
                        scheduler.wait(index)
                        for ref in stored.unit.tensors:
                            ref.get().sum()  # the compute stream reads the unit
                        scheduler.release(index)
                scheduler.end_forward(completed=True)
    swap.remove()
    assert not log.races, "\n".join(map(str, log.races[:5]))
