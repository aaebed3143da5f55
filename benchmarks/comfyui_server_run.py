"""Run a real ComfyUI server headless with this pack in custom_nodes/, queue a workflow
(UNETLoader -> WAN BlockSwap -> KSampler -> SaveLatent) through the HTTP API, and keep the
server log and the result.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_server_run.py [--cpu] [--keep DIR]

The model is a tiny random Wan written in ComfyUI's key layout (the server only sees a
file in models/diffusion_models); the conditioning comes from a test-only node, so no text
encoder file is needed. Talks only to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_NODE = os.path.join(ROOT, "tests", "comfyui", "conditioning_node")
MODEL_FILE = "wan_tiny_blockswap_test.safetensors"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_model(folder: str) -> None:
    sys.path.insert(0, ROOT)
    from callbacks.writers import random_state, write_safetensors
    from model_configs.wan import comfy_state_shapes

    import torch

    shapes = comfy_state_shapes(dim=256, ffn_dim=512, num_layers=6, in_dim=16, out_dim=16)
    write_safetensors(random_state(shapes, dtype=torch.float16), os.path.join(folder, MODEL_FILE))


def workflow(blocks_to_swap: int) -> dict:
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": MODEL_FILE, "weight_dtype": "default"},
        },
        "2": {
            "class_type": "WanBlockSwapStream",
            "inputs": {
                "model": ["1", 0],
                "blocks_to_swap": blocks_to_swap,
                "offload_txt_emb": True,
                "offload_img_emb": False,
                "use_non_blocking": True,
                "vace_blocks_to_swap": 0,
                "prefetch_blocks": 1,
                "block_swap_debug": True,
            },
        },
        "3": {
            "class_type": "WanBlockSwapTestConditioning",
            "inputs": {"seed": 1, "tokens": 8, "dim": 4096},
        },
        "4": {
            "class_type": "WanBlockSwapTestConditioning",
            "inputs": {"seed": 2, "tokens": 8, "dim": 4096},
        },
        "5": {
            "class_type": "EmptyHunyuanLatentVideo",
            "inputs": {"width": 64, "height": 64, "length": 5, "batch_size": 1},
        },
        "6": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["2", 0],
                "seed": 3,
                "steps": 3,
                "cfg": 3.0,
                "sampler_name": "euler",
                "scheduler": "simple",
                "positive": ["3", 0],
                "negative": ["4", 0],
                "latent_image": ["5", 0],
                "denoise": 1.0,
            },
        },
        "7": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["6", 0], "filename_prefix": "blockswap_test"},
        },
    }


def request(url: str, payload: dict | None = None, timeout: float = 10) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as response:
        return json.loads(response.read() or b"{}")


def run(comfyui: str, workdir: str, cpu: bool, timeout: float = 300) -> dict:
    base = os.path.join(workdir, "base")
    for sub in ("custom_nodes", "models/diffusion_models", "input", "output", "user", "temp"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    os.symlink(ROOT, os.path.join(base, "custom_nodes", "wan_blockswap"))
    shutil.copytree(TEST_NODE, os.path.join(base, "custom_nodes", "blockswap_test_conditioning"))
    write_model(os.path.join(base, "models", "diffusion_models"))
    frontend = os.path.join(workdir, "frontend")
    os.makedirs(frontend, exist_ok=True)
    port = free_port()
    log_path = os.path.join(workdir, "server.log")
    command = [
        sys.executable,
        os.path.join(comfyui, "main.py"),
        "--listen",
        "127.0.0.1",
        "--port",
        str(port),
        "--base-directory",
        base,
        "--front-end-root",
        frontend,
        "--disable-auto-launch",
    ] + (["--cpu"] if cpu else [])
    url = f"http://127.0.0.1:{port}"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while True:
                try:
                    request(url + "/system_stats", timeout=2)
                    break
                except OSError:
                    if server.poll() is not None or time.time() > deadline:
                        raise RuntimeError(f"server did not start; see {log_path}")
                    time.sleep(0.5)
            nodes = request(url + "/object_info/WanBlockSwapStream")
            prompt_id = request(url + "/prompt", {"prompt": workflow(4)})["prompt_id"]
            while True:
                history = request(url + f"/history/{prompt_id}")
                if prompt_id in history:
                    break
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"workflow did not finish; see {log_path}")
                time.sleep(0.5)
        finally:
            server.terminate()
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()
    entry = history[prompt_id]
    outputs = os.listdir(os.path.join(base, "output"))
    with open(log_path) as handle:
        log_text = handle.read()
    return {
        "status": entry.get("status", {}),
        "node_registered": "WanBlockSwapStream" in nodes,
        "outputs": outputs,
        "plan_logged": "wan_blockswap on WanModel" in log_text,
        "log_path": log_path,
        "device": "cpu" if cpu else "cuda",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--keep", help="copy the log and result JSON into this folder")
    args = parser.parse_args()
    comfyui = os.environ.get("COMFYUI_PATH")
    if not comfyui:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as workdir:
        result = run(os.path.abspath(comfyui), workdir, args.cpu)
        print(json.dumps({k: v for k, v in result.items() if k != "log_path"}, indent=2))
        if args.keep:
            os.makedirs(args.keep, exist_ok=True)
            shutil.copy(result["log_path"], os.path.join(args.keep, "server.log"))
            with open(os.path.join(args.keep, "result.json"), "w") as handle:
                json.dump({k: v for k, v in result.items() if k != "log_path"}, handle, indent=2)
    ok = result["status"].get("status_str") == "success" and result["outputs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
