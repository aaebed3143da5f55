"""A real ComfyUI server for benchmarks and session tests: started headless on 127.0.0.1 with
this pack (and the test-only conditioning node) in custom_nodes/, driven over the HTTP API
(/prompt, /history, /interrupt, /free), with its process' peak RSS and, on a GPU, the device's
peak memory (NVML: dynamic VRAM's pages do not show in torch's statistics).

Also writes the files a workflow needs: Wan-shaped random checkpoints of any size in ComfyUI's
key layout, streamed tensor by tensor (a 40-block 14B file never sits whole in RAM), and a
small LoRA for them. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_NODE = os.path.join(ROOT, "tests", "comfyui", "conditioning_node")
GIB = 2**30

# Wan 2.1 14B
WAN14B = dict(dim=5120, ffn_dim=13824, in_dim=16, out_dim=16)


# An experiment arm's pack: this checkout without what the server never imports
PACK_LEFT_OUT = shutil.ignore_patterns(".*", "__pycache__", "tests", "benchmarks", "docs")


def install_pack(custom_nodes: str, patches: dict[str, tuple[str, str]] | None = None) -> str:
    """This checkout as the server's ``wan_blockswap`` node pack: a link to it, or with
    ``patches`` (a file of the pack -> (text, replacement), the text found exactly once) an
    edited copy, so that an arm measures what another value of a constant would do (a default
    such as the token chunk size) without a knob for it in the product. Replaces what an
    earlier arm installed in the same folder."""
    target = os.path.join(custom_nodes, "wan_blockswap")
    if os.path.islink(target):
        os.unlink(target)
    elif os.path.realpath(target) == os.path.realpath(ROOT):
        raise ValueError(f"{target} is this checkout itself, not a server's copy of it")
    elif os.path.isdir(target):
        shutil.rmtree(target)
    if not patches:
        os.symlink(ROOT, target)
        return target
    shutil.copytree(ROOT, target, ignore=PACK_LEFT_OUT)
    for name, (text, replacement) in patches.items():
        path = os.path.join(target, name)
        with open(path) as handle:
            source = handle.read()
        if source.count(text) != 1:
            shutil.rmtree(target)
            raise ValueError(f"{name}: {text!r} occurs {source.count(text)} times, not once")
        with open(path, "w") as handle:
            handle.write(source.replace(text, replacement))
    return target


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def request(url: str, payload: dict | None = None, timeout: float = 10) -> Any:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        body = response.read()
    try:
        return json.loads(body or b"{}")
    except json.JSONDecodeError:
        return {}


class Server:
    """One ComfyUI server process with its own base directory under ``workdir``."""

    def __init__(
        self,
        comfyui: str,
        workdir: str,
        args: tuple[str, ...] = (),
        env: dict | None = None,
        frontend: bool = False,
        probe: bool = False,
        pack_patches: dict[str, tuple[str, str]] | None = None,
    ) -> None:
        self.comfyui = os.path.abspath(comfyui)
        self.frontend = frontend  # serve the installed web frontend (not an empty folder)
        self.workdir = workdir
        self.base = os.path.join(workdir, "base")
        self.args = tuple(args)
        self.env = env
        for sub in ("custom_nodes", "models/diffusion_models", "models/loras", "output"):
            os.makedirs(os.path.join(self.base, sub), exist_ok=True)
        install_pack(os.path.join(self.base, "custom_nodes"), pack_patches)
        test_node = os.path.join(self.base, "custom_nodes", "blockswap_test_conditioning")
        if not os.path.exists(test_node):
            shutil.copytree(TEST_NODE, test_node)
        if probe:  # the host-memory route (see memory_report)
            probe_node = os.path.join(self.base, "custom_nodes", "blockswap_test_memory_probe")
            os.makedirs(probe_node, exist_ok=True)
            with open(os.path.join(probe_node, "__init__.py"), "w") as handle:
                handle.write(_MEMORY_PROBE)
        self.models = os.path.join(self.base, "models", "diffusion_models")
        self.loras = os.path.join(self.base, "models", "loras")
        self.probe = probe
        self.process: subprocess.Popen | None = None
        self.log_path = os.path.join(workdir, "server.log")
        self.url = ""

    # -- life ------------------------------------------------------------------------------

    def start(self, timeout: float = 300) -> None:
        frontend = os.path.join(self.workdir, "frontend")
        os.makedirs(frontend, exist_ok=True)
        # without --front-end-root core serves the comfyui_frontend_package it finds
        front_end_root = () if self.frontend else ("--front-end-root", frontend)
        port = free_port()
        command = [
            sys.executable,
            os.path.join(self.comfyui, "main.py"),
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            self.base,
            *front_end_root,
            "--disable-auto-launch",
            *self.args,
        ]
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, **(self.env or {}), "PYTHONUNBUFFERED": "1"}
        log = open(self.log_path, "a")
        self.process = subprocess.Popen(
            command, cwd=self.comfyui, stdout=log, stderr=subprocess.STDOUT, env=env
        )
        deadline = time.time() + timeout
        while True:
            try:
                request(self.url + "/system_stats", timeout=2)
                return
            except OSError:
                if self.process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"server did not start; see {self.log_path}")
                time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def __enter__(self) -> "Server":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- API -------------------------------------------------------------------------------

    def queue(self, prompt: dict, timeout: float = 600, on_running: Any = None) -> dict:
        """Queue ``prompt`` and wait for it. Returns ``status`` ("success", "error",
        "interrupted" or "rejected"), ``error`` (the exception message), ``seconds`` (queue to
        done) and ``log`` (what the server printed meanwhile). ``on_running(server)`` is called
        once the prompt runs (to interrupt it, say)."""
        log_start = os.path.getsize(self.log_path)
        started = time.time()
        try:
            prompt_id = request(self.url + "/prompt", {"prompt": prompt})["prompt_id"]
        except urllib.error.HTTPError as error:  # validation refused it
            body = json.loads(error.read() or b"{}")
            return {"status": "rejected", "error": json.dumps(body)[:2000], "seconds": 0.0}
        deadline = started + timeout
        called = on_running is None
        while True:
            history = request(self.url + f"/history/{prompt_id}")
            if prompt_id in history:
                break
            if not called and request(self.url + "/queue").get("queue_running"):
                called = True
                on_running(self)
            if not self.alive:
                return {"status": "crashed", "error": "server exited", "seconds": 0.0}
            if time.time() > deadline:
                return {"status": "timeout", "error": "", "seconds": time.time() - started}
            time.sleep(0.05)
        entry = history[prompt_id]
        status = entry.get("status", {})
        error = ""
        state = status.get("status_str", "error")
        stamps = {}
        for kind, data in status.get("messages", []):
            if kind == "execution_error":
                error = f"{data.get('exception_type')}: {data.get('exception_message')}"
            if kind == "execution_interrupted":
                state = "interrupted"
            if isinstance(data, dict) and "timestamp" in data:
                stamps[kind] = data["timestamp"]
        # the server's own start-to-end time of the prompt (ms stamps), free of polling
        executed = None
        if "execution_start" in stamps and "execution_success" in stamps:
            executed = (stamps["execution_success"] - stamps["execution_start"]) / 1000
        time.sleep(0.5)  # the progress bar's last line may reach the log after the history
        with open(self.log_path, errors="replace") as handle:
            handle.seek(log_start)
            log = handle.read()
        return {
            "status": state,
            "error": error,
            "seconds": time.time() - started,
            "executed_s": executed,
            "log": log,
        }

    def interrupt(self) -> None:
        request(self.url + "/interrupt", {})

    def free(self, settle: float = 20.0) -> None:
        """What the UI's "unload models" does: every model unloaded, node caches and memory
        emptied. The server does it on its worker thread: wait until its VRAM stops
        changing (NVML), or a second on a CPU (with the probe: until the worker is done)."""
        request(self.url + "/free", {"unload_models": True, "free_memory": True})
        # a second was not always enough on a busy CPU: with the probe, wait for the worker
        time.sleep(0.2 if self.probe else 1.0)
        if self.probe:
            self.wait_idle(settle)
        deadline, last, steady = time.time() + settle, -1, 0
        while time.time() < deadline and _nvml_handle() is not None:
            used = process_vram(self.process.pid)
            steady = steady + 1 if used == last else 0
            if steady >= 3:
                break
            last = used
            time.sleep(0.3)

    def cuda_report(self, reset_peaks: bool = False) -> dict:
        """What holds GPU memory in the server (the test node's route): torch's counters,
        core's loaded models, our swaps, the largest live CUDA storages and their holders.
        ``reset_peaks``: torch's peak counters start again after this report."""
        query = "?reset_peaks=1" if reset_peaks else ""
        try:
            return request(self.url + "/blockswap_test/cuda_report" + query, timeout=120)
        except OSError as error:
            return {"error": str(error)}

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until the prompt worker is idle (a server made with ``probe=True``): nothing
        queued or running, no /free left half done. False on timeout."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.alive:
            try:
                if request(self.url + "/blockswap_test/worker_idle").get("idle"):
                    return True
            except OSError:
                pass
            time.sleep(0.1)
        return False

    def memory_report(
        self, start: bool = False, tracemalloc: bool = False, trim: bool = False
    ) -> dict:
        """Where the server's host memory is (a server made with ``probe=True``), after a GC:
        RSS split into anonymous and file pages, glibc's heap (in use, free but kept), live
        CPU tensors. ``start``: the baseline later reports compare with (objects by type, new
        tensor storages and, with ``tracemalloc``, Python allocations by source line, traced
        from then on). ``trim``: then malloc_trim(0) and the RSS again: what the heap kept
        without using it."""
        query = f"?start={int(start)}&tracemalloc={int(tracemalloc)}&trim={int(trim)}"
        try:
            return request(self.url + "/blockswap_test/memory" + query, timeout=600)
        except OSError as error:
            return {"error": str(error)}

    def rss_gib(self) -> float:
        return _rss(self.process.pid) / GIB if self.alive else 0.0


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class Sampler:
    """Peak host RSS of a process and peak device memory (NVML), sampled on a thread; and
    the GPU's state while it computes (SM clock, temperature, power), since an arm that runs
    on a warmer GPU runs at a lower clock (session 25: arms alternated to tell the two)."""

    BUSY = 90  # % utilisation from which a sample counts as computing

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak_rss = 0
        self.peak_rss_at = 0.0  # seconds after the start
        self.peak_device = 0
        self.peak_process = 0  # what NVML counts for the process itself
        self.busy: list[tuple[int, int, int]] = []  # (SM MHz, deg C, mW) while computing
        self._started = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._nvml = _nvml_handle()

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                rss = _rss(self.pid)
                if rss > self.peak_rss:
                    self.peak_rss, self.peak_rss_at = rss, time.time() - self._started
            except OSError:
                pass
            if self._nvml is not None:
                self.peak_device = max(self.peak_device, device_used(self._nvml))
                self.peak_process = max(self.peak_process, process_vram(self.pid))
                self._sample_state()
            self._stop.wait(self.interval)

    def _sample_state(self) -> None:
        import pynvml

        try:
            if pynvml.nvmlDeviceGetUtilizationRates(self._nvml).gpu < self.BUSY:
                return
            self.busy.append(
                (
                    pynvml.nvmlDeviceGetClockInfo(self._nvml, pynvml.NVML_CLOCK_SM),
                    pynvml.nvmlDeviceGetTemperature(self._nvml, pynvml.NVML_TEMPERATURE_GPU),
                    pynvml.nvmlDeviceGetPowerUsage(self._nvml),
                )
            )
        except pynvml.NVMLError:
            pass

    def gpu_state(self) -> dict[str, float] | None:
        """Mean SM clock (MHz), mean and peak temperature (C), mean power (W) over the
        samples taken while the GPU computed; None without any."""
        if not self.busy:
            return None
        count = len(self.busy)
        return dict(
            sm_mhz=round(sum(b[0] for b in self.busy) / count, 1),
            temp_c=round(sum(b[1] for b in self.busy) / count, 1),
            temp_c_peak=max(b[1] for b in self.busy),
            power_w=round(sum(b[2] for b in self.busy) / count / 1000, 1),
            samples=count,
        )


def _nvml_handle() -> Any:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(0)
    except Exception:  # no NVML (a CPU machine)
        return None


def device_used(handle: Any = None) -> int:
    """Bytes in use on GPU 0 by every process (0 without NVML)."""
    import pynvml

    handle = handle or _nvml_handle()
    return 0 if handle is None else pynvml.nvmlDeviceGetMemoryInfo(handle).used


# -- files -------------------------------------------------------------------------------


def write_wan(path: str, num_layers: int, dim: int, ffn_dim: int, seed: int = 0, **kw) -> int:
    """A random Wan checkpoint in ComfyUI's key layout (``model.diffusion_model.``), bf16,
    streamed to ``path`` tensor by tensor, generated on the GPU when there is one."""
    import torch

    import _pack  # noqa: F401  (this checkout as comfyui_wan_blockswap)
    from comfyui_wan_blockswap.model_configs.wan import comfy_state_shapes

    from writers import bf16_header

    shapes = comfy_state_shapes(dim=dim, ffn_dim=ffn_dim, num_layers=num_layers, **kw)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=device).manual_seed(seed)
    with open(path, "wb") as out:
        out.write(bf16_header(shapes)[0])
        for key, shape in shapes.items():
            fan_in = shape[1] * shape[2] * shape[3] * shape[4] if len(shape) == 5 else shape[-1]
            tensor = torch.randn(shape, generator=gen, device=device) / max(fan_in, 1) ** 0.5
            if key.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight")):
                tensor = 1 + 0.1 * tensor
            out.write(tensor.to(torch.bfloat16).cpu().view(torch.uint8).numpy().tobytes())
    return os.path.getsize(path)


