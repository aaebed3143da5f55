"""The README's claims that code can check: its Python example prints what the README says it
prints, and every preset it names is one the node offers."""

import contextlib
import io
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme() -> str:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        return handle.read()


def test_the_python_example_prints_what_the_readme_shows(monkeypatch):
    pytest.importorskip("diffusers")
    import torch

    text = readme()
    section = text[text.index("## Use it from Python") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    shown = re.search(r"On a CPU it prints.*?```\n(.*?)```", section, re.S).group(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the CPU's output
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "README.md", "exec"), {})
    assert printed.getvalue() == shown


def test_every_preset_the_readme_names_is_one_the_node_offers():
    from comfyui_wan_blockswap.model_configs import preset_names

    text = readme()
    table = text[text.index("## Which setting") : text.index("## Troubleshooting")]
    named = re.findall(r'"([^"]+ GB)"', table)
    assert len(named) == 16  # the table, and two of the 2026 families
    assert set(named) <= set(preset_names())
    assert "auto (free VRAM now)" in table
    from comfyui_wan_blockswap import nodes

    assert nodes.AUTO == "auto (free VRAM now)"


def test_the_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", readme()):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target
