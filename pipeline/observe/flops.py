"""Model FLOPs per token, and the MFU / HFU that ``metrics.jsonl`` reports.

Per non-padding token of a row of length s, with a frozen base and trainable adapters:

    model FLOPs = 4 x frozen matmul parameters      (forward 2, gradient of the input 2; no weight gradient)
                + 6 x trainable parameters          (forward 2, input gradient 2, weight gradient 2)
                + 12 x layers x d_model x s         (attention scores and weighted sum: forward 4 s d, backward 8 s d)

Gradient checkpointing runs each block's forward twice: hardware FLOPs add 2 x (all matmul parameters) +
4 x layers x d_model x s per token. MFU = model FLOPs per second / (peak x ranks); HFU the same with hardware
FLOPs. The peak is dense bf16 from the GPU name (below) or ``train.peak_tflops``; on CPU it must be given, else
``mfu`` is null. ``tests/test_flops.py`` checks the count against ``torch.utils.flop_counter.FlopCounterMode``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks, TFLOP/s per GPU (NVIDIA datasheets), most specific name first: torch reports
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL" and "NVIDIA H100 80GB HBM3" (SXM).
PEAK_TFLOPS = {"H100 PCIE": 756.0, "H100 NVL": 835.0, "H800 PCIE": 756.0, "H200": 989.0, "H100": 989.0,
               "H800": 989.0, "GH200": 989.0, "A100": 312.0, "A800": 312.0, "L40S": 362.0}


def peak_tflops(configured: float, on_gpu: bool) -> float | None:
    """``configured`` if set, else the peak of this GPU by name, else None (CPU, or a GPU not in the table)."""
    if configured > 0:
        return configured
    if not on_gpu:
        return None
    return peak_by_name(torch.cuda.get_device_name())


def peak_by_name(device_name: str) -> float | None:
    name = device_name.upper()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


@dataclass(frozen=True)
class FlopModel:
    frozen_matmul: int  # elements of frozen Linear weights (the LM head included; embeddings are lookups)
    trainable: int
    layers: int
    d_model: int

    def per_token(self, seq: int) -> float:
        return 4.0 * self.frozen_matmul + 6.0 * self.trainable + 12.0 * self.layers * self.d_model * seq

    def recompute_per_token(self, seq: int) -> float:
        """The extra forward of gradient checkpointing."""
        return 2.0 * (self.frozen_matmul + self.trainable) + 4.0 * self.layers * self.d_model * seq


def flop_model(model: torch.nn.Module) -> FlopModel:
    """Count from the model itself (ZeRO-3 partitioned parameters by their full size)."""
    def size(p):
        return int(getattr(p, "ds_numel", p.numel()))

    frozen = sum(size(m.weight) for m in model.modules()
                 if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad)
    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    config = model.config
    return FlopModel(frozen, trainable, config.num_hidden_layers, config.hidden_size)


def batch_flops(fm: FlopModel, attention_mask: torch.Tensor, checkpointing: bool,
                doc_lengths: torch.Tensor | None = None) -> tuple[float, float]:
    """(model FLOPs, hardware FLOPs) of one micro-batch, from its non-padding tokens and padded row length; for
    packed rows (``doc_lengths`` given), each document attends over its own length only."""
    if doc_lengths is not None:
        lengths = [int(n) for n in doc_lengths]
        model = sum(n * fm.per_token(n) for n in lengths)
        return model, model + (sum(n * fm.recompute_per_token(n) for n in lengths) if checkpointing else 0.0)
    tokens = float(attention_mask.sum())
    seq = attention_mask.shape[1]
    model = tokens * fm.per_token(seq)
    return model, model + (tokens * fm.recompute_per_token(seq) if checkpointing else 0.0)
