"""Convert MiniMind-V weights between our .pth format and a transformers-format directory.

Export (.pth -> directory):
    python scripts/convert_model.py --weight out/sft_vlm_512.pth --out out/MiniMind2-V-hf
writes a self-contained directory that loads offline with
    AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    config.json             VLMConfig with auto_map, vision_model_path recorded (the tower itself
                            is not copied unless --copy_vision_tower)
    model.safetensors       LLM + projection; the tied output head is stored once (as tok_embeddings.weight)
    tokenizer files         from --tokenizer_path (chat template included)
    preprocessor_config.json  the tower's image processor (from --vision_model_path, else standard CLIP settings)
    model_minimind.py, generations.py, model_vlm.py, chat.py, images.py, paths.py, precision.py,
    modeling_minimind_v.py: the code

Import (directory -> .pth in the released key format):
    python scripts/convert_model.py --reverse --weight out/MiniMind2-V-hf --out out/sft_vlm_512.pth
    (or: --from_hf DIR --out X.pth)
"""
import argparse
import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import make_parser, old_spelling, switch  # noqa: E402
from model.paths import DEFAULT_VISION_MODEL  # noqa: E402


def build_parser():
    ap = make_parser(__doc__)
    a = ap.add_argument_group("what to convert").add_argument
    a("--weight", default="sft_vlm",
      help="export: the .pth to convert (a bare name is looked up as out/{weight}_{dim}[_moe].pth); "
           "--reverse: the transformers-format directory")
    a("--dim", type=int, default=512, help="for looking up a bare --weight name")
    switch(a, "--use_moe", 0, help="for looking up a bare --weight name")
    switch(a, "--reverse", 0, help="directory (--weight) -> .pth (--out)")
    a("--from_hf", default=None, help=argparse.SUPPRESS)  # the old spelling of --reverse --weight DIR
    a("--out", default=None, help="what to write: export, the transformers-format directory; --reverse, the .pth "
                                  "(required)")
    old_spelling(a, "--out_dir", "--out")  # the export's former flag (elsewhere --out_dir is where weights are read)
    a = ap.add_argument_group("export (.pth -> directory)").add_argument
    a("--tokenizer_path", help="the tokenizer to include (default: the one the .pth's record names)")
    a("--vision_model_path", help="the vision tower the directory records (and copies with "
                                  "--copy_vision_tower); default: the one the .pth's record names, else "
                                  + DEFAULT_VISION_MODEL)
    a("--image_token_id", type=int, default=-1, help="placeholder id; -1 = the tokenizer's <|image_pad|>, or '@'")
    switch(a, "--copy_vision_tower", 0,
           help="copy the vision tower into DIR/vision_model (a directory that needs nothing else)")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer here, before torch loads (seconds)

import torch  # noqa: E402

from model.checkpoint import (check_state_dict, infer_config_from_state_dict, llm_state_dict, load_weights,  # noqa: E402
                              read_checkpoint, weight_path)
from model.files import CheckpointError, atomic_save  # noqa: E402
from model.model_vlm import MiniMindVLM, VLMConfig, load_vision_tower, tower_token_count  # noqa: E402
from model.paths import load_tokenizer, local_path  # noqa: E402
from model.record import RecordError, make_record, resolve_folders, write_record  # noqa: E402

# The model code an exported directory carries, copied as it is: modeling_minimind_v.py is the
# transformers entry point (from_pretrained without the tower, then the tower attached; chat()).
CODE_FILES = ("model_minimind.py", "generations.py", "model_vlm.py", "chat.py", "images.py", "paths.py",
              "precision.py", "modeling_minimind_v.py")
AUTO_MAP = {"AutoConfig": "model_vlm.VLMConfig",
            "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVLMForCausalLM"}
# Standard OpenAI CLIP ViT-B/16 preprocessing, written when the vision directory is not at hand.
CLIP_PROCESSOR = dict(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, do_resize=True,
                      do_center_crop=True, do_normalize=True, resample=3,
                      image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711])


MODEL_CARD = """# MiniMind-V ({dim}, {n_layers} layers{moe})

Converted from `{source}` by `scripts/convert_model.py`. Load offline:

```python
from PIL import Image
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{name}", trust_remote_code=True)  # vision tower: {vision}
print(model.chat(Image.open("photo.jpg"), "What is in the picture?"))
```

The vision tower (CLIP or SigLIP2) is not included; it is loaded from `vision_model_path` in config.json
(override: `from_pretrained(..., vision_model_path=DIR)`).
"""


