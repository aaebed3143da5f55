"""A test-only custom node: random text conditioning, so a workflow can sample a diffusion
model without a text encoder file. Copied into a throwaway ComfyUI base directory by the
server test; never part of the pack."""

import weakref

import torch


class WanBlockSwapTestConditioning:
    CATEGORY = "wan_blockswap/testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1}),
                "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
                "dim": ("INT", {"default": 4096, "min": 1, "max": 8192}),
            },
            # changes nothing but ComfyUI's cache key: a prompt equal to an earlier one samples
            # again instead of reusing the cached result
            "optional": {"nonce": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1})},
        }

    def make(self, seed, tokens, dim, nonce=0):
        gen = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, dim, generator=gen), {}]],)


NODE_CLASS_MAPPINGS = {"WanBlockSwapTestConditioning": WanBlockSwapTestConditioning}


def cuda_report(limit: int = 6) -> dict:
    """What holds GPU memory in this process, for a benchmark that finds VRAM kept after
    /free: torch's counters, core's loaded models, the node pack's swaps, and the largest
    live CUDA storages with what refers to them (type names and dictionary keys, a few hops
    up)."""
    import gc
    import sys

    gc.collect()
    report: dict = {}
    if torch.cuda.is_available():
        report["allocated"] = torch.cuda.memory_allocated()
        report["reserved"] = torch.cuda.memory_reserved()
        # after an out-of-memory error: how far torch's own counters got, and how much of
        # what it reserved sat in split, unused pieces (fragments) rather than in tensors
        stats = torch.cuda.memory_stats()
        for key in (
            "allocated_bytes.all.peak",
            "reserved_bytes.all.peak",
            "inactive_split_bytes.all.current",
            "inactive_split_bytes.all.peak",
            "num_alloc_retries",
            "num_ooms",
        ):
            report[key] = stats.get(key)
        report["cuda_free"], report["cuda_total"] = torch.cuda.mem_get_info()
    mm = sys.modules.get("comfy.model_management")
    if mm is not None:
        report["loaded_models"] = [
            {
                "model": type(entry.model.model).__name__ if entry.model is not None else None,
                "patcher": type(entry.model).__name__ if entry.model is not None else None,
                "loaded": entry.model.loaded_size() if entry.model is not None else None,
                "dead": entry.is_dead(),
            }
            for entry in mm.current_loaded_models
        ]
    # the pack's adapter, under whatever package name ComfyUI gave the pack's folder
    adapter = next(
        (m for n, m in list(sys.modules.items()) if n.endswith(".callbacks.comfy_adapter")), None
    )
    if adapter is not None:
        report["swaps"] = [
            {
                "model": type(model).__name__,
                "ring_held": state.swap.ring_bytes_held(),
                "cuda_params": sum(
                    p.numel() * p.element_size() for p in model.parameters() if p.is_cuda
                ),
            }
            for model, state in list(adapter._states.items())
        ]
    storages: dict = {}
    for obj in gc.get_objects():
        try:
            if not isinstance(obj, torch.Tensor) or obj.device.type != "cuda":
                continue
            storage = obj.untyped_storage()
        except Exception:
            continue
        entry = storages.setdefault(storage.data_ptr(), {"bytes": storage.nbytes(), "tensors": []})
        entry["tensors"].append(weakref.ref(obj))  # weakly: not a referrer of its own
    obj = None
    report["cuda_storages"] = len(storages)
    report["cuda_storage_bytes"] = sum(e["bytes"] for e in storages.values())
    largest = sorted(storages.values(), key=lambda e: -e["bytes"])[:limit]
    report["largest"] = []
    for e in largest:
        for ref in e["tensors"][:2]:
            tensor = ref()
            if tensor is not None:
                report["largest"].append(
                    {
                        "bytes": e["bytes"],
                        "shape": list(tensor.shape),
                        "dtype": str(tensor.dtype),
                        "held_by": _referrers(tensor, 4, set()),
                    }
                )
            tensor = None
    return report


def _referrers(obj, depth: int, ours: set) -> list:
    """Who refers to ``obj``: type names, with the key where a dictionary holds it, a few
    hops up (the lists this walk makes itself left out)."""
    import gc
    import types

    found = gc.get_referrers(obj)
    ours.add(id(found))
    out = []
    for ref in found:
        if id(ref) in ours or isinstance(ref, (types.FrameType, types.CellType)):
            continue
        name = type(ref).__name__
        if isinstance(ref, dict):
            keys = [k for k, v in ref.items() if v is obj][:2]
            name += f"[{', '.join(map(str, keys))}]"
        out.append({name: _referrers(ref, depth - 1, ours)} if depth > 1 else name)
        if len(out) >= 4:
            break
    return out


try:  # a route, where this node runs inside a server
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/blockswap_test/cuda_report")
    async def _cuda_report_route(request):
        import json

        report = cuda_report()
        if request.query.get("reset_peaks") and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # the next report's peaks are the next prompt's
        return web.json_response(json.loads(json.dumps(report, default=str)))

except Exception:  # no server (core imported in a test process)
    pass
