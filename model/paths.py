"""Paths: default folders (the tokenizer, the vision tower) are named relative to the repository, so
that a script started from any folder finds them (a relative path that does not exist from the
current folder is looked up from the repository's root); and the names of a run's files (RunFiles)."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VISION_MODEL = "model/vision_model/clip-vit-base-patch16"  # the design's tower: CLIP ViT-B/16


def local_path(path):
    """`path` as given when it exists (or is absolute); else the same path under the repository's
    root when that exists; else `path` unchanged, for the caller's error to name."""
    if not path or os.path.isabs(path) or os.path.exists(path):
        return path
    in_repo = os.path.join(REPO_ROOT, path)
    return in_repo if os.path.exists(in_repo) else path


def load_tokenizer(path):
    """The tokenizer in a local folder (never a model hub). FileNotFoundError names the folder, the
    flag and what belongs in it."""
    from transformers import AutoTokenizer
    found = local_path(path)
    if not found or not os.path.isfile(os.path.join(found, "tokenizer_config.json")):
        raise FileNotFoundError(f"no tokenizer at '{path}' (set --tokenizer_path): a folder with tokenizer.json and "
                                f"tokenizer_config.json, such as this repository's model/ or the tokenizer of the "
                                f"released weights you use")
    return AutoTokenizer.from_pretrained(found)


def weight_name(name, dim, use_moe):
    """The file name stem the trainers write and every loader looks up: {name}_{dim}[_moe]."""
    return f"{name}_{dim}{'_moe' if use_moe else ''}"


class RunFiles:
    """Every file a training run writes, named from one stem, {out_dir}/{name}_{dim}[_moe]: the
    weights, the record beside them (model/record.py), the resume state (one file, or DeepSpeed's
    folder), the log and, with --lora_rank, the adapter. Built from a stem or from any of the files."""
    SUFFIXES = {"weights": ".pth", "record": ".json", "resume": "_resume.pth", "ds_resume": "_ds_resume",
                "log": "_log.jsonl", "adapter": "_lora.safetensors"}

    def __init__(self, stem):
        self.stem = stem
        for kind, suffix in self.SUFFIXES.items():
            setattr(self, kind, stem + suffix)

    @classmethod
    def of(cls, out_dir, name, dim, use_moe):
        return cls(os.path.join(out_dir, weight_name(name, dim, use_moe)))

    @classmethod
    def from_file(cls, path, kind):
        """The run whose `kind` file (a key of SUFFIXES) `path` is."""
        return cls(path.removesuffix(cls.SUFFIXES[kind]))