def copy_model_code(out_dir):
    """Copy our modelling files as they are, checking they need nothing else of the repository."""
    for name in CODE_FILES:
        with open(os.path.join(ROOT, "model", name), encoding="utf-8") as f:
            code = f.read()
        for m in re.finditer(r"^(?:from|import) (\.?[\w.]+)", code, flags=re.M):
            module = m.group(1)
            if module.startswith(".") and module[1:] + ".py" not in CODE_FILES:
                raise RuntimeError(f"model/{name} imports {module}, which the exported directory does not have")
            if module.split(".")[0] in ("dataset", "trainer", "scripts", "model"):
                raise RuntimeError(f"model/{name} imports the repository package '{module}': remote code cannot")
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(code)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")


def save_tokenizer(tokenizer_path, tokenizer, out_dir):
    """Copy the tokenizer files as they are (readable by transformers 4 and 5 alike); save_pretrained
    only for a tokenizer that is not a local directory."""
    if not os.path.isdir(tokenizer_path):
        tokenizer.save_pretrained(out_dir)
        return
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer_path, name)):
            shutil.copyfile(os.path.join(tokenizer_path, name), os.path.join(out_dir, name))


def save_processor(vision_path, out_dir):
    from model.images import clip_processor, load_processor
    if vision_path and os.path.isfile(os.path.join(vision_path, "preprocessor_config.json")):
        processor = load_processor(vision_path)
    else:
        print(f"note: no image processor at '{vision_path}'; writing the standard CLIP ViT-B/16 one")
        processor = clip_processor(**CLIP_PROCESSOR)
    processor.save_pretrained(out_dir)


def export_hf(weight, out_dir, tokenizer_path, vision_model_path, image_token_id=-1, copy_tower=False):
    """Our .pth -> a transformers-format directory. Returns the directory. copy_tower: put the vision
    tower inside it (as vision_model/) so the directory needs nothing else."""
    if not os.path.isfile(weight):
        sys.exit(f"error: weights {weight} not found: pass --weight PATH.pth (or a name in out/, e.g. sft_vlm)")
    try:  # not given: the folders the weights' record names
        tokenizer_path, vision_model_path, _ = resolve_folders(weight, tokenizer_path, vision_model_path,
                                                               DEFAULT_VISION_MODEL)
    except RecordError as e:
        sys.exit(f"error: {e}")
    tokenizer_path, vision_model_path = local_path(tokenizer_path), local_path(vision_model_path)
    from safetensors.torch import save_file

    from model.chat import resolve_image_token_id
    try:
        sd = check_state_dict(read_checkpoint(weight), weight)
        found = infer_config_from_state_dict(sd, weight)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if "projector" not in found:
        sys.exit(f"error: {weight} has no vision projection (an LLM-only checkpoint): export a VLM checkpoint")
    tokenizer = load_tokenizer(tokenizer_path)
    config = VLMConfig(**found, vision_model_path=vision_model_path,
                       image_token_id=resolve_image_token_id(tokenizer, image_token_id),
                       eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    if os.path.isfile(os.path.join(vision_model_path or "", "config.json")):
        config.image_token_count = tower_token_count(load_vision_tower(vision_model_path))  # 196 CLIP B/16, 64 SigLIP2
    # Strict key check against the architecture (errors list missing/unexpected keys).
    model = MiniMindVLM(config, load_tower=False)
    load_weights(model, sd, weight)
    head, embed = ("lm_head.weight", "model.embed_tokens.weight") if "lm_head.weight" in sd else \
        ("output.weight", "tok_embeddings.weight")
    if head in sd and not torch.equal(sd[head].float(), sd[embed].float()):
        sys.exit(f"error: {head} differs from {embed}, but MiniMind ties them")
    # The directory holds our module's own names (its code is ours); the tied head is stored once.
    tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
               if k != "output.weight" and not k.startswith("vision_encoder.")}

    os.makedirs(out_dir, exist_ok=True)
    if copy_tower:
        if not os.path.isfile(os.path.join(vision_model_path or "", "config.json")):
            sys.exit(f"error: --copy_vision_tower: no vision tower at '{vision_model_path}'")
        shutil.copytree(vision_model_path, os.path.join(out_dir, "vision_model"), dirs_exist_ok=True)
        config.vision_model_path = "vision_model"  # found relative to the directory
    config.auto_map = dict(AUTO_MAP)
    config.architectures = ["MiniMindVLMForCausalLM"]
    config.save_pretrained(out_dir)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    save_tokenizer(tokenizer_path, tokenizer, out_dir)
    save_processor(vision_model_path, out_dir)
    copy_model_code(out_dir)
    with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
        f.write(MODEL_CARD.format(dim=config.dim, n_layers=config.n_layers, moe=", MoE" if config.use_moe else "",
                                  source=os.path.basename(weight), name=out_dir, vision=config.vision_model_path))
    if not copy_tower and not os.path.isfile(os.path.join(vision_model_path or "", "config.json")):
        print(f"warning: no vision tower at '{vision_model_path}' now; loading the directory will need one there "
              f"(or from_pretrained(..., vision_model_path=DIR))")
    return out_dir


