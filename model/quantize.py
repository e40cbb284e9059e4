"""Int8 inference (--quantize int8): dynamically quantised linear layers for the LLM, on CPU.

Kept out of the model file: it swaps the model's attention and FFN modules for variants that compute
q|k|v and the two SwiGLU inputs with one matrix each, then lets torch quantise every linear layer.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .model_minimind import Attention, FeedForward


class FusedQKVAttention(Attention):
    """Attention with wq|wk|wv as one matrix `fused_qkv`."""

    def project_qkv(self, x):
        kv = self.n_kv_heads * self.head_dim
        return self.fused_qkv(x).split([self.n_heads * self.head_dim, kv, kv], -1)


class FusedFeedForward(FeedForward):
    """SwiGLU with w1|w3 as one matrix `fused_w13`."""

    def forward(self, x):
        gate, up = self.fused_w13(x).chunk(2, -1)
        return self.w2(F.silu(gate) * up)


def _fuse(*linears):
    fused = nn.Linear(linears[0].in_features, sum(m.out_features for m in linears), bias=False)
    fused.weight.data = torch.cat([m.weight.data for m in linears])
    return fused


def fuse_projections(model):
    """In place: every Attention computes q, k and v with one matmul, every FeedForward (experts
    included) its gate and up with one. The fused copy replaces the separate matrices, so the model
    no longer loads or saves checkpoints: this is for inference only."""
    for module in list(model.modules()):
        if type(module) is Attention:
            module.fused_qkv = _fuse(module.wq, module.wk, module.wv)
            del module.wq, module.wk, module.wv
            module.__class__ = FusedQKVAttention
        elif type(module) is FeedForward:
            module.fused_w13 = _fuse(module.w1, module.w3)
            del module.w1, module.w3
            module.__class__ = FusedFeedForward
    return model


def quantize_int8(model):
    """Int8 weights (one scale per output channel) for every linear layer of the LLM, computed with int8
    matmuls on dynamically quantised activations. Decoding one token reads every weight once, so
    it is memory-bound: int8 reads a quarter of fp32's bytes. The q/k/v and the two SwiGLU input
    matrices are also fused into one matrix each, since at batch 1 every extra call costs about as
    much as its arithmetic. The vision tower and the projection keep full precision: they run once
    per image."""
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise ValueError("--quantize int8 runs on CPU from float32 weights: use --device cpu --dtype float32")
    fuse_projections(model)
    names = {n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not n.startswith(("vision_encoder", "vision_proj"))}
    with warnings.catch_warnings():  # torch marks these APIs for a future move to torchao; 2.13 is pinned
        warnings.simplefilter("ignore")
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        return quantize_dynamic(model, {n: per_channel_dynamic_qconfig for n in names}, dtype=torch.qint8)
