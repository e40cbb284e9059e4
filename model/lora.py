"""LoRA adapters on the LLM's linear layers, through peft, kept beside the model file.

peft wraps each chosen nn.Linear in place (`wq` becomes a LoRA layer holding `base_layer`, `lora_A`
and `lora_B`), so the model keeps its class and forward. What the rest of the repo needs from it:

- add_lora(model, settings): wrap the layers; the base weights freeze, the adapters train;
- fold_lora(sd, model): a state dict with every adapter folded into its base weight (W + s * B @ A)
  under the plain key names: what a .pth holds, whether the model trained with LoRA or not;
- adapter_state_dict / save_adapter / load_adapter: the small `{name}_{dim}_lora.safetensors` file
  of everything that trained (the adapters, and the projector and any layer --freeze_llm left
  trainable), in this repo's module names, with its LoRA settings in the file's metadata;
- merge_lora(model): fold the adapters in place and unwrap the layers (for int8, or to save).

peft is imported only when a model gets adapters, torch only where used: the trainers' flags take
LORA_LAYERS from here before torch loads.
"""
import dataclasses
import json
import math
import os

from .files import atomic_save, refuse_non_finite

LORA_LAYERS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")  # attention and SwiGLU projections, both generations
FORMAT = "minimind-lora"


@dataclasses.dataclass(frozen=True)
class LoraSettings:
    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple = LORA_LAYERS

    @classmethod
    def from_flags(cls, rank, alpha, dropout, targets):
        """--lora_rank/--lora_alpha (None: twice the rank)/--lora_dropout/--lora_targets ("wq,wv")."""
        names = tuple(t.strip() for t in targets.split(",") if t.strip()) if isinstance(targets, str) else tuple(targets)
        unknown = sorted(set(names) - set(LORA_LAYERS))
        if rank < 0 or (rank and not names) or unknown:
            raise ValueError(f"--lora_rank must be >= 0 and --lora_targets a comma list of {','.join(LORA_LAYERS)}"
                             + (f"; unknown: {','.join(unknown)}" if unknown else ""))
        return cls(rank, float(2 * rank if alpha is None else alpha), float(dropout), names)


def target_pattern(targets):
    """The LLM's layers named in `targets` (the tower and the projector never match), MoE experts included."""
    attn = "|".join(t for t in targets if t in ("wq", "wk", "wv", "wo"))
    ffn = "|".join(t for t in targets if t in ("w1", "w2", "w3"))
    parts = ([rf"attention\.({attn})"] if attn else []) + ([rf"feed_forward\.(experts\.\d+\.)?({ffn})"] if ffn else [])
    return rf"layers\.\d+\.({'|'.join(parts)})"


def add_lora(model, settings):
    """Wrap the target layers of `model` (a MiniMind LLM or VLM) with LoRA adapters in place; only the
    adapters are left trainable (callers then unfreeze what else should train) -> model."""
    from peft import LoraConfig, inject_adapter_in_model
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=target_pattern(settings.targets))
    inject_adapter_in_model(config, model)
    model.lora_settings = settings
    return model


