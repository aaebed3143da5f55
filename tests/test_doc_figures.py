"""Figures the docs, docstrings and tooltips quote come from one constant each: a changed
constant fails here until every text that quotes it says the new figure."""

import pathlib

from comfyui_wan_blockswap.wan_blockswap import compressed_transfer

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_the_staging_vram_quoted_everywhere_is_what_the_engine_allocates():
    mib = f"{compressed_transfer.staging_bytes() / 2**20:.0f} MiB"
    for path in ("docs/library.md", "wan_blockswap/config.py"):
        text = (ROOT / path).read_text()
        assert f"{mib} of VRAM" in text, path


def test_the_packed_ram_share_quoted_everywhere_is_the_constant():
    share = f"{compressed_transfer.TYPICAL_PACKED_SHARE:.2f}x"
    assert f"~{share}" in (ROOT / "docs/library.md").read_text()
    texts = [p.read_text() for p in (ROOT / "docs").glob("*.md")]
    texts += [(ROOT / "README.md").read_text(), (ROOT / "wan_blockswap/config.py").read_text()]
    for wrong in ("0.75x the swapped", "0.8x the swapped"):
        assert not any(wrong in text for text in texts), wrong
