"""Checkpoint files: their names, their two key formats, writing them safely and reading them strictly.

A checkpoint is a plain `torch.save(state_dict)` of every key but the frozen vision tower's, in the
key names of the model's release generation (fp32 in ours). It is read with weights_only=True,
written atomically, and named `{name}_{dim}[_moe].pth` in the output folder.

The two formats (../shared/specs): the 2025-02 release (MiniMind2) names tensors `tok_embeddings`,
`layers.{i}.attention.wq`, ... and pairs RoPE dimensions (2i, 2i+1); the 2026 release (MiniMind3)
names them `model.embed_tokens`, `model.layers.{i}.self_attn.q_proj`, ... and pairs i with i + hd/2.
Our modules use the 2025 names and layout, so a 2025 file is our state dict as it is; a 2026 file
is renamed, and the rows of its q/k projections and q/k norms permuted within each head, on load
(`from_file_format`) and back on save (`to_file_format`). The permutation moves q and k alike, so
attention scores, and with them the model, are unchanged.
"""
import os
import pickle
import re

import torch

from .files import CheckpointError, _first_line, _some, refuse_non_finite
from .generations import RELEASE_N_HEADS
from .lora import fold_lora
from .paths import local_path, weight_name


def weight_path(out_dir, name, dim, use_moe):
    """A .pth path as given, or a name: out_dir/{name}_{dim}[_moe].pth (a relative out_dir that does
    not hold it is looked up in the repository too, see local_path)."""
    if name.endswith(".pth") or os.sep in name:
        return name
    return local_path(os.path.join(out_dir, weight_name(name, dim, use_moe) + ".pth"))


# Our (2025) name -> the 2026 release's, for each part of a dotted key; every other part is shared.
NAMES_2026 = {"tok_embeddings": "embed_tokens", "output": "lm_head", "attention": "self_attn", "wq": "q_proj",
              "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "attention_norm": "input_layernorm",
              "ffn_norm": "post_attention_layernorm", "feed_forward": "mlp", "w1": "gate_proj", "w2": "down_proj",
              "w3": "up_proj"}
NAMES_2025 = {v: k for k, v in NAMES_2026.items()}
ROPE_ROWS = re.compile(r"attention\.(wq|wk|q_norm|k_norm)\.weight$")  # the tensors whose rows RoPE pairs


def key_format(sd):
    """2026 for the 2026 release's key names (model.embed_tokens.*, model.layers.*.self_attn.*), else 2025."""
    return 2026 if "model.embed_tokens.weight" in sd or any(k.startswith("model.layers.") for k in sd) else 2025


def name_2026(key):
    """Our key -> the 2026 release's: tok_embeddings.weight -> model.embed_tokens.weight, output.weight
    -> lm_head.weight, layers.0.attention.wq.weight -> model.layers.0.self_attn.q_proj.weight, ...
    The projector's keys are the same in both."""
    if key.startswith("vision_proj."):
        return key
    name = ".".join(NAMES_2026.get(part, part) for part in key.split("."))
    return name if name.startswith("lm_head.") else "model." + name


def name_2025(key):
    """The inverse of name_2026 (a key it cannot have produced comes back unusable, so it stays unexpected)."""
    if key.startswith("vision_proj."):
        return key
    name = ".".join(NAMES_2025.get(part, part) for part in key.removeprefix("model.").split("."))
    return name if name_2026(name) == key else key


