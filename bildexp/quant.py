"""Weight-only quantization of a loaded model's Linear layers (`pair.small_quant`, `pair.large_quant`).

Quantized drafts are what practitioners pair with a full-precision target (llama.cpp Q4 drafts, int8/int4 drafts on
Xeon): at batch size 1 a decoder step is bound by reading its weights, so 4-bit weights make the draft's step several
times cheaper while its proposals barely change. Only the weights are quantized; activations, norms, embeddings and
the KV cache keep the pair's dtype.

    int8   per output channel, symmetric: w ≈ q · s, q in [-128, 127]; torch's `aten._weight_int8pack_mm`
           (CPU); on CUDA the same arithmetic as F.linear(x, q.to(dtype)) · s (inductor fuses it when compiled)
    int4   per group of `group_size` inputs, asymmetric: w ≈ q · s + min, q in [0, 15]; torch's
           `aten._weight_int4pack_mm_for_cpu` (CPU, fp32/bf16/fp16 activations) or `aten._weight_int4pack_mm`
           (CUDA, bf16 activations), both taking scales and zeros as [K / group, N, 2] with w = (q - 8) · s + z

The weight-only kernels cost the same per row at any number of rows (a 341-token prompt pays 341 steps' worth of
weight reads), while a dense GEMM reuses each weight across rows: with `dense_rows` > 0, a pass of at least that many
rows (a prompt, an encoder input) runs F.linear on the dequantized weights, kept beside the codes in the activation
dtype. Same weights, another kernel: the quantized model's outputs agree with themselves within rounding, its decode
steps keep the weight-only kernels, and its weights take their full-precision memory again.

These are the kernels torchao's weight-only configs call on these devices; they are used here directly because
torchao 0.18's int4 CPU config is a prototype and its int8 weight-only config computes mm(x, w.to(bf16)) · s in eager,
with no fast CPU path (docs/testbeds.md, "qwen25_int4"). Every nn.Linear is replaced, the LM head included (a tied
input embedding stays as it was). The modules trace under torch.compile (fullgraph) like any other.
"""

from __future__ import annotations

import torch
from torch import nn

from bildexp import BildexpError
from bildexp.config import QUANT_MODES

_INT4_INNER_K_TILES = 8  # CUDA packing layout (gpt-fast's choice); the CPU packing ignores it


class WeightOnlyLinear(nn.Module):
    """A Linear layer y = x Wᵀ + b whose W [N, K] is held as int8 or int4 codes with their scales."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int, dense_rows: int = 0):
        super().__init__()
        w = linear.weight.detach()  # [N, K]
        self.out_features, self.in_features = w.shape
        self.mode, self.group_size = mode, group_size
        # No float weight: transformers' T5 casts its activations to `wo.weight.dtype` only when that is a tensor.
        self.weight = None
        self.on_cuda = w.device.type == "cuda"
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        dtype = w.dtype
        if mode == "int8":
            scale = w.float().abs().amax(dim=1).clamp(min=1e-8) / 127  # [N]
            self.register_buffer("codes", (w.float() / scale[:, None]).round().clamp(-128, 127).to(torch.int8))
            self.register_buffer("scales", scale.to(dtype))
        else:
            n, k, g = self.out_features, self.in_features, group_size
            groups = w.float().reshape(n, k // g, g)
            lo, hi = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
            scale = (hi - lo).clamp(min=1e-8) / 15  # [N, K/g, 1]
            q = ((groups - lo) / scale).round().clamp(0, 15).to(torch.int32).reshape(n, k)  # [N, K]
            zero = lo + 8 * scale  # the kernels dequantize (q - 8) · s + z
            # [N, K/g, 2] → [K/g, N, 2]: one group's scale and zero side by side, as both kernels read them
            self.register_buffer("scales_and_zeros", torch.cat([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype))
            if self.on_cuda:
                packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)  # [N, K/2], two codes a byte
                self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack(packed, _INT4_INNER_K_TILES))
            else:
                self.register_buffer("codes", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
        self.dense_rows = 0
        if dense_rows > 0:  # the dequantized weight [N, K] for passes of many rows
            self.register_buffer("dense", self.dequantize().to(dtype))
            self.dense_rows = dense_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [..., K] → [..., N]
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # [M, K]
        if 0 < self.dense_rows <= x2.shape[0]:
            y = nn.functional.linear(x2, self.dense)
        elif self.mode == "int8":
            if self.on_cuda:
                y = nn.functional.linear(x2, self.codes.to(x2.dtype)) * self.scales
            else:
                y = torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales)
        elif self.on_cuda:
            y = torch.ops.aten._weight_int4pack_mm(x2, self.codes, self.group_size, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.codes, self.group_size, self.scales_and_zeros)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], self.out_features)

    @torch.no_grad()
    def dequantize(self) -> torch.Tensor:
        """The weight W [N, K] these codes stand for, in float32, read back through the layer's own kernel (x = I)."""
        eye = torch.eye(self.in_features, dtype=self.scales_dtype, device=self.codes.device)
        bias, dense_rows, self.bias, self.dense_rows = self.bias, self.dense_rows, None, 0
        try:
            return self.forward(eye).float().T.contiguous()  # [K, N] → [N, K]
        finally:
            self.bias, self.dense_rows = bias, dense_rows

    @property
    def scales_dtype(self) -> torch.dtype:
        return (self.scales if self.mode == "int8" else self.scales_and_zeros).dtype

    def storage_bytes(self) -> int:
        """Bytes a decode step reads: the codes and their scales (and zeros), not the dense copy for long passes."""
        return sum(b.numel() * b.element_size() for name, b in self.named_buffers() if name != "dense")

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        dense = f", dense_rows={self.dense_rows}" if self.dense_rows else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.mode}{group}{dense}"


