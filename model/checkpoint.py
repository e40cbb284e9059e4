"""Checkpoint files: their names, writing them safely and reading them strictly.

A checkpoint is a plain `torch.save(state_dict)` of every key but the frozen vision tower's, in the
released key names (fp32 in ours). It is read with weights_only=True, written atomically, and
named `{name}_{dim}[_moe].pth` in the output folder.
"""
import contextlib
import errno
import os
import pickle
import re

import torch


def weight_name(name, dim, use_moe):
    """The file name stem the trainers write and every loader looks up: {name}_{dim}[_moe]."""
    return f"{name}_{dim}{'_moe' if use_moe else ''}"


def weight_path(out_dir, name, dim, use_moe):
    """A .pth path as given, or a name: out_dir/{name}_{dim}[_moe].pth."""
    if name.endswith(".pth") or os.sep in name:
        return name
    return os.path.join(out_dir, weight_name(name, dim, use_moe) + ".pth")


def llm_state_dict(model):
    """The checkpoint: every key but the vision tower's, in the released format (fp32)."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}


class CheckpointError(RuntimeError):
    """A file that is not the checkpoint it was given as, or does not fit the model. The message
    names the file, what was expected and the flags to check, so callers print it as it is."""


class DiskFullError(OSError):
    """No space left for a checkpoint; its partial temp file is already removed."""


WEIGHTS_EXPECTED = ("expected a .pth of MiniMind(-V) weights (a dict of tensors) as train_*_vlm.py or "
                    "scripts/convert_model.py write it: check the --weight / --from_weight path")


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _disk_full(e):
    """Why a failed write looks like a full disk, or None. torch.save turns a failed write into
    RuntimeError("[enforce fail at inline_container.cc:...] unexpected pos ..."), with the
    OSError (ENOSPC) as its context when the file object raised it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(e.errno)
        if isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "file write failed",
                                                                      "No space left")):
            return f"the write failed: {_first_line(e)}"
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj, path):
    """torch.save to a temp file, fsync, then rename: a kill mid-write never leaves a truncated file
    under the real name, and the previous good file stays until the new one is complete. A failed
    write removes its temp file (on a full disk it holds the space that is missing); a full disk
    raises DiskFullError naming the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = _disk_full(e)
        if reason:
            raise DiskFullError(f"disk full writing {path} ({reason}): free space on its disk") from None
        raise


def read_checkpoint(path, what="weights file", expected=WEIGHTS_EXPECTED):
    """torch.load with weights_only=True: tensors and plain values (dicts, lists, numbers, strings)
    only, since unpickling anything else can run code. Any file that does not load is a
    CheckpointError naming it, what it is and what was `expected`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} not found; {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(f"{path} is not a valid {what}: it holds {found.group(1)}, not only tensors and "
                                  f"plain values, and loading that could run code, so it was refused; "
                                  f"{expected}") from None
        detail = re.search(r"WeightsUnpickler error: ([^\n]+)", str(e))
        reason = detail.group(1).strip() if detail else _first_line(e)
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
    if "tok_embeddings.weight" not in sd or not any(k.startswith("layers.") for k in sd):
        held = "is empty" if not sd else f"has {len(sd)} tensors but no tok_embeddings.weight / layers.*"
        raise CheckpointError(f"{name} {held}: no MiniMind weights; {WEIGHTS_EXPECTED}")
    return sd


def infer_config_from_state_dict(sd, name="the checkpoint"):
    """What a checkpoint says about its own shape: dim, n_layers, use_moe, proj_bias, vocab."""
    sd = check_state_dict(sd, name)
    n_layers = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    found = {"dim": sd["tok_embeddings.weight"].shape[1], "vocab_size": sd["tok_embeddings.weight"].shape[0],
             "n_layers": n_layers, "use_moe": any(".experts." in k for k in sd)}
    if "vision_proj.vision_proj.0.weight" in sd:
        found["proj_bias"] = "vision_proj.vision_proj.0.bias" in sd
    return found


def _some(keys, n=6):
    return str(keys[:n])[:-1] + f", ... {len(keys) - n} more]" if len(keys) > n else str(keys)


def load_weights(model, path_or_sd, name=None):
    """Strict load of a .pth (LLM-only or VLM), or of a state dict read from the file `name`; only
    the vision tower's keys, which no checkpoint stores, and the projection of an LLM-only
    checkpoint may be absent. Anything else that is missing, unexpected or of another shape is a
    CheckpointError naming the file and listing the keys."""
    if isinstance(path_or_sd, str):
        name = name or path_or_sd
        path_or_sd = read_checkpoint(path_or_sd)
    name = name or "the checkpoint"
    sd = check_state_dict(path_or_sd, name)
    own = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    llm_only = not any(k.startswith("vision_proj.") for k in sd)
    missing = sorted(k for k in own.keys() - sd.keys() if not (llm_only and k.startswith("vision_proj.")))
    unexpected = sorted(sd.keys() - own.keys())
    reshaped = sorted(k for k in sd.keys() & own.keys() if sd[k].shape != own[k].shape)
    if missing or unexpected or reshaped:
        found, cfg = infer_config_from_state_dict(sd, name), model.config
        raise CheckpointError(
            f"{name} does not match the model (check --dim/--n_layers/--use_moe): the file has dim {found['dim']}, "
            f"{found['n_layers']} layers, use_moe {int(found['use_moe'])}; the model dim {cfg.dim}, {cfg.n_layers} "
            f"layers, use_moe {int(cfg.use_moe)}; missing: {_some(missing)}; unexpected: {_some(unexpected)}"
            + (f"; other shape: {_some(reshaped)}" if reshaped else ""))
    model.load_state_dict(sd, strict=False)  # strictness checked above, with the tower allowed out
    return sd
