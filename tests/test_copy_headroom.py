"""callbacks/copy_headroom.py: a latent's timed forwards and the link rate decide whether a
plan's copies hide behind compute ([Note: copies hidden behind compute])."""

import pytest
import torch

from comfyui_wan_blockswap.callbacks import copy_headroom


class _Clock:
    """Forwards' clocks by name: milliseconds, or None while a forward still runs."""

    def __init__(self) -> None:
        self.ms: dict[str, float | None] = {}

    def clock_ms(self, token):
        return self.ms[token]


@pytest.fixture
def model(monkeypatch):
    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", True)
    return torch.nn.Linear(1, 1)


def test_the_least_time_per_sample_counts_and_running_forwards_wait(model):
    clock = _Clock()
    key = (16, 1, 4, 4)
    clock.ms.update(a=300.0, b=None, c=90.0)
    copy_headroom.note_forward(model, key, 2, "a")  # 150 per sample
    copy_headroom.note_forward(model, key, 1, "b")  # still running
    assert copy_headroom.ms_per_sample(model, key, clock) == 150.0
    clock.ms["b"] = 120.0
    copy_headroom.note_forward(model, key, 1, "c")
    assert copy_headroom.ms_per_sample(model, key, clock) == 90.0
    assert copy_headroom.ms_per_sample(model, (16, 2, 4, 4), clock) == 0.0  # another latent
    for _ in range(3 * copy_headroom.PENDING_CLOCKS):  # a stalled clock never piles up
        copy_headroom.note_forward(model, (1,), 1, "b")
    assert len(copy_headroom._times[model][(1,)].pending) == copy_headroom.PENDING_CLOCKS


def test_copies_hide_within_the_share_of_the_forward_and_only_when_both_were_timed(
    model, monkeypatch
):
    clock = _Clock()
    key = (16, 21, 60, 104)
    args = (model, key, 2, 1000)  # two samples per forward, 1000 bytes moved per forward
    assert not copy_headroom.copies_hide(*args, clock)  # nothing timed
    clock.ms["f"] = 40.0
    copy_headroom.note_forward(model, key, 1, "f")  # 40 ms per sample: 80 for two
    assert not copy_headroom.copies_hide(*args, clock)  # no link rate yet
    share = copy_headroom.HIDDEN_SHARE * 80.0
    copy_headroom.note_copy_rate(model, 1000 / share / 1.01)  # just over the share
    assert not copy_headroom.copies_hide(*args, clock)
    copy_headroom.note_copy_rate(model, 1000 / share)  # exactly the share
    assert copy_headroom.copies_hide(*args, clock)
    copy_headroom.note_copy_rate(model, 1.0)  # a slower reading never lowers the rate
    assert copy_headroom.copies_hide(*args, clock)
    monkeypatch.setattr(copy_headroom, "RUN_WHOLE_WHERE_COPIES_HIDE", False)
    assert not copy_headroom.copies_hide(*args, clock)
