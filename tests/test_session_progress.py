"""benchmarks/comfyui_session.py reads the server's log to send /interrupt mid-sampling: it
counts the sampler progress bars started and the step the last one reached."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import comfyui_session as session  # noqa: E402

# current core (v0.33) draws a bar's 0/N again with a postfix while the model initialises
CURRENT = (
    "  0%|          | 0/64 [00:00<?, ?it/s]  0%|          | 0/64 [00:00<?, ?it/s,   Model "
    "Initializing ...  ]\r  2%|1 | 1/64 [00:00<00:30]\r  3%|2 | 2/64 [00:00<00:29]"
)
LEGACY = "  0%|          | 0/64 [00:00<?, ?it/s]\r  2%|1 | 1/64 [00:00<00:30]"


def test_a_bar_drawn_twice_at_its_start_counts_once():
    assert session._progress("") == (0, 0)
    assert session._progress(CURRENT[: CURRENT.index("\r")]) == (1, 0)
    assert session._progress(CURRENT) == (1, 2)
    assert session._progress(LEGACY) == (1, 1)


def test_a_second_sampler_after_a_finished_one_counts_as_a_second_bar():
    first = CURRENT + "\r100%|##| 64/64 [00:03<00:00]\n"
    assert session._progress(first + CURRENT) == (2, 2)
    assert session._progress(first + LEGACY[: LEGACY.index("\r")]) == (2, 0)