def lora_layers(model):
    """{module name: LoRA layer} of the layers add_lora wrapped."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}


def has_lora(model):
    return getattr(model, "lora_settings", None) is not None


def plain_key(key):
    """A wrapped layer's weight under its plain name: 'layers.0.attention.wq.base_layer.weight' ->
    'layers.0.attention.wq.weight'; adapter keys lose the adapter name ('.lora_A.default.' -> '.lora_A.')."""
    return key.replace(".base_layer.", ".").replace(".default.", ".")


def fold_lora(sd, model):
    """`sd` (the model's own key names, any tensors: also a DeepSpeed-gathered copy) with each adapter
    folded into its base weight, under plain key names -> a state dict like an unwrapped model's."""
    if not has_lora(model):
        return sd
    out = {}
    for key, value in sd.items():
        if ".lora_" not in key:
            out[plain_key(key)] = value
    for name, layer in lora_layers(model).items():
        a = sd[f"{name}.lora_A.default.weight"].float()  # [r, in]
        b = sd[f"{name}.lora_B.default.weight"].float()  # [out, r]
        w = out[f"{name}.weight"]
        out[f"{name}.weight"] = (w.float() + layer.scaling["default"] * (b @ a)).to(w.dtype)  # [out, in]
    return out


def adapter_state_dict(model, sd=None):
    """What trained, under plain key names: the adapters, the projector and any other trainable
    weight. `sd` (default: the model's) supplies the values, e.g. a DeepSpeed-gathered fp32 copy."""
    sd = model.state_dict() if sd is None else sd
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    return {plain_key(k): v.detach().float().cpu().contiguous() for k, v in sd.items() if k in trainable}


def save_adapter(tensors, settings, config, path):
    """The adapter file: safetensors, written atomically (a kill never truncates it)."""
    from safetensors.torch import save
    meta = {"format": FORMAT, "rank": str(settings.rank), "alpha": str(settings.alpha),
            "dropout": str(settings.dropout), "targets": ",".join(settings.targets),
            "model": json.dumps({"generation": config.generation, "dim": config.dim, "n_layers": config.n_layers,
                                 "use_moe": bool(config.use_moe)})}
    atomic_save(tensors, path, dump=lambda t, f: f.write(save(t, metadata=meta)))


def _read_metadata(path, meta, shapes):
    """An adapter file's metadata -> (LoraSettings, the model it was trained on), checked against the
    shapes of its tensors before any is read or any layer built: the model allocates adapters of the
    rank the metadata says, which the file's lora_A/lora_B must have (safetensors checks their shapes
    against the file's size, so the rank is bounded by it)."""
    where = f"--lora {path}"
    missing = [k for k in ("rank", "alpha", "dropout", "targets", "model") if k not in meta]
    if missing:
        raise ValueError(f"{where}: its metadata has no {', '.join(missing)}: it was not written by "
                         f"train_*_vlm.py --lora_rank as it is (use the adapter file that training wrote)")
    try:
        rank, alpha, dropout = int(meta["rank"]), float(meta["alpha"]), float(meta["dropout"])
    except ValueError:
        raise ValueError(f"{where}: its metadata's rank {meta['rank']!r}, alpha {meta['alpha']!r} or dropout "
                         f"{meta['dropout']!r} is not a number") from None
    if not (math.isfinite(alpha) and 0 <= dropout < 1):
        raise ValueError(f"{where}: its metadata's alpha {meta['alpha']} or dropout {meta['dropout']} is out of range "
                         f"(alpha a finite number, dropout in [0, 1)): the file is damaged")
    targets = tuple(meta["targets"].split(","))
    unknown = sorted(set(targets) - set(LORA_LAYERS))
    if unknown or not targets:
        raise ValueError(f"{where}: its metadata's targets {meta['targets']!r} are not a comma list of "
                         f"{','.join(LORA_LAYERS)}" + (f" (unknown: {','.join(unknown)})" if unknown else ""))
    try:
        trained_on = json.loads(meta["model"])
        if not isinstance(trained_on, dict):
            raise ValueError
    except ValueError:
        raise ValueError(f"{where}: its metadata's model {meta['model'][:80]!r} is not a JSON object like "
                         f'{{"generation": "minimind2", "dim": 512, "n_layers": 8, "use_moe": false}}') from None
    pairs = [(shapes[k], shapes.get(k.replace(".lora_A.", ".lora_B."))) for k in shapes if ".lora_A." in k]
    if not pairs:
        raise ValueError(f"{where} holds no lora_A/lora_B tensors: it is not a LoRA adapter")
    for a, b in pairs:  # lora_A [rank, in], lora_B [out, rank]
        if len(a) != 2 or b is None or len(b) != 2 or not 1 <= rank == a[0] == b[1]:
            raise ValueError(f"{where}: its metadata says rank {meta['rank']}, but it holds a lora_A of shape "
                             f"{list(a)} and a lora_B of shape {list(b) if b else 'absent'}: the file is damaged")
    return LoraSettings(rank, alpha, dropout, targets), trained_on


def read_adapter(path):
    """-> (tensors under plain names, LoraSettings, the model it was trained on). A ValueError names
    the file when it is not an adapter written here, or holds NaN or inf."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--lora {path}: no such file (train_*_vlm.py --lora_rank R writes "
                                f"out/{{save_weight}}_{{dim}}_lora.safetensors)")
    try:
        with safe_open(path, "pt") as f:  # the header only: shapes without the tensors
            meta, shapes = f.metadata() or {}, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise ValueError(f"--lora {path} is not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"--lora {path} is not a LoRA adapter written by train_*_vlm.py --lora_rank")
    settings, trained_on = _read_metadata(path, meta, shapes)
    with safe_open(path, "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    refuse_non_finite(tensors, f"--lora {path}", "it is damaged, or its training diverged; use another adapter",
                      ValueError)
    return tensors, settings, trained_on


def adapter_projector(path):
    """The projector tensors an adapter file brings (none: {}), for telling the model's shape from
    base weights without one (an LLM-only .pth): infer_config_from_state_dict({**base, **these})."""
    return {k: v for k, v in read_adapter(path)[0].items() if k.startswith("vision_proj.")} if path else {}


def load_adapter(model, path):
    """Wrap `model` (base weights loaded) with the adapter file's LoRA layers and load everything it
    holds (adapters, projector, layers trained in full) -> model. Nothing is merged."""
    tensors, settings, trained_on = read_adapter(path)
    cfg = model.config
    ours = {"generation": cfg.generation, "dim": cfg.dim, "n_layers": cfg.n_layers, "use_moe": bool(cfg.use_moe)}
    if trained_on != ours:
        raise ValueError(f"--lora {path} was trained on a model with {trained_on}, but the base weights are {ours}")
    add_lora(model, settings)
    by_plain = {plain_key(k): k for k in model.state_dict()}
    unknown = sorted(k for k in tensors if k not in by_plain)
    if unknown:
        raise ValueError(f"--lora {path}: {len(unknown)} tensors do not fit this model, e.g. {unknown[:3]}")
    absent = sorted(k for k in by_plain if ".lora_" in k and k not in tensors)
    if absent:  # left out, they would stay at their random start
        raise ValueError(f"--lora {path} lacks {len(absent)} of the adapters its targets need, e.g. {absent[:3]}: "
                         f"the file is damaged")
    own = model.state_dict()
    for k, v in tensors.items():
        if own[by_plain[k]].shape != v.shape:
            raise ValueError(f"--lora {path}: {k} has shape {tuple(v.shape)}, the model {tuple(own[by_plain[k]].shape)}")
    model.load_state_dict({by_plain[k]: v for k, v in tensors.items()}, strict=False)
    return model


def merge_lora(model):
    """Fold every adapter into its base layer and put the plain nn.Linear back -> model."""
    import torch
    if not has_lora(model):
        return model
    with torch.no_grad():
        folded = fold_lora(model.state_dict(), model)
        for name in lora_layers(model):
            parent, _, child = name.rpartition(".")
            layer = getattr(model.get_submodule(parent), child)
            setattr(model.get_submodule(parent), child, layer.base_layer)
            layer.base_layer.weight.copy_(folded[f"{name}.weight"])
    model.lora_settings = None
    for attr in ("peft_config", "_hf_peft_config_loaded"):  # what peft set on the instance
        model.__dict__.pop(attr, None)
    return model