def write_lora(
    path: str, dim: int, ffn_dim: int, blocks: list[int], rank: int = 4, seed: int = 1
) -> int:
    """A small LoRA on two attention projections and the FFN's output layer of ``blocks``
    (core's ``lora_up`` / ``lora_down`` key form)."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for block in blocks:
        for name in ("self_attn.q", "self_attn.o", "ffn.2"):
            base = f"diffusion_model.blocks.{block}.{name}"
            columns = ffn_dim if name == "ffn.2" else dim  # ffn.2: ffn_dim in, dim out
            state[base + ".lora_down.weight"] = (
                torch.randn(rank, columns, generator=gen) / columns**0.5
            ).to(torch.bfloat16)
            state[base + ".lora_up.weight"] = (0.2 * torch.randn(dim, rank, generator=gen)).to(
                torch.bfloat16
            )
            state[base + ".alpha"] = torch.tensor(float(rank))
    save_file(state, path)
    return os.path.getsize(path)


# -- workflows ---------------------------------------------------------------------------


# A new nonce in every workflow: ComfyUI never serves a prompt from its cache (see the test
# conditioning node), so every prompt samples.
_NONCES = iter(range(1, 2**31))


def _conditionings_and_latent(width: int, height: int, frames: int) -> dict[str, Any]:
    """Nodes "3" and "4" (positive and negative test conditionings, new nonces) and "5" (an
    empty latent), shared by the workflows."""
    return {
        "3": {
            "class_type": "WanBlockSwapTestConditioning",
            "inputs": {"seed": 1, "tokens": 8, "dim": 4096, "nonce": next(_NONCES)},
        },
        "4": {
            "class_type": "WanBlockSwapTestConditioning",
            "inputs": {"seed": 2, "tokens": 8, "dim": 4096, "nonce": next(_NONCES)},
        },
        "5": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": width, "height": height, "length": frames, "batch_size": 1},
        },
    }


def unet_loader(file: str) -> dict:
    """A Load Diffusion Model node for ``file`` (models/diffusion_models), its own dtype."""
    return {"class_type": "UNETLoader", "inputs": {"unet_name": file, "weight_dtype": "default"}}


def wan_workflow(
    model_file: str,
    *,
    frames: int,
    width: int,
    height: int,
    steps: int,
    seed: int,
    cfg: float = 5.0,
    node: dict | None = None,
    lora: tuple[str, float] | None = None,
    lora_after_node: bool = False,
    prefix: str = "blockswap",
) -> dict:
    """UNETLoader -> [LoRA] -> [WAN BlockSwap] -> KSampler -> SaveLatent, with random
    conditioning from the test node. ``node``: the WAN BlockSwap widgets, or None."""
    prompt: dict[str, Any] = {
        "1": unet_loader(model_file),
        **_conditionings_and_latent(width, height, frames),
        "7": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["6", 0], "filename_prefix": prefix},
        },
    }
    model: list = ["1", 0]

    def add_lora(source: list) -> list:
        prompt["8"] = {
            "class_type": "LoraLoaderModelOnly",
            "inputs": {"model": source, "lora_name": lora[0], "strength_model": lora[1]},
        }
        return ["8", 0]

    if lora is not None and not lora_after_node:
        model = add_lora(model)
    if node is not None:
        prompt["2"] = {"class_type": "WanBlockSwapStream", "inputs": {"model": model, **node}}
        model = ["2", 0]
    if lora is not None and lora_after_node:
        model = add_lora(model)
    prompt["6"] = {
        "class_type": "KSampler",
        "inputs": {
            "model": model,
            "seed": seed,
            "steps": steps,
            "cfg": cfg,
            "sampler_name": "euler",
            "scheduler": "simple",
            "positive": ["3", 0],
            "negative": ["4", 0],
            "latent_image": ["5", 0],
            "denoise": 1.0,
        },
    }
    return prompt


def wan22_a14b_workflow(
    high_file: str,
    low_file: str,
    *,
    frames: int,
    width: int,
    height: int,
    steps: int,
    switch_step: int,
    seed: int,
    cfg: float = 3.5,
    shift: float = 8.0,
    node_high: dict | None = None,
    node_low: dict | None = None,
    lora: tuple[str, float] | None = None,
    prefix: str = "a14b",
) -> dict:
    """Wan 2.2 A14B as its template runs it: two UNETLoaders (high-noise and low-noise
    experts), each -> [LoRA] -> [WAN BlockSwap] -> ModelSamplingSD3, and two KSamplerAdvanced:
    the high-noise model takes steps 0..switch_step and hands its leftover noise to the
    low-noise model for the rest; then SaveLatent. ``node_high`` / ``node_low``: the WAN
    BlockSwap widgets of each model, or None (core alone)."""
    prompt: dict[str, Any] = {
        **_conditionings_and_latent(width, height, frames),
        "7": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["31", 0], "filename_prefix": prefix},
        },
    }
    sampler = {
        "noise_seed": seed,
        "steps": steps,
        "cfg": cfg,
        "sampler_name": "euler",
        "scheduler": "simple",
        "positive": ["3", 0],
        "negative": ["4", 0],
    }
    # node ids: 1x the high-noise chain, 2x the low-noise chain, 30 and 31 the samplers
    for first, file, node in (("1", high_file, node_high), ("2", low_file, node_low)):
        prompt[first + "1"] = unet_loader(file)
        model: list = [first + "1", 0]
        if lora is not None:
            prompt[first + "2"] = {
                "class_type": "LoraLoaderModelOnly",
                "inputs": {"model": model, "lora_name": lora[0], "strength_model": lora[1]},
            }
            model = [first + "2", 0]
        if node is not None:
            prompt[first + "3"] = {
                "class_type": "WanBlockSwapStream",
                "inputs": {"model": model, **node},
            }
            model = [first + "3", 0]
        prompt[first + "4"] = {
            "class_type": "ModelSamplingSD3",
            "inputs": {"model": model, "shift": shift},
        }
    prompt["30"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": ["14", 0],
            "add_noise": "enable",
            **sampler,
            "latent_image": ["5", 0],
            "start_at_step": 0,
            "end_at_step": switch_step,
            "return_with_leftover_noise": "enable",
        },
    }
    prompt["31"] = {
        "class_type": "KSamplerAdvanced",
        "inputs": {
            "model": ["24", 0],
            "add_noise": "disable",
            **sampler,
            "latent_image": ["30", 0],
            "start_at_step": switch_step,
            "end_at_step": 10000,
            "return_with_leftover_noise": "disable",
        },
    }
    return prompt


def node_defaults() -> dict:
    """The WAN BlockSwap node's widgets as a new node in the UI has them."""
    import _pack

    groups = _pack.import_pack().nodes.WanBlockSwapStream.INPUT_TYPES()
    return {
        name: options["default"]
        for group in groups.values()
        for name, (_, options) in group.items()
        if "default" in options
    }