def check(model: nn.Module, mode: str, group_size: int, what: str, dense_rows: int = 0,
          group_setting: str = "pair.quant_group_size") -> None:
    """One-line errors for a quantization this model, dtype and device cannot take (before anything is replaced);
    group_setting: the setting group_size came from, named in the errors."""
    if mode not in QUANT_MODES:
        raise BildexpError(f"{what}={mode!r} is not one of {', '.join(QUANT_MODES)}")
    if dense_rows < 0:
        raise BildexpError(f"pair.quant_dense_rows={dense_rows} must be >= 0 (0: the weight-only kernels at every pass)")
    if mode != "int4":
        return
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if device.type not in ("cpu", "cuda"):
        raise BildexpError(f"{what}=int4 runs on cpu and cuda, not {device.type}: use int8 or none")
    if device.type == "cuda" and dtype != torch.bfloat16:
        raise BildexpError(f"{what}=int4 on CUDA needs bfloat16 activations (torch's int4 kernel): use pair.dtype=bfloat16 or int8")
    if group_size < 2 or group_size & (group_size - 1):
        raise BildexpError(f"{group_setting}={group_size} must be a power of two >= 2 (32, 64, 128 or 256)")
    bad = sorted({m.in_features for m in model.modules() if isinstance(m, nn.Linear) and m.in_features % group_size})
    if bad:
        raise BildexpError(f"{what}=int4: Linear layers with {bad[0]} inputs cannot be cut into groups of "
                           f"{group_size}: set {group_setting} to a power of two that divides {bad[0]}")


def quantize(model: nn.Module, mode: str, group_size: int, what: str = "pair.small_quant", dense_rows: int = 0,
             head_group_size: int | None = None) -> int:
    """Replace every nn.Linear of `model` (LM head included) by a WeightOnlyLinear; → the number replaced (0 for none).
    dense_rows > 0: passes of at least that many rows run dense on the dequantized weights (WeightOnlyLinear).
    head_group_size (int4): the LM head's own group size (the other layers take group_size)."""
    check(model, mode, group_size, what, dense_rows)
    if mode == "none":
        return 0
    if mode == "int4" and head_group_size:
        head = model.get_output_embeddings()
        check(head, mode, head_group_size, what, dense_rows, "pair.quant_head_group_size")
        model.set_output_embeddings(WeightOnlyLinear(head, mode, head_group_size, dense_rows))
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        model.set_submodule(name, WeightOnlyLinear(model.get_submodule(name), mode, group_size, dense_rows))
    return len(names)


def linear_weights(module: nn.Module) -> tuple[int, int]:
    """(weights, bytes) of the Linear-like layers under `module` and its other parameters: what a pass reads."""
    count = nbytes = 0
    quantized = [m for m in module.modules() if isinstance(m, WeightOnlyLinear)]
    for m in quantized:
        count += m.in_features * m.out_features
        nbytes += m.storage_bytes()
    for p in module.parameters():
        count += p.numel()
        nbytes += p.numel() * p.element_size()
    return count, nbytes

