"""What ``pip install .`` puts in place: one import root (``comfyui_wan_blockswap``), nothing
generic beside it, the licence and the metadata ComfyUI's Registry reads; and the package
never edits ``sys.path``."""

import ast
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "comfyui_wan_blockswap"
RUNTIME = ("wan_blockswap", "model_configs", "callbacks")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("wheel")
    # built from a copy: setuptools writes its build folders into the source tree
    source = tmp_path_factory.mktemp("source") / "checkout"
    skip = shutil.ignore_patterns(".git", ".carry", ".whl", "build", "*.egg-info", "__pycache__")
    shutil.copytree(ROOT, source, ignore=skip, symlinks=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PIP_NO_INDEX": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (name,) = [n for n in os.listdir(out) if n.endswith(".whl")]
    return str(out / name)


def test_the_wheel_has_one_import_root_with_the_folders_as_laid_out(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {PACKAGE, next(t for t in tops if t.endswith(".dist-info"))}
    for folder in RUNTIME:
        assert f"{PACKAGE}/{folder}/__init__.py" in names
    assert f"{PACKAGE}/nodes.py" in names and f"{PACKAGE}/__init__.py" in names
    assert not any("/tests/" in n or "/benchmarks/" in n or "writers" in n for n in names)
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_an_empty_venv_gets_no_generic_top_level_names(wheel, tmp_path):
    """``pip install`` into an empty virtual environment adds the root and its metadata only,
    and ``import callbacks`` fails there."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    before = set(os.listdir(site))
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    added = set(os.listdir(site)) - before
    assert {n for n in added if not n.endswith(".dist-info")} == {PACKAGE}, added
    for name in ("callbacks", "model_configs", "wan_blockswap", "nodes"):
        result = subprocess.run([python, "-c", f"import {name}"], capture_output=True, cwd=tmp_path)
        assert result.returncode != 0, name


def test_the_project_metadata_names_its_licence_urls_and_registry_entry():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)
    assert project["project"]["license"] == "Apache-2.0"
    assert open(os.path.join(ROOT, "LICENSE")).read().lstrip().startswith("Apache License")
    assert {"Repository", "Issues"} <= set(project["project"]["urls"])
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    runtime = {d.split(">")[0].split("=")[0] for d in project["project"]["dependencies"]}
    assert runtime == {"torch", "safetensors", "gguf"}  # accelerate: only for diffusers models


def test_the_package_never_edits_sys_path():
    files = [os.path.join(ROOT, n) for n in ("__init__.py", "nodes.py", "test_performance.py")]
    for folder in RUNTIME:
        for base, _, names in os.walk(os.path.join(ROOT, folder)):
            files += [os.path.join(base, n) for n in names if n.endswith(".py")]
    for path in files:
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Attribute) and node.attr == "path":
                assert getattr(node.value, "id", None) != "sys", path


def test_diffusers_skeletons_without_accelerate_say_what_to_install(monkeypatch):
    from comfyui_wan_blockswap.callbacks import skeleton
    from comfyui_wan_blockswap.callbacks.checkpoint import CheckpointError

    monkeypatch.setitem(sys.modules, "accelerate", None)  # as if not installed
    with pytest.raises(CheckpointError, match="pip install accelerate"):
        skeleton._empty(object, {})