def seconds_per_iteration(log: str) -> float | None:
    """The last tqdm rate in ``log`` (ComfyUI's sampler progress bar), as seconds per step."""
    import re

    rates = re.findall(r"(\d+\.?\d*)(s/it|it/s)\]", log)
    if not rates:
        return None
    value, unit = rates[-1]
    return float(value) if unit == "s/it" else 1.0 / float(value)


def latest_latent(server: Server, prefix: str) -> str | None:
    folder = os.path.join(server.base, "output")
    names = sorted(
        (n for n in os.listdir(folder) if n.startswith(prefix) and n.endswith(".latent")),
        key=lambda n: os.path.getmtime(os.path.join(folder, n)),
    )
    return os.path.join(folder, names[-1]) if names else None


# -- a host-memory probe -----------------------------------------------------------------

# A test-only node pack (no nodes, two routes) that Server(probe=True) writes into the base
# directory: it tells a leak (grows with prompts) from one-time costs and allocator caches.
_MEMORY_PROBE = r"""
import collections
import ctypes
import gc
import tracemalloc
import weakref

NODE_CLASS_MAPPINGS = {}
PACK = "/custom_nodes/wan_blockswap/"  # where the node pack's modules are imported from
_baseline = {}


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                     "uordblks", "fordblks", "keepcost")
    ]


try:
    _libc = ctypes.CDLL("libc.so.6")
    _libc.mallinfo2.restype = _Mallinfo2
except (OSError, AttributeError):  # not glibc, or older than 2.33
    _libc = None


def _status():
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmLck", "VmPin"):
                out[key] = int(value.split()[0]) * 1024
    return out


def _heap():
    if _libc is None:
        return {}
    info = _libc.mallinfo2()  # summed over all arenas
    return {"in_use": info.uordblks, "free_kept": info.fordblks, "mmapped": info.hblkhd,
            "arenas_bytes": info.arena}


def _objects():
    import torch

    types, storages = collections.Counter(), {}
    for obj in gc.get_objects():
        kind = type(obj)
        types[f"{kind.__module__}.{kind.__qualname__}"] += 1
        if isinstance(obj, torch.Tensor):
            try:
                if obj.device.type == "cpu":
                    storage = obj.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
            except Exception:  # a subclass without plain storage
                pass
    return types, storages


def _pinned():
    # Page-locked host memory that /proc's VmLck does not count: CUDA's registrations
    # (cudaHostRegister pins through the driver, not mlock). Ours from the pack's own count,
    # core's from its pin accounting (v0.33; absent in older cores).
    import sys

    out = {}
    for name, module in list(sys.modules.items()):
        if name.endswith("wan_blockswap.storage") and hasattr(module, "registered_host_bytes"):
            out["ours"] = module.registered_host_bytes()
    management = sys.modules.get("comfy.model_management")
    if management is not None and hasattr(management, "TOTAL_PINNED_MEMORY"):
        out["core"] = int(management.TOTAL_PINNED_MEMORY)
    return out


def _snapshot():
    return tracemalloc.take_snapshot().filter_traces(
        (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__))
    )


def report(start, trace, trim):
    gc.collect()
    types, storages = _objects()
    out = {"status": _status(), "heap": _heap(), "cpu_tensors": len(storages),
           "cpu_tensor_bytes": sum(storages.values()), "objects": sum(types.values()),
           "pack_objects": {k.split("/custom_nodes/")[-1]: n for k, n in types.items()
                            if "wan_blockswap" in k},
           "finalizers": len(weakref.finalize._registry)}
    out["pinned"] = _pinned()
    try:  # core's prompt history: grows with prompts by design (up to 10000)
        from server import PromptServer

        out["history"] = len(PromptServer.instance.prompt_queue.history)
    except Exception:
        pass
    if start:
        _baseline.clear()
        _baseline.update(types=types, storages=storages)
        if trace and not tracemalloc.is_tracing():
            tracemalloc.start(12)
        if tracemalloc.is_tracing():
            _baseline["snapshot"] = _snapshot()
    elif _baseline:
        out["types_grown"] = dict((types - _baseline["types"]).most_common(12))
        new = set(storages) - set(_baseline["storages"])
        out["new_tensor_storages"] = len(new)
        out["new_tensor_bytes"] = sum(storages[ptr] for ptr in new)
        if "snapshot" in _baseline:
            diffs = _snapshot().compare_to(_baseline["snapshot"], "traceback")
            out["traced_bytes"] = tracemalloc.get_traced_memory()[0]
            out["tracemalloc_own_bytes"] = tracemalloc.get_tracemalloc_memory()
            ours = [d for d in diffs if any(PACK in f.filename for f in d.traceback)]
            out["traced_growth_pack"] = sum(d.size_diff for d in ours)
            out["traced_growth_all"] = sum(d.size_diff for d in diffs)
            out["top_growth"] = [
                {"bytes": d.size_diff, "count": d.count_diff,
                 "where": [f"{f.filename}:{f.lineno}" for f in d.traceback[-5:]]}
                for d in sorted(diffs, key=lambda d: -d.size_diff)[:10]
            ]
            out["top_growth_pack"] = [
                {"bytes": d.size_diff, "count": d.count_diff,
                 "where": [f"{f.filename}:{f.lineno}" for f in d.traceback[-5:]]}
                for d in sorted(ours, key=lambda d: -d.size_diff)[:6]
            ]
    if trim and _libc is not None:
        _libc.malloc_trim(0)
        out["status_after_trim"] = _status()
        out["heap_after_trim"] = _heap()
    return out


def worker_idle():
    # True once the prompt worker has nothing left to do: no prompt queued or running, no
    # /free flag left to act on, and the thread back waiting in the queue's get()
    import sys
    from server import PromptServer

    queue = PromptServer.instance.prompt_queue
    with queue.mutex:
        if queue.queue or queue.currently_running or queue.flags:
            return False
    for frame in sys._current_frames().values():
        names = []
        while frame is not None:
            names.append(frame.f_code.co_name)
            frame = frame.f_back
        if "prompt_worker" in names:
            return names[:3] == ["wait", "get", "prompt_worker"]
    return False


try:  # the routes, where this runs inside a server
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/blockswap_test/memory")
    async def _memory_route(request):
        query = request.rel_url.query
        flag = lambda name: query.get(name) == "1"  # noqa: E731
        return web.json_response(report(flag("start"), flag("tracemalloc"), flag("trim")))

    @PromptServer.instance.routes.get("/blockswap_test/worker_idle")
    async def _idle_route(request):
        return web.json_response({"idle": worker_idle()})

except Exception:  # imported outside a server
    pass
"""


