"""Linear layers whose weights stay in their file's low-bit form until the forward needs them.

fp8 weights are stored and swapped as fp8 and upcast on the GPU per layer (as ComfyUI's
manual cast does); GGUF-quantized weights are stored and swapped as their raw blocks and
dequantized on the GPU right before use. Either way a swapped block crosses PCIe at its file
size, not at bf16 size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .gguf_dequant import dequantize


class CastLinear(nn.Linear):
    """``nn.Linear`` whose weight (and bias) may be stored in a narrower dtype than the input."""

    def reset_parameters(self) -> None:
        """Nothing to initialise: built on the meta device for a loader to fill."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)


class GGUFLinear(nn.Linear):
    """``nn.Linear`` whose ``weight`` holds a GGUF tensor's raw bytes (``uint8``).

    ``qtype`` is the GGML quantization type; ``in_features``/``out_features`` give the
    logical shape, which the raw tensor no longer has.
    """

    qtype: int

    def reset_parameters(self) -> None:
        """Nothing to initialise: a loader fills the raw bytes. (``nn.Linear`` would run its
        random init on the meta device, a third of the time a GGUF skeleton takes.)"""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize(
            self.weight, self.qtype, (self.out_features, self.in_features), dtype=x.dtype
        )
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, qtype={self.qtype}"


def to_cast_linear(linear: nn.Linear, dtype: torch.dtype) -> CastLinear:
    """A meta-device :class:`CastLinear` of the same shape whose weight is ``dtype``."""
    layer = CastLinear(
        linear.in_features, linear.out_features, linear.bias is not None, device="meta"
    )
    layer.weight = nn.Parameter(
        torch.empty_like(linear.weight, device="meta", dtype=dtype), requires_grad=False
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
    return layer


def to_gguf_linear(linear: nn.Linear, qtype: int, nbytes: int) -> GGUFLinear:
    """A meta-device :class:`GGUFLinear` holding ``nbytes`` raw bytes of type ``qtype``."""
    layer = GGUFLinear(
        linear.in_features, linear.out_features, linear.bias is not None, device="meta"
    )
    layer.qtype = int(qtype)
    layer.weight = nn.Parameter(
        torch.empty(nbytes, dtype=torch.uint8, device="meta"), requires_grad=False
    )
    if linear.bias is not None:
        layer.bias = nn.Parameter(torch.empty_like(linear.bias, device="meta"), requires_grad=False)
    return layer
