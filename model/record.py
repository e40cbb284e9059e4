"""A checkpoint's record: what its weights need to be used, in `{stem}.json` beside `{stem}.pth`.

The .pth stays in the released key format (upstream code still loads it); the record says which
tokenizer and vision tower it was trained with (path and a hash of their files), its shape, and
what it was trained from and on. Every entry point reads it, so `--weight out/demo/sft_vlm_256.pth`
alone is enough, and a tokenizer or tower other than the recorded one is refused instead of
silently giving token ids or features another meaning. A checkpoint without a record (the
released weights) must be given its tokenizer explicitly.
"""
import hashlib
import json
import os

from .paths import RunFiles, local_path

FORMAT = "minimind-v checkpoint record 1"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "vocab.json", "merges.txt")
TOWER_FILES = ("config.json", "preprocessor_config.json")  # its shape and its preprocessing
DEFAULT_TOKENIZER = "model"  # this repository's tokenizer, for models trained from nothing


class RecordError(ValueError):
    """A record that is unreadable, or that disagrees with what the user asked for."""


def record_path(weights_path):
    return RunFiles.from_file(weights_path, "weights").record


def files_hash(folder, names):
    """sha256 over the named files that exist in folder (name and bytes); None without any."""
    digest, found = hashlib.sha256(), False
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = True
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                digest.update(f.read())
    return digest.hexdigest()[:16] if found else None


def make_record(config, tokenizer_path, vision_model_path, trained_from=None, data=None):
    """A model config (VLMConfig) and the folders it was trained with -> the record's dict."""
    tokenizer_path, vision_model_path = (os.path.abspath(local_path(p)) for p in (tokenizer_path, vision_model_path))
    shape = {k: getattr(config, k) for k in ("generation", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                                             "use_moe", "projector", "vocab_size", "image_token_id",
                                             "image_token_count")}
    return {"format": FORMAT, "model": shape,
            "tokenizer": {"path": tokenizer_path, "sha256": files_hash(tokenizer_path, TOKENIZER_FILES)},
            "vision_tower": {"path": vision_model_path, "sha256": files_hash(vision_model_path, TOWER_FILES)},
            "trained_from": os.path.abspath(trained_from) if trained_from else None,
            "data": data}


def write_record(record, weights_path):
    """Atomically, like the weights: a reader sees the old record or the new one, never half."""
    path = record_path(weights_path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)
    return path


def read_record(weights_path):
    """The record beside a .pth, or None where there is none."""
    path = record_path(weights_path)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
        assert record.get("format") == FORMAT and {"tokenizer", "vision_tower"} <= record.keys()
    except (ValueError, AssertionError, AttributeError):
        raise RecordError(f"{path} is not a checkpoint record (written beside {os.path.basename(weights_path)} by "
                          f"training): delete it to use the weights without one") from None
    return record


def resolve_folders(weights_path, tokenizer_path, vision_model_path, default_tower, ignore_record=None):
    """The tokenizer and tower folders to use with `weights_path` (None: a model trained from nothing),
    from the flags (None when not given) and the weights' record -> (tokenizer_path, tower_path, record).

    A flag not given takes the record's folder; one given must hold what the record says (same file
    hashes) unless ignore_record. Without a record, the weights came from elsewhere (the released
    ones), so the tokenizer must be given: this repository's would give its ids other meanings.
    ignore_record is None for a caller without --ignore_record (training, convert_model.py): its
    refusal then names only the flags it has."""
    record = read_record(weights_path) if weights_path else None
    if record is None or ignore_record:
        if tokenizer_path is None and weights_path and record is None:
            raise RecordError(f"{weights_path} has no record ({os.path.basename(record_path(weights_path))}) of the "
                              f"tokenizer it was trained with: pass --tokenizer_path, e.g. the tokenizer released with "
                              f"these weights (MiniMind2: its model/minimind_tokenizer folder), or this repository's "
                              f"'model' if it was trained here")
        return tokenizer_path or DEFAULT_TOKENIZER, vision_model_path or default_tower, record
    folders = []
    for flag, given, kind, names in (("--tokenizer_path", tokenizer_path, "tokenizer", TOKENIZER_FILES),
                                     ("--vision_model_path", vision_model_path, "vision_tower", TOWER_FILES)):
        recorded, what = record[kind], kind.replace("_", " ")
        trained_with = f"{weights_path} was trained with the {what} at {recorded['path']}"
        if given is None:
            if not os.path.isdir(recorded["path"]):
                raise RecordError(f"{trained_with}, which is not there any more: pass {flag} (the same files)")
            folders.append(recorded["path"])
        else:
            found = files_hash(local_path(given), names)
            if recorded["sha256"] and found != recorded["sha256"]:
                raise RecordError(f"{trained_with}, but {flag} {given} holds another one; pass the recorded one "
                                  f"(or drop {flag})" + ("" if ignore_record is None else
                                                         ", or --ignore_record 1 to use it anyway"))
            folders.append(given)
    return folders[0], folders[1], record