def rope_permutation(head_dim):
    """Index p, within one head, with ours[j] = rotate_half[p[j]]: our interleaved pair (2i, 2i+1)
    is the 2026 release's pair (i, i + hd/2), at the same frequency i."""
    return torch.arange(head_dim).view(2, head_dim // 2).t().flatten()  # [0, hd/2, 1, hd/2 + 1, ...]


def _permute_heads(w, index):
    """Reorder the rows of w ([n_heads * hd, D], or a norm weight [hd]) by `index` within each head."""
    return w.reshape(-1, len(index), *w.shape[1:])[:, index].reshape(w.shape)


def from_file_format(sd, head_dim):
    """A checkpoint's state dict -> our key names and RoPE layout (a 2025 one is that already)."""
    if key_format(sd) == 2025:
        return dict(sd)
    index = rope_permutation(head_dim)
    out = {}
    for key, value in sd.items():
        name = name_2025(key)
        out[name] = _permute_heads(value, index) if ROPE_ROWS.search(name) else value
    return out


def to_file_format(sd, config):
    """Our state dict -> the key names and RoPE layout of config.generation's release."""
    if config.generation != "minimind3":
        return sd
    inverse = rope_permutation(config.head_dim).argsort()
    return {name_2026(k): _permute_heads(v, inverse) if ROPE_ROWS.search(k) else v for k, v in sd.items()}


def llm_state_dict(model, sd=None):
    """The checkpoint: every key but the vision tower's, fp32, in the key format of the model's
    generation (the 2025 or the 2026 release's, so it loads into that release's own code too), with
    any LoRA adapters folded in. `sd` (default: the model's own) supplies the values, under the
    model's key names (e.g. DeepSpeed's gathered fp32 copy)."""
    sd = model.state_dict() if sd is None else sd
    sd = {k: v.detach().float().cpu() for k, v in sd.items() if not k.startswith("vision_encoder.")}
    return to_file_format(fold_lora(sd, model), model.config)


WEIGHTS_EXPECTED = ("expected a .pth of MiniMind(-V) weights (a dict of tensors) as train_*_vlm.py or "
                    "scripts/convert_model.py write it: check the --weight / --from_weight path")


REFUSED_GLOBAL = re.compile(r"\bGLOBAL\s+([\w.]+)|Unsupported class\s+([\w.]+)", re.IGNORECASE)


def read_checkpoint(path, what="weights file", expected=WEIGHTS_EXPECTED):
    """torch.load with weights_only=True: tensors and plain values (dicts, lists, numbers, strings)
    only, since unpickling anything else can run code. Any file that does not load is a
    CheckpointError naming it, what it is and what was `expected`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found; {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only a name is taken from torch's text: the rest advises weights_only=False, which is what
        # must not be done with such a file.
        found = REFUSED_GLOBAL.search(str(e))
        if found:
            raise CheckpointError(f"{path} is not a valid {what} and was refused: it holds "
                                  f"{found.group(1) or found.group(2)}, which could run code; {expected}") from None
        detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", str(e))  # e.g. "Unsupported operand 247"
        reason = f"UnpicklingError: {detail.group(1).strip()}" if detail else "UnpicklingError"
    except Exception as e:  # a truncated zip, an empty or a text file: RuntimeError, EOFError, KeyError...
        reason = _first_line(e).split(". ")[0]
    raise CheckpointError(f"{path} is not a valid {what}: truncated, or not written by torch.save ({reason}); "
                          f"{expected}")


def check_state_dict(sd, name="the checkpoint"):
    """`sd` as a MiniMind state dict {key: tensor}, with the `module.` prefix of checkpoints saved
    from a DDP wrapper dropped; else CheckpointError saying what `name` holds instead."""
    if not isinstance(sd, dict):
        raise CheckpointError(f"{name} holds a {type(sd).__name__}, not model weights; {WEIGHTS_EXPECTED}")
    if {"model", "optimizer"} <= sd.keys():
        raise CheckpointError(f"{name} is a trainer resume file, not model weights: pass the .pth saved next "
                              f"to it to --weight / --from_weight")
    odd = next((k for k, v in sd.items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if odd is not None:
        raise CheckpointError(f"{name}: entry {odd!r} is a {type(sd[odd]).__name__}, not a tensor; {WEIGHTS_EXPECTED}")
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    embed, layers = ("model.embed_tokens.weight", "model.layers.") if key_format(sd) == 2026 else \
        ("tok_embeddings.weight", "layers.")
    if embed not in sd or not any(k.startswith(layers) for k in sd):
        held = "is empty" if not sd else (f"has {len(sd)} tensors but no tok_embeddings.weight / layers.* (2025 "
                                          f"release) nor model.embed_tokens.weight / model.layers.* (2026)")
        raise CheckpointError(f"{name} {held}: no MiniMind weights; {WEIGHTS_EXPECTED}")
    return sd


def check_vocab(tokenizer, tokenizer_path, vocab_size, name, fix=None):
    """The tokenizer's ids must all be rows of the embedding of the weights `name` (vocab_size rows):
    a larger vocabulary would index past it on its first token above. Else CheckpointError naming both
    and `fix` (default: the --tokenizer_path to pass)."""
    if len(tokenizer) > vocab_size:
        raise CheckpointError(f"the tokenizer at {tokenizer_path} has {len(tokenizer)} tokens, but {name} embeds only "
                              f"{vocab_size}: " + (fix or f"pass --tokenizer_path the tokenizer {name} was trained with"))


def _first(sd, pattern):
    """The first tensor whose key matches `pattern`, or None."""
    return next((v for k, v in sd.items() if re.search(pattern, k)), None)


def infer_config_from_state_dict(sd, name="the checkpoint"):
    """What a checkpoint says about itself, as MiniMindConfig/VLMConfig fields: generation, dim,
    n_layers, vocab_size, n_kv_heads, hidden_dim, use_moe (with n_routed_experts, n_shared_experts),
    n_heads and head_dim where the file shows them (QK-norm weights are one head wide), and for a VLM checkpoint its
    projector (projector, proj_bias, vision_hidden_size: the width of the tower it needs)."""
    sd = check_state_dict(sd, name)
    fmt = key_format(sd)
    sd = {name_2025(k): v for k, v in sd.items()} if fmt == 2026 else sd
    emb, q_norm = sd["tok_embeddings.weight"], _first(sd, r"attention\.q_norm\.weight$")
    # A 2025-named file with QK-norm weights is a MiniMind3 in our own layout (an exported directory
    # converted back by scripts/convert_model.py, or DeepSpeed's gathered weights).
    found = {"generation": "minimind3" if fmt == 2026 or q_norm is not None else "minimind2",
             "dim": emb.shape[1], "vocab_size": emb.shape[0],
             "n_layers": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers.")),
             "use_moe": any(".experts." in k for k in sd)}
    head_dim = q_norm.shape[0] if q_norm is not None else emb.shape[1] // RELEASE_N_HEADS
    wq, wk = _first(sd, r"attention\.wq\.weight$"), _first(sd, r"attention\.wk\.weight$")
    if q_norm is not None and wq is not None:
        found.update(n_heads=wq.shape[0] // head_dim, head_dim=head_dim)
    if wk is not None:
        found["n_kv_heads"] = wk.shape[0] // head_dim
    w1 = _first(sd, r"feed_forward\.(experts\.\d+\.)?w1\.weight$")
    if w1 is not None:
        found["hidden_dim"] = w1.shape[0]
    gate = _first(sd, r"feed_forward\.gate\.weight$")
    if found["use_moe"] and gate is not None:
        found["n_routed_experts"] = gate.shape[0]
        found["n_shared_experts"] = int(any(".shared_experts." in k for k in sd))
    if "vision_proj.vision_proj.0.weight" in sd:  # one Linear: ours, or the 2025 release's with a bias
        found.update(projector="linear", proj_bias="vision_proj.vision_proj.0.bias" in sd,
                     vision_hidden_size=sd["vision_proj.vision_proj.0.weight"].shape[1])
    elif "vision_proj.mlp.1.weight" in sd:  # LayerNorm, Linear, GELU, Linear: the 2026 release's
        found.update(projector="mlp", vision_hidden_size=sd["vision_proj.mlp.1.weight"].shape[1])
    return found


def _describe(found):
    return (f"generation {found['generation']}, dim {found['dim']}, {found['n_layers']} layers, "
            f"use_moe {int(found['use_moe'])}" + (f", {found['projector']} projector" if "projector" in found else "")
            + (f", {found['n_heads']} heads of {found['head_dim']} ({found['n_kv_heads']} key/value)"
               if "n_heads" in found else ""))


def load_weights(model, path_or_sd, name=None, fix="check --dim/--n_layers/--use_moe"):
    """Strict load of a .pth (LLM-only or VLM, either release's key format, any float dtype: cast
    to the model's), or of a state dict read from the file `name`; only the vision tower's keys,
    which no checkpoint stores, and the projection of an LLM-only checkpoint may be absent. Anything
    else that is missing, unexpected or of another shape is a CheckpointError naming the file and
    listing the keys in the file's own names, and `fix`, what the caller's user can do about it (the
    default names the flags of the scripts that build the model from them); a projector made for
    another tower width says which width it needs. A file holding NaN or inf is refused too."""
    if isinstance(path_or_sd, str):
        name = name or path_or_sd
        path_or_sd = read_checkpoint(path_or_sd)
    name = name or "the checkpoint"
    sd = check_state_dict(path_or_sd, name)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    as_in_file = name_2026 if key_format(sd) == 2026 else (lambda k: k)
    expected = {as_in_file(k): k for k in own}  # the file's key -> ours
    llm_only = not any(k.startswith("vision_proj.") for k in sd)
    missing = sorted(f for f, k in expected.items() if f not in sd and not (llm_only and k.startswith("vision_proj.")))
    unexpected = sorted(sd.keys() - expected.keys())
    reshaped = sorted(f for f in sd.keys() & expected.keys() if sd[f].shape != own[expected[f]].shape)
    if missing or unexpected or reshaped:
        found, cfg = infer_config_from_state_dict(sd, name), model.config
        tower_width = getattr(cfg, "vision_hidden_size", None)
        if found.get("projector") and found["projector"] == getattr(cfg, "projector", None) \
                and found["vision_hidden_size"] != tower_width:
            raise CheckpointError(
                f"{name} was trained with a vision tower of width {found['vision_hidden_size']} (its projector's "
                f"input), but the tower at {cfg.vision_model_path} gives {tower_width}-wide features: pass "
                f"--vision_model_path a tower of width {found['vision_hidden_size']}, the one it was trained with")
        model_found = {"generation": cfg.generation, "dim": cfg.dim, "n_layers": cfg.n_layers, "use_moe": cfg.use_moe}
        if getattr(cfg, "projector", None):
            model_found["projector"] = cfg.projector
        if cfg.qk_norm:  # the head layout, where a file can say it too (its QK-norm weights are one head wide)
            model_found.update(n_heads=cfg.n_heads, head_dim=cfg.head_dim, n_kv_heads=cfg.n_kv_heads)
        raise CheckpointError(
            f"{name} does not match the model ({fix}): the file has {_describe(found)}; "
            f"the model {_describe(model_found)}; missing: {_some(missing)}; unexpected: {_some(unexpected)}"
            + (f"; other shape: {_some(reshaped)}" if reshaped else ""))
    refuse_non_finite(sd, name, "it is damaged, or was saved by a run that diverged; use another checkpoint (an "
                                "earlier one of that run)")
    # strict=False: strictness was checked above, with the tower (and an LLM-only file's projector) allowed out
    model.load_state_dict(from_file_format(sd, model.config.head_dim), strict=False)
    return sd
