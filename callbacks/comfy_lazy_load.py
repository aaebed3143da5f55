"""The WAN BlockSwap Model Loader's side of core: build a ComfyUI model from a safetensors
file without reading its weights, apply the swap, then stream every tensor to its place
(swapped blocks into page-locked host buffers, the rest to core's offload device)."""

from __future__ import annotations

from typing import Any

import torch

import comfy.model_management
import comfy.model_patcher
from .. import model_configs
from ..wan_blockswap import BlockSwap, SwapConfig

from .comfy_adapter import install_callbacks, register_swap, resident_bytes


def load_lazily(path: str, config: SwapConfig, dtype: torch.dtype | None = None) -> Any:
    """Build a ComfyUI model for the safetensors file ``path`` without reading its weights,
    apply ``config``, then stream every tensor from the file to its place: swapped blocks into
    pinned host buffers, the rest to the offload device, where core loads it from. The file is
    never held whole in RAM and never passes through VRAM."""
    import comfy.model_detection
    import comfy.utils

    from .checkpoint import CheckpointError, open_checkpoint
    from .skeleton import CheckpointMismatchError
    from .lazy_loader import Entry, stream_into

    mm = comfy.model_management
    with open_checkpoint(path) as checkpoint:
        if checkpoint.format != "safetensors":
            raise CheckpointError(
                f"{path}: the lazy loader reads safetensors; load GGUF files with "
                f"ComfyUI-GGUF's loader and add the WAN BlockSwap node after it"
            )
        shapes = {
            name: torch.empty(record.shape, dtype=record.dtype, device="meta")
            for name, record in checkpoint.records.items()
        }
        prefix = comfy.model_detection.unet_prefix_from_state_dict(shapes)
        file_key = {name[len(prefix) :]: name for name in shapes if name.startswith(prefix)}
        if not file_key:
            file_key = {name: name for name in shapes}
        sd = {key: shapes[name] for key, name in file_key.items()}
        # LTX-2 files keep their config in the metadata, as core's loader reads it
        model_config = comfy.model_detection.model_config_from_unet(
            sd, "", metadata=checkpoint.metadata
        )
        if model_config is None:
            raise CheckpointError(
                f"{path}: not a diffusion model in ComfyUI's key layout that core can detect; "
                f"load it with the core loader and add the WAN BlockSwap node after it"
            )
        file_key = _core_key_names(model_config, sd, file_key, path)
        load_device = mm.get_torch_device()
        offload_device = mm.unet_offload_device()
        if dtype is None:
            weight_dtype = comfy.utils.weight_dtype(sd)
            if _quantized(model_config):
                weight_dtype = None
            dtype = mm.unet_dtype(
                model_params=comfy.utils.calculate_parameters(sd),
                supported_dtypes=list(model_config.supported_inference_dtypes),
                weight_dtype=weight_dtype,
            )
        manual_cast = mm.unet_manual_cast(
            dtype, load_device, model_config.supported_inference_dtypes
        )
        model_config.set_inference_dtype(dtype, manual_cast)
        model = model_config.get_model(sd, "")
        diffusion_model = model.diffusion_model
        names = dict(diffusion_model.state_dict(keep_vars=True))
        missing = [n for n in names if n not in file_key]
        unexpected = [k for k in file_key if k not in names]
        if missing or unexpected:
            raise CheckpointMismatchError(
                f"{path}: keys do not match {type(diffusion_model).__name__} (missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}); load it with the core loader "
                f"and add the WAN BlockSwap node after it"
            )
        # Nothing is read yet: give the model meta tensors, so the swap allocates only what
        # the plan needs (host buffers for swapped blocks) and nothing is copied twice.
        for name, tensor in names.items():
            _set_tensor(diffusion_model, name, torch.empty_like(tensor, device="meta"))
        arch = model_configs.detect(diffusion_model)
        swap = BlockSwap.apply(
            diffusion_model,
            config,
            arch.layout,
            load_device,
            move_resident=False,
            allocate_empty=False,
        )
        try:
            entries = []
            for name, tensor in names.items():
                if swap.swapped_tensor(name) is None:  # resident: core moves it later
                    dest = torch.empty(tensor.shape, dtype=tensor.dtype, device=offload_device)
                    _set_tensor(diffusion_model, name, dest)
                record = checkpoint.records[file_key[name]]
                raw = record.qtype is None and record.dtype == tensor.dtype
                entries.append(Entry(name, record, tensor.dtype, raw))
            stream_into(checkpoint, entries, swap, load_device, _comfy_progress())
        except BaseException:
            swap.remove(restore=False)
            raise
    state = register_swap(diffusion_model, swap, config, arch.name)
    patcher = comfy.model_patcher.ModelPatcher(
        model, load_device=load_device, offload_device=offload_device
    )
    install_callbacks(patcher)
    patcher.size = resident_bytes(patcher.model, swap) + state.ring_bytes
    return patcher


def _core_key_names(
    model_config: Any, sd: dict[str, torch.Tensor], file_key: dict[str, str], path: str
) -> dict[str, str]:
    """The model's key -> file key, after the renames core's loader applies to this family
    (``process_unet_state_dict``: Flux's and Flux.2's ``*.scale`` norms, HunyuanVideo 1.5's
    original names, ...). The renames carry the (meta) tensors along, so each new key is
    traced back to its file key by the tensor object; a family whose conversion makes new
    tensors cannot be read lazily."""
    from .checkpoint import CheckpointError

    source = {id(tensor): file_key[key] for key, tensor in sd.items()}
    renamed = model_config.process_unet_state_dict(dict(sd))
    out = {}
    for key, tensor in renamed.items():
        name = source.get(id(tensor))
        if name is None:
            raise CheckpointError(
                f"{path}: ComfyUI converts this file's tensors while loading ({key}), which "
                f"the lazy loader cannot stream; load it with the core loader and add the "
                f"WAN BlockSwap node after it"
            )
        out[key] = name
    return out


def _quantized(model_config: Any) -> bool:
    """Whether core marks the file's weights as quantized: ``quant_config`` on current core,
    ``scaled_fp8`` on 0.3.x. Looked up statically: current core warns on every read of an
    attribute it no longer has."""
    import inspect

    return any(
        inspect.getattr_static(model_config, name, None) is not None
        for name in ("quant_config", "scaled_fp8")
    )


def _set_tensor(root: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    module_path, _, attr = name.rpartition(".")
    owner = root.get_submodule(module_path) if module_path else root
    if attr in owner._parameters:
        owner._parameters[attr] = torch.nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[attr] = value


def _comfy_progress():
    """Core's progress bar (shown on the node in the UI), fed per tensor."""
    import comfy.utils

    bar = comfy.utils.ProgressBar(100)

    def update(done: int, total: int, label: str) -> None:
        bar.update_absolute(int(100 * done / max(total, 1)), 100)

    return update
