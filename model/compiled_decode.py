"""Decode steps as one fixed-shape compiled graph, for torch.compile(mode="reduce-overhead").

A decode step of a small model is bound by kernel launches on a GPU: a few hundred small kernels
per token. The "reduce-overhead" mode records the step once as a CUDA graph and replays it, which
needs every replay to have the same shapes, the same buffers and no Python value that changes.
The model's forward takes the cache's write position as a Python int (it slices the RoPE tables
and builds the mask with it), so compiled, each token would be a new graph. Here a decode step
reads the position from a device tensor instead, and the KV buffers are allocated once per (batch,
capacity bucket) and reused by later calls: a step compiles once per batch size and bucket.

The prefill (a prompt of any length, images written in) runs eagerly through the model's forward
into the same cache; the tokens are those of the eager KV caches (tests/test_model.py).

    decoder = CompiledDecoder(model)  # eval_vlm.py and the API server: --compile_decode 1
    model.generate_stream(ids, ..., decoder=decoder)
"""
import torch

from .model_minimind import StaticKVCache


class TensorPositionCache(StaticKVCache):
    """A StaticKVCache whose write position can be a device tensor `at` [1] (a compiled step's);
    with `at` None it is written at the int `pos`, as the eager prefill does."""

    def __init__(self, n_layers, capacity):
        super().__init__(n_layers, capacity)
        self.at = None  # [1] long on the model's device while decoding
        self.real = None  # [B, capacity] bool: the key positions that hold real tokens (not left padding)

    def update(self, layer, k, v):
        if self.at is None:
            return super().update(layer, k, v)
        self.k[layer].index_copy_(2, self.at, k)  # [B, KV, capacity, hd], written in place
        self.v[layer].index_copy_(2, self.at, v)
        return self.k[layer], self.v[layer]


class CompiledDecoder:
    """Runs the decode steps of model.generate_stream(..., decoder=self) as one compiled graph.

    bucket: capacities are rounded up to a multiple of it, so prompts of many lengths share a few
    graphs (a decode step attends over the whole bucket; keys not written yet are masked).
    compile_kw: passed to torch.compile; mode defaults to "reduce-overhead" on CUDA (CUDA graphs)
    and to the default elsewhere, where there are no graphs to record."""

    def __init__(self, model, bucket=256, **compile_kw):
        if any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules()):
            raise ValueError("--compile_decode does not compile int8 weights (--quantize int8): use one or the other")
        self.model, self.bucket, self.caches = model, bucket, {}
        self.device = next(model.parameters()).device
        compile_kw.setdefault("mode", "reduce-overhead" if self.device.type == "cuda" else None)
        # A graph per batch size and bucket: an API server's batches of 1 to --max_batch rows, in a few
        # buckets, pass dynamo's default of 8 graphs per function, which under fullgraph is an error.
        # Process-wide; read when a graph compiles.
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, config.accumulated_recompile_limit)
        # An MoE layer routes tokens with data-dependent shapes: graph breaks there are expected.
        self.step = torch.compile(self.decode_step, dynamic=False, fullgraph=not model.config.use_moe, **compile_kw)

    def new_cache(self, batch, length, attention_mask=None):
        """The cache for one generate call of `batch` rows and `length` tokens (prompt + answer):
        the buffers of an earlier call of the same batch size and bucket, if any, as new buffers
        would be new inputs of the graph. attention_mask [batch, length], or None: all real."""
        capacity = -(-length // self.bucket) * self.bucket
        cache = self.caches.get((batch, capacity))
        if cache is None:
            cache = self.caches[(batch, capacity)] = TensorPositionCache(len(self.model.layers), capacity)
        cache.pos, cache.at = 0, None  # what the last call wrote is overwritten before it is attended to
        real = torch.zeros(batch, capacity, dtype=torch.bool, device=self.device)
        real[:, :length] = True if attention_mask is None else attention_mask.bool()
        cache.real = real
        return cache

    def decode_step(self, ids, cache):
        """The model's forward for one new token per row, the position read from cache.at.
        ids [B, 1] -> logits [B, V]."""
        m = self.model
        h = m.embed(ids)  # [B, 1, D]
        cos = m.rope_cos.index_select(0, cache.at).to(h.dtype)  # [1, hd]
        sin = m.rope_sin.index_select(0, cache.at).to(h.dtype)
        keys = torch.arange(cache.capacity, device=ids.device)  # [S]
        attn_mask = ((keys <= cache.at) & cache.real)[:, None, None, :]  # [B, 1, 1, S]: causal, no padding
        for i, layer in enumerate(m.layers):
            h = layer(h, cos, sin, attn_mask, cache, i, False)
        return m.output(m.norm(h))[:, -1]  # [B, V]

    def __call__(self, ids, cache):
        """One decode step after the prefill wrote cache.pos tokens -> logits [B, V]."""
        self.model.check_length(cache.pos + 1)
        if cache.at is None:  # the first step after the prefill, which allocated the buffers
            cache.at = torch.tensor([cache.pos], device=ids.device)
            for buffer in cache.k + cache.v:  # written in place by the graph: CUDA graphs keep their address
                torch._dynamo.mark_static_address(buffer)
        if ids.is_cuda:  # each step is a new replay: the last one's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        logits = self.step(ids, cache).clone()  # out of the graph's output buffer, which the next replay reuses
        cache.at += 1  # in place: the same tensor, a new value, and no new graph
        cache.pos += 1
        return logits
