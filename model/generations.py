"""The two released generations of the MiniMind LLM as presets of config fields (model_minimind.py
describes them). Without torch, so that the flag parsers offer the names before importing it."""
import math

# What each released generation sets; a field passed explicitly to MiniMindConfig wins over these.
GENERATIONS = {
    "minimind2": dict(n_kv_heads=2, norm_eps=1e-5, qk_norm=False, max_seq_len=8192, n_shared_experts=1,
                      num_experts_per_tok=2, aux_loss_alpha=0.1, seq_aux=True),
    "minimind3": dict(n_kv_heads=4, norm_eps=1e-6, qk_norm=True, max_seq_len=32768, n_shared_experts=0,
                      num_experts_per_tok=1, aux_loss_alpha=5e-4, seq_aux=False),
}


# Every release has 8 attention heads. The 2025 files do not record the count (their weights have the
# same shapes for any), so a file without QK-norm weights is read back with 8; QK-norm weights are one
# head wide, and so say it.
RELEASE_N_HEADS = 8


def default_hidden_dim(generation, dim, multiple_of=64):
    """SwiGLU FFN width. MiniMind2 keeps ~the parameter count of a 4*dim MLP by using 2/3 of it;
    MiniMind3 uses dim*pi. Both rounded up to a multiple of 64."""
    if generation == "minimind3":
        return math.ceil(dim * math.pi / multiple_of) * multiple_of
    return multiple_of * math.ceil(int(2 * 4 * dim / 3) / multiple_of)