def import_hf(hf_dir, out_path):
    """A transformers-format directory -> .pth in its generation's released key format (the tied
    head under both names, one tensor)."""
    from safetensors.torch import load_file
    cfg_path, st_path = os.path.join(hf_dir, "config.json"), os.path.join(hf_dir, "model.safetensors")
    if not (os.path.isfile(cfg_path) and os.path.isfile(st_path)):
        sys.exit(f"error: {hf_dir} is not a converted MiniMind-V directory (needs config.json and model.safetensors)")
    again = f"fix it, or export the directory again (scripts/convert_model.py --weight X.pth --out {hf_dir})"
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, OSError) as e:  # JSONDecodeError, UnicodeDecodeError
        sys.exit(f"error: {cfg_path} is not a JSON config ({e}): {again}")
    if not isinstance(cfg, dict):
        sys.exit(f"error: {cfg_path} holds a {type(cfg).__name__}, not a JSON object of config fields: {again}")
    for key in ("auto_map", "architectures", "model_type", "transformers_version", "dtype", "torch_dtype"):
        cfg.pop(key, None)
    numbers = {k: v for k, v in VLMConfig().to_dict().items() if type(v) in (int, float)}  # the numeric fields
    odd = next((k for k in numbers if cfg.get(k) is not None and (type(cfg[k]) not in (int, float) or cfg[k] < 0)),
               None)
    if odd:
        sys.exit(f"error: {cfg_path}: {odd} is {cfg[odd]!r}, not a number >= 0: {again}")
    try:
        tensors = load_file(st_path)
    except Exception as e:  # safetensors' own error: a truncated or foreign file
        sys.exit(f"error: {st_path} is not a safetensors file ({e}): {again}")
    tensors = {k: v for k, v in tensors.items() if not k.startswith("vision_encoder.")}
    if "tok_embeddings.weight" not in tensors:
        sys.exit(f"error: {st_path} has no tok_embeddings.weight, so no MiniMind weights: {again}")
    tensors.setdefault("output.weight", tensors["tok_embeddings.weight"])
    try:
        model = MiniMindVLM(VLMConfig(**cfg), load_tower=False)
    except (TypeError, ValueError, ArithmeticError, RuntimeError) as e:  # values no model can have, e.g. n_heads 0
        sys.exit(f"error: {cfg_path} does not describe a MiniMind-V model ({str(e).splitlines()[0]}): {again}")
    try:  # strict: errors list any missing/unexpected key
        load_weights(model, tensors, hf_dir, fix="its config.json does not describe its model.safetensors")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    atomic_save(llm_state_dict(model), out_path)  # the released layout of the model's generation
    tower = model.config.vision_model_path or ""  # recorded as given, or relative to the directory
    if tower and not os.path.isabs(tower) and os.path.isdir(os.path.join(hf_dir, tower)):
        tower = os.path.join(hf_dir, tower)
    write_record(make_record(model.config, hf_dir, tower, trained_from=hf_dir), out_path)  # its tokenizer: the dir's
    return out_path


def main(argv=None):
    ap = build_parser()
    a = ap.parse_args(argv)
    if a.from_hf:
        print("note: --from_hf DIR is now spelled --reverse --weight DIR", file=sys.stderr)
    if a.reverse or a.from_hf:
        src = a.from_hf or a.weight
        if not a.out:
            ap.error("--reverse needs --out X.pth")
        import_hf(src, a.out)
        print(f"wrote {a.out} from {src}")
        return
    if not a.out:
        ap.error("export needs --out DIR (or use --reverse --weight DIR --out X.pth)")
    weight = weight_path("out", a.weight, a.dim, a.use_moe)
    export_hf(weight, a.out, a.tokenizer_path, a.vision_model_path, a.image_token_id, a.copy_vision_tower)
    print(f"wrote {a.out}: load it with AutoModelForCausalLM.from_pretrained('{a.out}', "
          f"trust_remote_code=True), or eval_vlm.py / web_demo_vlm.py --weight {a.out}")


if __name__ == "__main__":
    main()
