"""The training flags and the read-only TrainConfig they become, shared by train_pretrain_vlm.py and
train_sft_vlm.py: each calls `build_parser(...)` with its stage's defaults, parses, and only then
imports trainer.main (torch and the rest), so --help and a mistyped flag answer at once. This module
loads no torch.

Each flag is written once, as a TrainConfig field: its type is the field's, and its group, help,
default and choices are the field's metadata (`flag`, `on_off`), from which build_parser adds it.
The fields stand in the order --help lists them.
"""
import dataclasses
import types

from cli import DEVICE_HELP, DTYPE_HELP, IMAGES_PATH_DEFAULT, add_video_args, make_parser, switch
from model.generations import GENERATIONS, RELEASE_N_HEADS
from model.lora import LORA_LAYERS
from model.paths import DEFAULT_VISION_MODEL
from model.precision import DTYPES

FREEZE_HELP = ("what trains besides the projector: 0: the whole LLM; 1: its last layer; 2: nothing; "
               "3: its first and last layers (the 2026 release's SFT). With --lora_rank, the adapters train, "
               "0 and 2 add nothing, 1 and 3 also train those layers in full")

# The argument groups of --help, in its order: (title, description).
GROUPS = (("data", None), ("model", None), ("training", None), ("LoRA", None), ("output", None),
          ("distributed", "one process, torchrun (DDP) or the deepspeed launcher"))


def flag(group, help, default=None, **add_argument):
    """A TrainConfig field that is the flag --{field name}: its group, help and default, and any
    other add_argument keyword (choices, nargs, metavar...; names: its other spellings). Its type
    is the field's (str, int or float, or None or one of them); the field itself has no default,
    so a TrainConfig is always built from every flag."""
    return dataclasses.field(metadata={"group": group, "help": help, "default": default, **add_argument})


def on_off(group, help, default=0):
    """A TrainConfig field that is an on/off flag: the ints 0 and 1, `--name` alone meaning 1 (cli.switch)."""
    return dataclasses.field(metadata={"group": group, "help": help, "default": default, "switch": True})


