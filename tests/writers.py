"""Writing checkpoints in the formats the loader reads, for the performance script, the
benchmarks and the tests: ComfyUI single-file safetensors (bf16 or fp8) and GGUF."""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping

import torch
from safetensors.torch import save_file

COMFY_PREFIX = "model.diffusion_model."


def random_state(
    shapes: Mapping[str, tuple[int, ...]],
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str = "cpu",
) -> dict[str, torch.Tensor]:
    """Random weights of the given shapes, scaled like initialised layers (std 1/sqrt(fan-in))
    so activations stay finite through many blocks."""
    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        fan_in = shape[-1] if len(shape) > 1 else 1
        if len(shape) == 5:  # conv patch embedding
            fan_in = shape[1] * shape[2] * shape[3] * shape[4]
        t = torch.randn(shape, generator=gen, device=device) / fan_in**0.5
        if key.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight")):
            t = 1 + 0.1 * t
        state[key] = t.to(dtype)
    return state


def write_safetensors(
    state: Mapping[str, torch.Tensor], path: str | os.PathLike, prefix: str = COMFY_PREFIX
) -> int:
    """Save ``state`` with ``prefix`` on every key (ComfyUI's full-checkpoint layout by
    default); returns the file size."""
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(path))
    return os.path.getsize(path)


def bf16_header(
    shapes: Mapping[str, tuple[int, ...]], prefix: str = COMFY_PREFIX
) -> tuple[bytes, int]:
    """A safetensors header for bf16 tensors of ``shapes`` in that order (its 8-byte length
    first), and the size of the data that follows it: for files written tensor by tensor, or
    left as a hole (a sparse file whose header alone is read)."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[prefix + key] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob, offset


def to_fp8(
    state: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float8_e4m3fn
) -> dict[str, torch.Tensor]:
    """fp8 for 2-D weights (what fp8 checkpoints quantise), the rest unchanged."""
    return {
        k: (v.to(dtype) if v.ndim == 2 and k.endswith(".weight") else v) for k, v in state.items()
    }


def write_gguf(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    qtype_name: str = "Q8_0",
    arch: str = "wan",
    quantize: bool = True,
) -> int:
    """Write a GGUF file as ComfyUI-GGUF's converter does: 2-D weights quantised to
    ``qtype_name``, everything else F32 (5-D conv weights F16). Types the ``gguf`` package
    cannot quantise (the K types), and every type when ``quantize`` is false (fast, for
    benchmarks), get random blocks with valid scales: enough for load and speed
    measurements, not for quality."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[qtype_name]
    writer = gguf.GGUFWriter(str(path), arch)
    rng = np.random.default_rng(0)
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    for key, tensor in state.items():
        if tensor.ndim == 2 and key.endswith(".weight") and tensor.shape[-1] % block == 0:
            try:
                if not quantize:
                    raise NotImplementedError
                data = gguf.quants.quantize(tensor.float().numpy(), qtype)
            except NotImplementedError:
                rows, columns = tensor.shape
                data = rng.integers(0, 256, (rows, columns // block * type_size), np.uint8)
                _sane_scales(data, qtype_name, type_size)
            writer.add_tensor(key, data, raw_dtype=qtype)
        elif tensor.ndim == 5:
            writer.add_tensor(key, tensor.float().numpy().astype(np.float16))
        else:
            writer.add_tensor(key, tensor.float().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.path.getsize(path)


def _sane_scales(data, qtype_name: str, type_size: int) -> None:
    """Put small float16 super-block scales where random bytes would give inf/NaN."""
    import numpy as np

    scale_offsets = {
        "Q4_K": (0, 2),
        "Q5_K": (0, 2),
        "Q2_K": (type_size - 4, type_size - 2),
        "Q3_K": (type_size - 2,),
        "Q6_K": (type_size - 2,),
    }
    blocks = data.reshape(-1, type_size)
    scale = np.frombuffer(np.float16(0.001).tobytes(), dtype=np.uint8)
    for offset in scale_offsets.get(qtype_name, ()):
        blocks[:, offset : offset + 2] = scale
