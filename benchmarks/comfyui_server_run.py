"""Run a real ComfyUI server headless with this pack in custom_nodes/, queue a workflow
(UNETLoader -> WAN BlockSwap -> KSampler -> SaveLatent) through the HTTP API, and keep the
server log and the result.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfyui_server_run.py [--cpu] [--keep DIR]

The model is a tiny random Wan written in ComfyUI's key layout (the server only sees a
file in models/diffusion_models); the conditioning comes from a test-only node, so no text
encoder file is needed. Talks only to 127.0.0.1 (``comfy_server``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_server as cs  # noqa: E402

MODEL_FILE = "wan_tiny_blockswap_test.safetensors"


def run(comfyui: str, workdir: str, cpu: bool, timeout: float = 300) -> dict:
    server = cs.Server(comfyui, workdir, ("--cpu",) if cpu else ())
    cs.write_wan(os.path.join(server.models, MODEL_FILE), 6, dim=256, ffn_dim=512)
    node = {**cs.node_defaults(), "preset": "custom (use the widgets)", "blocks_to_swap": 4}
    node.update(offload_txt_emb=True, block_swap_debug=True)
    prompt = cs.wan_workflow(
        MODEL_FILE, frames=5, width=64, height=64, steps=3, seed=3, cfg=3.0, node=node
    )
    with server:
        nodes = cs.request(server.url + "/object_info/WanBlockSwapStream")
        result = server.queue(prompt, timeout=timeout)
    with open(server.log_path) as handle:
        log_text = handle.read()
    return {
        "status": result["status"],
        "error": result.get("error", ""),
        "node_registered": "WanBlockSwapStream" in nodes,
        "outputs": os.listdir(os.path.join(server.base, "output")),
        "plan_logged": "wan_blockswap on WanModel" in log_text,
        "log_path": server.log_path,
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
    ok = result["status"] == "success" and result["outputs"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