def shared(group, add):
    """A TrainConfig field whose flag other scripts have too: `add(argument_group)` adds it (with the
    others it adds), as every script that has it does."""
    return dataclasses.field(metadata={"group": group, "added_by": add})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training flags, read-only. On/off flags are the ints 0 and 1, as the command line gives them."""
    # data: what to train on
    data_path: str | None = flag("data", "training data: a .jsonl file (with --images_path), or parquet in the "
                                         "released schema: a .parquet file, a folder of them or a glob (images "
                                         "inside)")
    images_path: str | None = flag("data", f"jsonl only: the folder its image names are relative to (default: "
                                           f"{IMAGES_PATH_DEFAULT})")
    allow_outside_images: int = on_off("data", "let jsonl image names leave --images_path ('../x.png', absolute "
                                               "paths); off, such a name is a bad sample")
    max_seq_len: int | None = flag("data", "longer samples are truncated (never inside an image) or skipped")
    frames: int = shared("data", add_video_args)  # per video: a sample's "video" becomes that many images
    max_video_seconds: float = shared("data", add_video_args)
    skip_bad_samples: int = on_off("data", "skip (and count) malformed samples instead of stopping with an error")
    group_by_length: int = on_off("data", "batch samples of similar length: less padding, but each batch then "
                                          "holds one length, which may go with content (docs/demo-experiments.md)",
                                  default=1)
    pad_to_max_len: int = on_off("data", "pad every batch to --max_seq_len instead of its longest sample: fixed "
                                         "shapes (as the original implementation did), more work")
    num_workers: int = flag("data", "DataLoader workers decoding images", default=2)

    # model: what is trained
    from_weight: str | None = flag("model", "start from out_dir/{from_weight}_{dim}.pth, a .pth path, or 'none' "
                                            "(random)")
    dim: int = flag("model", "the LLM's width: 512 (with 8 layers: 26M) or 768 (MiniMind2-V: 16 layers, 104M; "
                             "minimind-3v: 8)", default=512)
    n_layers: int = flag("model", "the LLM's layers (see --dim)", default=8)
    use_moe: int = on_off("model", "mixture-of-experts FFN")
    # None: the --from_weight checkpoint's, else MiniMindConfig's default, minimind2 (see build.build_model)
    generation: str | None = flag("model", "the LLM architecture of a model trained from scratch (--from_weight "
                                           "none): minimind2 (2025: 2 KV heads) or minimind3 (2026: QK-norm, 4 KV "
                                           "heads, a wider FFN); default: minimind2, or a --from_weight checkpoint's "
                                           "own",
                                  choices=list(GENERATIONS))
    # None: the --from_weight checkpoint's, else MiniMindConfig's (RELEASE_N_HEADS; KV heads by generation)
    n_heads: int | None = flag("model", "attention heads of a model trained from scratch (a --from_weight "
                                        "checkpoint brings its own), each --dim / --n_heads wide unless --head_dim; "
                                        f"default: {RELEASE_N_HEADS}, as every release. Only with --generation "
                                        "minimind3, whose files say it")
    n_kv_heads: int | None = flag("model", "key/value heads, a divisor of --n_heads; default: the generation's "
                                           "(minimind2 2, minimind3 4), or a --from_weight checkpoint's own")
    head_dim: int | None = flag("model", "the width of an attention head of a model trained from scratch; default: "
                                         "--dim / --n_heads, as every release. QK-norm bounds a score by sqrt(width) "
                                         "times its gains, so wider heads can look up more sharply. Only with "
                                         "--generation minimind3")
    freeze_llm: int | None = flag("model", FREEZE_HELP, choices=[0, 1, 2, 3])
    projector: str = flag("model", "a new projector's kind: linear (one bias-free Linear, the design) or mlp "
                                   "(LayerNorm, Linear, GELU, Linear, as the 2026 release); a --from_weight VLM "
                                   "checkpoint brings its own", default="linear", choices=["linear", "mlp"])
    # None: --from_weight's record's, else DEFAULT_VISION_MODEL (see loop.train)
    vision_model_path: str | None = flag("model", "the vision tower's directory; default: the one --from_weight's "
                                                  "record names, else " + DEFAULT_VISION_MODEL)
    # None: --from_weight's record's, else "model" with --from_weight none
    tokenizer_path: str | None = flag("model", "default: the one --from_weight's record names; this repository's "
                                               "'model' for --from_weight none; a --from_weight without a record "
                                               "(the released weights) needs it")
    image_token_id: int = flag("model", "placeholder id; -1 = <|image_pad|>, or '@' (34) with the released "
                                        "tokenizer", default=-1)

    # training: how the run goes
    epochs: int = flag("training", "passes over the data")
    batch_size: int = flag("training", "samples per process per micro-step")
    learning_rate: float = flag("training", "peak LR, reached after the warmup, then a cosine down to a tenth of it "
                                            "(--decay_ratio: when)")
    warmup_ratio: float = flag("training", "fraction of training with linear LR warmup", default=0.03)
    decay_ratio: float = flag("training", "fraction of training, at the end, over which the LR falls to a tenth "
                                          "(1: from the warmup on; below 1 it holds at its peak until then)",
                              default=1.0)
    accumulation_steps: int = flag("training", "micro-steps per optimizer step", default=1)
    grad_clip: float = flag("training", "max gradient norm (0 = no clipping)", default=1.0)
    seed: int = flag("training", "model init and data order", default=42)
    # as given ("auto" too); loop.train resolves it, and Cluster.device is the one this process uses
    device: str = flag("training", DEVICE_HELP, default="auto")
    # as given ("auto" too); loop.train replaces it with the dtype it resolves to
    dtype: str = flag("training", "autocast dtype; weights stay fp32. " + DTYPE_HELP + ". float16 adds a GradScaler",
                      default="auto", choices=DTYPES)
    # "0" off, "1" out_dir/feature_cache, else a folder (see build.open_feature_cache)
    cache_features: str = flag("training", "encode each image once and reuse its frozen features from a disk cache: "
                                           "1 (or bare) in out_dir/feature_cache, DIR in DIR, 0 off; ~300 KB per "
                                           "image at ViT-B/16 width, so later epochs and runs skip the tower",
                               default="0", nargs="?", const="1", metavar="0|1|DIR")
    use_compile: int = on_off("training", "torch.compile the transformer blocks, the output head with its loss, "
                                          "and the vision tower")
    gradient_checkpointing: int = on_off("training", "recompute activations in backward: less memory (e.g. dim 768 "
                                                     "on a small GPU), ~30%% slower")
    from_resume: int = on_off("training", "continue from the resume file")
    stop_after_steps: int = flag("training", "stop after this many optimizer steps with a resume file (0 = run to "
                                             "the end); the LR schedule is unchanged, so a run can be split into "
                                             "time slots", default=0)

    # LoRA
    lora_rank: int = flag("LoRA", "LoRA (peft) adapters of this rank on the LLM's linear layers instead of training "
                                  "them in full (0 = off); the projector trains in full. Saves "
                                  "{save_weight}_{dim}_lora.safetensors (small) beside the .pth (adapters merged "
                                  "in). Works with DDP and DeepSpeed (ZeRO-2 and -3 tested)", default=0)
    lora_alpha: float | None = flag("LoRA", "LoRA scale numerator: the update is alpha/rank * B @ A (default: 2 x "
                                            "rank)")
    lora_dropout: float = flag("LoRA", "dropout on the LoRA input", default=0.0)
    lora_targets: str = flag("LoRA", "which linear layers of every LLM block get adapters: attention wq,wk,wv,wo "
                                     "and FFN w1,w2,w3", default=",".join(LORA_LAYERS))

    # output: what the run writes
    out_dir: str = flag("output", "where weights, resume files and logs go", default="out")
    save_weight: str | None = flag("output", "weights go to out_dir/{save_weight}_{dim}[_moe].pth")
    save_interval: int = flag("output", "optimizer steps between checkpoints", default=500)
    log_interval: int = flag("output", "optimizer steps between log lines", default=50)
    use_wandb: int = on_off("output", "log to Weights & Biases (WANDB_MODE=offline works)")
    wandb_project: str = flag("output", "the Weights & Biases project", default="MiniMind-V")
    debug: int = on_off("output", "on an error, show the full traceback instead of one line (MINIMIND_DEBUG=1 does "
                                  "the same)")

    # distributed
    deepspeed: str | None = flag("distributed", "train through DeepSpeed with this JSON config, e.g. "
                                                "ds_config/zero2.json; its \"auto\" values come from our flags "
                                                "(default: none, plain PyTorch)", metavar="CONFIG")
    local_rank: int = flag("distributed", "set by the deepspeed launcher (LOCAL_RANK works too)", default=-1,
                           names=["--local-rank"])


def build_parser(description, **defaults):
    """The trainers' parser, with a stage's defaults (data_path=..., epochs=...) over the shared ones:
    a flag for every TrainConfig field, in its group, in field order."""
    p = make_parser(description)
    groups = {title: p.add_argument_group(title, about) for title, about in GROUPS}
    added_by = set()
    for field in dataclasses.fields(TrainConfig):
        spec = dict(field.metadata)
        group, name = groups[spec.pop("group")], "--" + field.name
        if "added_by" in spec:
            if spec["added_by"] not in added_by:
                spec["added_by"](group)
                added_by.add(spec["added_by"])
        elif spec.pop("switch", False):
            switch(group.add_argument, name, spec["default"], help=spec["help"])
        else:
            group.add_argument(name, *spec.pop("names", ()), type=flag_type(field.type), **spec)
    p.set_defaults(**defaults)
    return p


def flag_type(annotation):
    """A field's annotation -> add_argument's type: int or float; None (the text as given) for str."""
    if isinstance(annotation, types.UnionType):  # X | None
        annotation, = (t for t in annotation.__args__ if t is not type(None))
    return None if annotation is str else annotation


def parse(parser, argv=None):
    """The command line (argv, default sys.argv) -> TrainConfig."""
    return TrainConfig(**vars(parser.parse_args(argv)))


def plain_args(cfg):
    """The config as saved in a resume file: plain values only (see distributed.rng_state)."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}
