"""MiniMind: a small decoder-only LLM (Llama-style), compatible with both released generations.

Architecture (docs/architecture.md): RMSNorm -> grouped-query attention with RoPE -> RMSNorm ->
SwiGLU FFN (or a small mixture of experts), tied input/output embeddings. The two releases differ
only in settings, so `MiniMindConfig.generation` picks a preset of config fields:
- "minimind2" (2025-02, MiniMind2): 2 KV heads, RMSNorm eps 1e-5, MoE with a shared expert and top-2;
- "minimind3" (2026-04, MiniMind3): QK-norm, 4 KV heads, eps 1e-6, FFN ceil(dim*pi/64)*64, MoE top-1
  without a shared expert and a batch-level balance loss.
Module names and the RoPE pair layout are the 2025 release's (interleaved pairs), so its checkpoints
load as they are; model/checkpoint.py renames and permutes the 2026 ones on load and back on save.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .generations import GENERATIONS, RELEASE_N_HEADS, default_hidden_dim
from .precision import cpu_attention_in_fp32

# The output's cache field: `cache` from transformers 5 on (the old name there logs a deprecation
# line between a prompt and its answer), `past_key_values` before.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

class MiniMindConfig(PretrainedConfig):
    model_type = "minimind"

    def __init__(self, generation="minimind2", dim=512, n_layers=8, n_heads=RELEASE_N_HEADS, n_kv_heads=None,
                 head_dim=None, vocab_size=6400, hidden_dim=None, multiple_of=64, norm_eps=None, qk_norm=None,
                 rope_theta=1e6, max_seq_len=None, dropout=0.0, use_moe=False, n_routed_experts=4,
                 num_experts_per_tok=None, n_shared_experts=None, aux_loss_alpha=None, seq_aux=None,
                 norm_topk_prob=True, gradient_checkpointing=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                 **kwargs):
        if generation not in GENERATIONS:
            raise ValueError(f"generation must be one of {sorted(GENERATIONS)}, not {generation!r}")
        given = dict(n_kv_heads=n_kv_heads, norm_eps=norm_eps, qk_norm=qk_norm, max_seq_len=max_seq_len,
                     n_shared_experts=n_shared_experts, num_experts_per_tok=num_experts_per_tok,
                     aux_loss_alpha=aux_loss_alpha, seq_aux=seq_aux)
        for key, preset in GENERATIONS[generation].items():
            setattr(self, key, preset if given[key] is None else given[key])
        self.generation, self.dim, self.n_layers, self.n_heads = generation, dim, n_layers, n_heads
        if min(n_heads, self.n_kv_heads, 1 if head_dim is None else head_dim) < 1:
            raise ValueError(f"{n_heads} heads, {self.n_kv_heads} key/value heads, head_dim {head_dim}: each must "
                             f"be 1 or more")
        if (head_dim is None and dim % n_heads) or n_heads % self.n_kv_heads:
            raise ValueError(f"{n_heads} heads of {self.n_kv_heads} key/value heads in dim {dim}: n_heads must divide "
                             f"dim (or head_dim be given), and n_kv_heads n_heads")
        # A head's width: dim / n_heads in every release; wider is allowed (as Qwen3's head_dim), so that the
        # scores QK-norm bounds by sqrt(head_dim) can be sharper without fewer heads.
        self.head_dim = dim // n_heads if head_dim is None else head_dim
        # Without QK-norm (one head wide) the weights cannot say the head layout, and a file is read back as the
        # releases' one; any other would load as a different model.
        if not self.qk_norm and (n_heads, self.head_dim) != (RELEASE_N_HEADS, dim // RELEASE_N_HEADS):
            raise ValueError(f"n_heads {n_heads} of width {self.head_dim}: a {generation} model keeps the releases' "
                             f"{RELEASE_N_HEADS} heads of dim / {RELEASE_N_HEADS} (without QK-norm its files do not "
                             f"record the layout); use generation minimind3, whose QK-norm weights do")
        self.vocab_size, self.multiple_of, self.rope_theta = vocab_size, multiple_of, rope_theta
        self.hidden_dim = hidden_dim or default_hidden_dim(generation, dim, multiple_of)
        self.dropout, self.use_moe, self.n_routed_experts = dropout, bool(use_moe), n_routed_experts
        self.norm_topk_prob, self.gradient_checkpointing = norm_topk_prob, gradient_checkpointing
        kwargs.setdefault("tie_word_embeddings", True)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 (bf16 loses too much precision in the mean of squares), cast back after.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x)


def rope_cos_sin(head_dim, max_len, theta):
    """RoPE tables [max_len, head_dim] for interleaved (2i, 2i+1) pairs, each turned by angle i of
    its position: cos has each pair's cosine twice, sin its sine as (-sin, +sin), so that
    apply_rope is two multiplies and an add."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # [max_len, head_dim/2]
    return angles.cos().repeat_interleave(2, -1), torch.stack((-angles.sin(), angles.sin()), -1).flatten(-2)


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs: (x[2i], x[2i+1]) -> (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin).
    x: [B, H, T, hd], cos/sin: [T, hd] from rope_cos_sin, in the compute dtype (the forward casts
    them once for all layers), as the projections that made x (bf16 under autocast): a few
    elementwise passes over q and k are a large share of a CPU training step, and fp32 would
    double their memory traffic. Real arithmetic, so eager and
    torch.compile run the same code. The 2026 release pairs i with i + hd/2 instead; its q/k
    weights are permuted into this layout when loaded."""
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x[2i+1], x[2i]) in each pair
    return x * cos + swapped * sin


class KVCache:
    """Preallocated per-layer key/value buffers [B, n_kv, capacity, hd] plus a write position.

    Decoding writes one slice per step instead of concatenating (which copies the whole cache
    every token). The buffers grow by doubling if a caller exceeds the capacity it asked for.
    """

    def __init__(self, n_layers, capacity=0):
        self.k, self.v = [None] * n_layers, [None] * n_layers
        self.capacity, self.pos = capacity, 0  # pos = tokens already stored (same for every layer)

    def update(self, layer, k, v):
        start, end = self.pos, self.pos + k.shape[2]
        if self.k[layer] is None or end > self.k[layer].shape[2]:
            cap = max(end, self.capacity, 2 * (self.k[layer].shape[2] if self.k[layer] is not None else 0))
            new_k, new_v = (k.new_zeros(*k.shape[:2], cap, k.shape[3]) for _ in range(2))
            if self.k[layer] is not None:
                new_k[:, :, :start], new_v[:, :, :start] = self.k[layer][:, :, :start], self.v[layer][:, :, :start]
            self.k[layer], self.v[layer] = new_k, new_v
        self.k[layer][:, :, start:end], self.v[layer][:, :, start:end] = k, v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def keys(self, T):
        """The key count attention sees when T new tokens are stored: those stored so far."""
        return self.pos + T

    def select_rows(self, rows):
        """Keep only these batch rows (a 1-D index tensor), in this order."""
        self.k = [k if k is None else k.index_select(0, rows) for k in self.k]
        self.v = [v if v is None else v.index_select(0, rows) for v in self.v]


class StaticKVCache(KVCache):
    """KV buffers of one fixed shape [B, n_kv, capacity, hd], written in place (index_copy_ at the write
    position); every layer attends over the whole buffer, the keys not written yet masked out (the mask's
    causal part does it: they lie after every query). A decode step's shapes then never change, which
    torch.compile(mode="reduce-overhead") needs to capture it as one CUDA graph. The tokens are those of
    the dynamic KVCache; it refuses to grow past its capacity."""

    def update(self, layer, k, v):
        end = self.pos + k.shape[2]
        if end > self.capacity:
            raise ValueError(f"a static KV cache holds {self.capacity} tokens; {end} asked")
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = (k.new_zeros(*k.shape[:2], self.capacity, k.shape[3]) for _ in range(2))
        where = torch.arange(self.pos, end, device=k.device)
        self.k[layer].index_copy_(2, where, k)
        self.v[layer].index_copy_(2, where, v)
        return self.k[layer], self.v[layer]

    def keys(self, T):
        """The key count attention sees when T new tokens are stored: all of the buffer."""
        return self.capacity


class Attention(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        # QK-norm (MiniMind3): each head's query and key RMS-normalised before RoPE, so the size of
        # the attention logits is set by the norm weights, not by how large the projections grow.
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.dropout = cfg.dropout
        self.cpu_attention_fp32 = cpu_attention_in_fp32()  # on a CPU (model/precision.py says why); never on a GPU

    def project_qkv(self, x):
        """[B, T, D] -> q [B, T, H*hd], k and v [B, T, KV*hd]. A method of its own so that a variant
        can compute all three with one matrix (model/quantize.py)."""
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None, layer_idx: int, causal: bool):
        B, T, _ = x.shape
        q, k, v = self.project_qkv(x)
        q = self.q_norm(q.reshape(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, hd]
        k = self.k_norm(k.reshape(B, T, self.n_kv_heads, self.head_dim)).transpose(1, 2)  # [B, KV, T, hd]
        v = v.reshape(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # [B, KV, S, hd], S = past + T
        # `causal` (no explicit mask, several new queries) is a plain bool decided by the eager caller:
        # computed here from T it would be symbolic under torch.compile(dynamic=True), which SDPA
        # refuses, breaking every block into pieces. enable_gqa: each group of n_heads / n_kv_heads
        # query heads shares one key/value head, without copying k and v.
        dtype, fp32 = v.dtype, self.cpu_attention_fp32 and q.device.type == "cpu"  # (no-ops in an fp32 run)
        if fp32:
            q, k, v = q.float(), k.float(), v.float()
        # With fp32 inputs autocast is off around the kernel: it would cast them back.
        with torch.autocast("cpu", enabled=False) if fp32 else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal, enable_gqa=True,
                                                 dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, hd]
        return self.wo(out.to(dtype).transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)  # down
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoEFeedForward(nn.Module):
    """Routed experts (softmax gate, top-k), plus always-on shared experts where the generation has
    them (MiniMind2: one shared expert, top-2; MiniMind3: none, top-1)."""

    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.cfg = cfg
        self.experts = nn.ModuleList(FeedForward(cfg) for _ in range(cfg.n_routed_experts))
        self.gate = nn.Linear(cfg.dim, cfg.n_routed_experts, bias=False)
        self.shared_experts = FeedForward(cfg) if cfg.n_shared_experts else None
        self.aux_loss = torch.zeros(())

    def forward(self, x):
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # [N, D]
        probs = self.gate(flat).float().softmax(-1)  # [N, E]
        topk_w, topk_idx = probs.topk(self.cfg.num_experts_per_tok, dim=-1)  # [N, k]
        if self.cfg.norm_topk_prob:
            topk_w = topk_w / (topk_w.sum(-1, keepdim=True) + 1e-20)
        # The routed slots sorted by expert (stable: each expert's rows stay in token order), then cut
        # into one run per expert by their counts: a single read of the device (the counts, which the
        # balance loss uses too) where a nonzero per expert would make a GPU host wait once per expert.
        E, k = self.cfg.n_routed_experts, self.cfg.num_experts_per_tok
        G = B if self.cfg.seq_aux else 1  # groups the balance loss takes its statistics over
        slots = topk_idx.view(G, -1)  # [G, N*k/G], slot i is token i // k
        counts = slots.new_zeros(G, E).scatter_add_(1, slots, torch.ones_like(slots))  # [G, E]
        per_expert = counts.sum(0).tolist()
        order = slots.reshape(-1).argsort(stable=True)
        rows = order // k
        weights = topk_w.reshape(-1)[order, None].to(flat.dtype)
        # Every expert runs (possibly on zero rows) so every parameter gets a gradient under DDP.
        routed = torch.cat([expert(xs) for expert, xs in zip(self.experts, flat[rows].split(per_expert))])
        out = torch.zeros_like(flat).index_add_(0, rows, (routed * weights).to(flat.dtype))
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        # Balance loss: the fraction of routed slots per expert (scaled so uniform = 1) times its mean
        # gate probability, summed over experts. MiniMind2 measures both per sequence and averages
        # (seq_aux); MiniMind3 over the whole batch, which with top-1 is its
        # num_experts * coef * sum(load * mean_score).
        load = counts.float() / (B * T / G * k / E)
        self.aux_loss = (load * probs.view(G, -1, E).mean(1)).sum(-1).mean() * self.cfg.aux_loss_alpha
        return out.view(B, T, D)


class Block(nn.Module):
    def __init__(self, cfg: MiniMindConfig):
        super().__init__()
        self.attention = Attention(cfg)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = MoEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg)

    def forward(self, x, cos, sin, attn_mask, cache, layer_idx, causal):
        x = x + self.attention(self.attention_norm(x), cos, sin, attn_mask, cache, layer_idx, causal)
        return x + self.feed_forward(self.ffn_norm(x))


class MiniMindForCausalLM(PreTrainedModel):
    config_class = MiniMindConfig
    base_model_prefix = "minimind"
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"output.weight": "tok_embeddings.weight"}

    def __init__(self, config: MiniMindConfig):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.output.weight = self.tok_embeddings.weight  # tied: one tensor, saved under both names
        cos, sin = rope_cos_sin(config.head_dim, config.max_seq_len, config.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # not in checkpoints, like the release
        self.register_buffer("rope_sin", sin, persistent=False)
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def get_input_embeddings(self):  # what transformers and peft look up (resizing, tied weights)
        return self.tok_embeddings

    def get_output_embeddings(self):
        return self.output

    def supervised_loss(self, h, targets):
        """[n, D] hidden states of supervised positions, [n] targets -> (logits [n, V], summed CE)."""
        logits = self.output(h)
        return logits, F.cross_entropy(logits.float(), targets, reduction="sum")

    def compile_for_training(self):
        """What --use_compile 1 compiles: each block, and the head with its loss (one fused pass
        over the [n, V] logits instead of several). The embedding and the image splicing, with
        their data-dependent shapes, stay eager."""
        # fullgraph: a graph break is an error, not a silent slowdown. The MoE FFN's routing has
        # data-dependent shapes (which rows go to which expert), so its blocks may break there.
        # No duck sizing: sizes equal on the first call would share one symbol, so a first batch whose
        # size or length happens to equal a width (B == head_dim, n supervised == dim) would be tied to
        # that width and every other batch compile again. Process-wide; read when a graph compiles.
        torch.fx.experimental._config.use_duck_shape = False
        for layer in self.layers:
            layer.compile(dynamic=True, fullgraph=not self.config.use_moe)
        self.supervised_loss = torch.compile(self.supervised_loss, dynamic=True, fullgraph=True)

    def check_length(self, n):
        """Refuse a sequence of n tokens longer than the RoPE tables (max_seq_len)."""
        if n > self.rope_cos.shape[0]:
            raise ValueError(f"sequence of {n} tokens exceeds max_seq_len={self.config.max_seq_len}")

    def embed(self, input_ids, **kwargs):
        """Token embeddings [B, T, D]; the VLM subclass overrides this to write image features in."""
        return self.tok_embeddings(input_ids)

    def forward(self, input_ids, attention_mask=None, labels=None, past_key_values=None, use_cache=False,
                logits_to_keep=0, supervised=None, **kwargs):
        """With labels, the loss over the supervised positions: `supervised` [n] gives them as flat
        indices into [B*T] (supervised_positions(labels), which the trainer's collate computes on the
        CPU: found here, a GPU would make the host wait to learn n)."""
        B, T = input_ids.shape
        cache = past_key_values if past_key_values is not None else (KVCache(len(self.layers)) if use_cache else None)
        start = cache.pos if cache is not None else 0
        self.check_length(start + T)
        cos, sin = self.rope_cos[start:start + T], self.rope_sin[start:start + T]
        S = cache.keys(T) if cache is not None else T  # keys attended to
        if attention_mask is None and (start > 0 and T > 1 or S > start + T):
            # a multi-token chunk after a cache needs a real mask, and so does a static cache's unwritten part
            attention_mask = input_ids.new_ones(B, start + T)
        attn_mask = padding_attention_mask(attention_mask, T, start, S) if attention_mask is not None else None
        # Without a mask the only masking needed is causal, and only when several queries are new
        # (a single decode step sees the whole cache).
        causal = attn_mask is None and T > 1
        h = self.dropout(self.embed(input_ids, **kwargs))  # [B, T, D]
        device = h.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        cos, sin = cos.to(compute), sin.to(compute)  # the dtype q and k come out of their projections in
        for i, layer in enumerate(self.layers):
            if self.config.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, cos, sin, attn_mask, cache, i, causal,
                                                      use_reentrant=False)
            else:
                h = layer(h, cos, sin, attn_mask, cache, i, causal)
        if cache is not None:
            cache.pos += T
        h = self.norm(h)
        loss = aux_loss = None
        if self.config.use_moe:
            aux_loss = sum(layer.feed_forward.aux_loss for layer in self.layers)
        if labels is not None:
            # Token t predicts token t+1: shift once here, labels stay aligned with input_ids.
            # Only supervised positions go through the [D, vocab] head: in a captioning batch ~85% of
            # positions are image placeholders or prompt, and the head is the model's largest matmul.
            # So with labels, `logits` holds just those positions, [n_supervised, V].
            if supervised is None:
                supervised = supervised_positions(labels)
            targets = labels.reshape(-1).index_select(0, supervised + 1)  # [n]: each position's next token
            logits, loss = self.supervised_loss(h.reshape(B * T, -1).index_select(0, supervised), targets)
            # Mean over supervised tokens; a batch with none (all samples skipped) gives 0, not NaN.
            loss = loss / max(len(supervised), 1)
            if aux_loss is not None:
                loss = loss + aux_loss
        else:
            # When decoding, only the last position's logits are needed: skip the [B, T, V] matmul.
            logits = self.output(h[:, -logits_to_keep:] if logits_to_keep else h)  # [B, T, V]
        out = CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
        out["aux_loss"] = aux_loss
        return out

    @torch.inference_mode()
    def generate_stream(self, input_ids, attention_mask=None, max_new_tokens=256, temperature=0.0, top_p=1.0,
                        top_k=0, repetition_penalty=1.0, eos_token_id=None, static_cache=False, wanted=None,
                        decoder=None, **model_kwargs):
        """Yields the next token of every row, [B], once per step. Rows that produced EOS keep
        yielding EOS (the caller stops reading them); the loop ends when every row is done.
        Batched prompts must be left-padded with attention_mask marking the real tokens.
        static_cache: a StaticKVCache (fixed shapes, for CUDA graphs) instead of the growing KVCache;
        the same tokens. wanted: a callable asked after each step -> B bools, the rows the caller still
        reads (an answer at its length, a client gone: False). A row at EOS or no longer wanted leaves the
        batch (not with a static cache, whose shapes stay), so it costs no more compute; it yields EOS.
        decoder: a model/compiled_decode.py CompiledDecoder, which runs the steps after the prefill as
        one compiled graph, in a static cache of its own."""
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        B, T = input_ids.shape
        static_cache = static_cache or decoder is not None
        if attention_mask is not None:  # the answer's positions are real tokens; the forward reads [:past+T]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, max_new_tokens)], 1)
        if decoder is not None:
            cache = decoder.new_cache(B, T + max_new_tokens, attention_mask)
        else:
            cache = (StaticKVCache if static_cache else KVCache)(len(self.layers), capacity=T + max_new_tokens)
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        seen = input_ids.clone()  # tokens the repetition penalty applies to
        rows = None  # the rows still in the batch, by their index in input_ids (None: all of them)
        step_ids = input_ids
        for step in range(max_new_tokens):
            if decoder is not None and step:
                logits = decoder(step_ids, cache).float()  # [B, V]
            else:
                out = self(step_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True,
                           logits_to_keep=1, **model_kwargs)
                logits = out.logits[:, -1].float()  # [b, V]
            model_kwargs = {}  # images are consumed by the prefill only
            if repetition_penalty != 1.0:
                logits = apply_repetition_penalty(logits, seen, repetition_penalty)
            nxt = sample_next_token(logits, temperature, top_p, top_k)  # [b]
            nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
            done |= nxt == eos
            yield nxt if rows is None else nxt.new_full((B,), eos).index_copy_(0, rows, nxt)
            keep = ~done
            if wanted is not None:
                still = torch.tensor(wanted(), dtype=torch.bool, device=done.device)
                keep &= still if rows is None else still[rows]
            if not keep.any():
                return
            step_ids = nxt[:, None]
            if repetition_penalty != 1.0:
                seen = torch.cat([seen, step_ids], 1)
            if not static_cache and not keep.all():  # rows that are done leave the batch
                live = keep.nonzero().squeeze(1)
                rows = live if rows is None else rows[live]
                cache.select_rows(live)
                step_ids, seen, done = step_ids[live], seen[live], done[live]
                if attention_mask is not None:
                    attention_mask = attention_mask[live]

    def generate(self, input_ids, **kwargs):
        """Prompt + up to max_new_tokens new tokens, [B, T + n]; finished rows are EOS-padded."""
        new = list(self.generate_stream(input_ids, **kwargs))
        return torch.cat([input_ids, torch.stack(new, 1)], 1) if new else input_ids


def supervised_positions(labels):
    """labels [B, T] -> [n] flat indices into [B*T] of the positions whose next token is supervised
    (token t predicts t+1, so a row's last position never is), in row-major order."""
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = labels[:, 1:] != -100
    return keep.reshape(-1).nonzero().squeeze(1)


def padding_attention_mask(attention_mask, T, past, S=None):
    """Boolean SDPA mask [B, 1, T, S], S = past+T unless given (a static cache's capacity: the keys
    past the last query are masked, as later tokens are): causal, and never attending to padding keys.
    A query always sees itself, so rows of left padding are not all-masked (which gives NaN)."""
    S = past + T if S is None else S
    keys = attention_mask[:, None, None, :S].bool()  # [B, 1, 1, <= S]
    if keys.shape[-1] < S:  # the mask covers the tokens so far; the keys after them are masked as causal
        keys = F.pad(keys, (0, S - keys.shape[-1]))
    q_pos = torch.arange(past, past + T, device=attention_mask.device)[:, None]
    k_pos = torch.arange(S, device=attention_mask.device)[None, :]
    return ((k_pos <= q_pos) & keys) | (k_pos == q_pos)


def apply_repetition_penalty(logits, seen, penalty):
    """Make every token in `seen` [B, S] less likely. Dividing a negative logit would *raise* it,
    so negative ones are multiplied instead (the CTRL paper's rule)."""
    prev = logits.gather(1, seen)
    return logits.scatter(1, seen, torch.where(prev > 0, prev / penalty, prev * penalty))


def sample_next_token(logits, temperature=0.0, top_p=1.0, top_k=0):
    """logits [B, V] -> token ids [B]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p (the top token always stays).
        drop = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


def count_llm_params(model):
    """Parameters of the language model, tied weights counted once, vision tower excluded."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.startswith("vision_encoder."))
