"""The engine never imports ComfyUI, and the package never unpickles."""

import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("wan_blockswap", "model_configs", "callbacks")


def test_engine_imports_without_comfyui():
    code = (
        f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); import _pack\n"
        "from comfyui_wan_blockswap import wan_blockswap, model_configs, callbacks, nodes\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in "
        "('comfy', 'folder_paths', 'nodes', 'comfy_extras', 'server')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout


def _python_files():
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


# the adapters, imported only when ComfyUI runs the nodes
COMFY_MODULES = (
    "comfy_adapter.py",
    "comfy_auto.py",
    "comfy_weight_patches.py",
    "comfy_lazy_load.py",
    "comfy_private.py",
)


def test_no_comfy_import_in_engine_or_configs():
    for path in _python_files():
        if os.sep + "callbacks" + os.sep in path and path.endswith(COMFY_MODULES):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("comfy", "folder_paths", "nodes"), (path, name)


def test_nothing_unpickles():
    """No pickle, no torch.load without weights_only=True, anywhere in the package."""
    for path in list(_python_files()) + [os.path.join(ROOT, "nodes.py")]:
        if not os.path.exists(path):
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = node.module if isinstance(node, ast.ImportFrom) else None
                names = [a.name for a in node.names] + ([module] if module else [])
                assert not any(
                    n and n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names
                ), path
            if isinstance(node, ast.Call):
                func = node.func
                name = getattr(func, "attr", getattr(func, "id", ""))
                if name == "load" and getattr(getattr(func, "value", None), "id", "") == "torch":
                    safe = any(
                        k.arg == "weights_only" and getattr(k.value, "value", None) is True
                        for k in node.keywords
                    )
                    assert safe, f"{path}:{node.lineno} torch.load without weights_only=True"


def test_the_engine_imports_nothing_from_the_data_or_the_adapters():
    """Data depends on the engine's types, not the engine on the data: nothing under
    wan_blockswap/ imports model_configs or callbacks (relatively or by name)."""
    folder = os.path.join(ROOT, "wan_blockswap")
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".py"):
            continue
        path = os.path.join(folder, name)
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in ast.walk(tree):
            modules = []
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level >= 2:  # from .. import x / from ..x import y: outside the engine
                    modules = [node.module or alias.name for alias in node.names]
                elif node.module and not node.level:
                    modules = [node.module]
            for module in modules:
                parts = set(module.split("."))
                assert not parts & {"model_configs", "callbacks", "nodes"}, (name, module)
                if node.__class__ is ast.ImportFrom and node.level >= 2:
                    raise AssertionError(f"{name} imports {module} from outside the engine")


# What a swap keeps inside: its stored units and their storage. Attribute names of
# ``StoredUnit`` (and ``BlockSwap.units``, the list of them) that no adapter may use; the
# public ``BlockSwap`` methods (swapped_parameters, set_transform, unit_binder, fill_unit,
# destination, ...) are all the adapters need.
STORAGE_ATTRIBUTES = {
    "units",
    "unit",
    "host",
    "host_views",
    "pieces",
    "placeholders",
    "parked",
    "templates",
    "as_tensors",
    "bind",
    "bind_tensors",
    "unbind",
    "seal",
    "unseal",
    "transfer",
    "scheduler",
    "provider",
    "_swapped_index",
}
STORAGE_MODULES = {
    "stored_unit",
    "storage",
    "scheduler",
    "memory_provider",
    "fixed_slots",
    "window_allocator",
}
STORAGE_NAMES = {"StoredUnit", "UnitState", "Placeholders", "PrefetchScheduler"}


def test_adapters_use_only_the_public_swap():
    """callbacks/ and nodes.py reach a swap's weights through public BlockSwap methods only:
    no engine storage module imported, no stored unit's attribute touched."""
    paths = [p for p in _python_files() if os.sep + "callbacks" + os.sep in p]
    paths.append(os.path.join(ROOT, "nodes.py"))
    for path in paths:
        tree = ast.parse(open(path, encoding="utf-8").read())
        where = os.path.relpath(path, ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in STORAGE_ATTRIBUTES, f"{where}:{node.lineno} .{node.attr}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    parts = set(alias.name.split("."))
                    assert not parts & STORAGE_MODULES, f"{where}:{node.lineno} {alias.name}"
            elif isinstance(node, ast.ImportFrom):
                parts = set((node.module or "").split("."))
                parts |= {alias.name for alias in node.names}
                assert not parts & (STORAGE_MODULES | STORAGE_NAMES), f"{where}:{node.lineno}"