# -- a smaller card ------------------------------------------------------------------------

_HOG = r"""
import sys, torch, pynvml
pynvml.nvmlInit()
handle = pynvml.nvmlDeviceGetHandleByIndex(0)
torch.cuda.init()
chunks = []
CHUNK = 64 * 2**20
for line in sys.stdin:
    target = max(int(line), 256 * 2**20)  # free bytes wanted on the device
    free = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    delta = free - target
    try:
        while delta >= CHUNK:
            chunks.append(torch.empty(CHUNK, dtype=torch.uint8, device="cuda"))
            delta -= CHUNK
        if delta > 2**20:
            chunks.append(torch.empty(delta, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        pass
    while delta < -2**20 and chunks:
        delta += chunks.pop().numel()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    print(pynvml.nvmlDeviceGetMemoryInfo(handle).free, flush=True)
"""


class VramHog:
    """A second process holding GPU memory so that only a set amount stays free: a small
    card on a large one, seen alike by core, dynamic VRAM and our node."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _HOG], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def leave_free(self, nbytes: int) -> int:
        """Hold memory until ``nbytes`` are free on the device; returns the free bytes."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{int(nbytes)}\n")
        self.process.stdin.flush()
        return int(self.process.stdout.readline())

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


def process_vram(pid: int) -> int:
    """GPU memory NVML counts for process ``pid`` (0 if none or without NVML)."""
    try:
        import pynvml

        handle = _nvml_handle()
        for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if proc.pid == pid:
                return int(proc.usedGpuMemory or 0)
    except Exception:
        pass
    return 0
