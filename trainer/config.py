"""The training flags and the read-only TrainConfig they become, shared by train_pretrain_vlm.py and
train_sft_vlm.py: each calls `build_parser(...)` with its stage's defaults, parses, and only then
imports trainer.main (torch and the rest), so --help and a mistyped flag answer at once. This module
loads no torch."""
import dataclasses

from cli import DEVICE_HELP, DTYPE_HELP, IMAGES_PATH_DEFAULT, add_video_args, make_parser, switch
from model.lora import LORA_LAYERS
from model.paths import DEFAULT_VISION_MODEL
from model.precision import DTYPES

FREEZE_HELP = ("what trains besides the projector: 0: the whole LLM; 1: its last layer; 2: nothing; "
               "3: its first and last layers (the 2026 release's SFT). With --lora_rank, the adapters train, "
               "0 and 2 add nothing, 1 and 3 also train those layers in full")


def build_parser(description, **defaults):
    """The trainers' parser, with a stage's defaults (data_path=..., epochs=...) over the shared ones."""
    p = make_parser(description)
    add_data_and_model_flags(p)
    add_training_flags(p)
    p.set_defaults(**defaults)
    return p


def add_data_and_model_flags(p):
    """The "data" and "model" groups: what to train on, and what is trained."""
    data = p.add_argument_group("data")
    a = data.add_argument
    a("--data_path", help="training data: a .jsonl file (with --images_path), or parquet in the released "
                          "schema: a .parquet file, a folder of them or a glob (images inside)")
    a("--images_path", help=f"jsonl only: the folder its image names are relative to (default: {IMAGES_PATH_DEFAULT})")
    switch(a, "--allow_outside_images", 0,
           help="let jsonl image names leave --images_path ('../x.png', absolute paths); off, such a name is a bad "
                "sample")
    a("--max_seq_len", type=int, help="longer samples are truncated (never inside an image) or skipped")
    add_video_args(data)  # --frames, --max_video_seconds: a sample's "video" becomes that many images
    switch(a, "--skip_bad_samples", 0,
           help="skip (and count) malformed samples instead of stopping with an error")
    switch(a, "--group_by_length", 1, help="batch samples of similar length")
    switch(a, "--pad_to_max_len", 0,
           help="pad every batch to --max_seq_len instead of its longest sample: fixed shapes (as the original "
           "implementation did), more work")
    a("--num_workers", type=int, default=2, help="DataLoader workers decoding images")

    a = p.add_argument_group("model").add_argument
    a("--from_weight", help="start from out_dir/{from_weight}_{dim}.pth, a .pth path, or 'none' (random)")
    a("--dim", type=int, default=512, help="the LLM's width: 512 (with 8 layers: 26M) or 768 (MiniMind2-V: 16 "
                                           "layers, 104M; minimind-3v: 8)")
    a("--n_layers", type=int, default=8, help="the LLM's layers (see --dim)")
    switch(a, "--use_moe", 0, help="mixture-of-experts FFN")
    a("--freeze_llm", type=int, choices=[0, 1, 2, 3], help=FREEZE_HELP)
    a("--projector", default="linear", choices=["linear", "mlp"],
      help="a new projector's kind: linear (one bias-free Linear, the design) or mlp (LayerNorm, Linear, GELU, "
           "Linear, as the 2026 release); a --from_weight VLM checkpoint brings its own")
    a("--vision_model_path", help="the vision tower's directory; default: the one --from_weight's record names, "
                                   "else " + DEFAULT_VISION_MODEL)
    a("--tokenizer_path", help="default: the one --from_weight's record names; this repository's 'model' for "
                               "--from_weight none; a --from_weight without a record (the released weights) needs it")
    a("--image_token_id", type=int, default=-1,
      help="placeholder id; -1 = <|image_pad|>, or '@' (34) with the released tokenizer")


def add_training_flags(p):
    """The "training", "LoRA", "output" and "distributed" groups: how the run goes and what it writes."""
    a = p.add_argument_group("training").add_argument
    a("--epochs", type=int, help="passes over the data")
    a("--batch_size", type=int, help="samples per process per micro-step")
    a("--learning_rate", type=float, help="peak LR, reached after the warmup, then a cosine down to a tenth of it")
    a("--warmup_ratio", type=float, default=0.03, help="fraction of training with linear LR warmup")
    a("--accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    a("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--seed", type=int, default=42, help="model init and data order")
    a("--device", default="auto", help=DEVICE_HELP)
    a("--dtype", default="auto", choices=DTYPES,
      help="autocast dtype; weights stay fp32. " + DTYPE_HELP + ". float16 adds a GradScaler")
    a("--cache_features", nargs="?", const="1", default="0", metavar="0|1|DIR",
      help="encode each image once and reuse its frozen features from a disk cache: 1 (or bare) in "
           "out_dir/feature_cache, DIR in DIR, 0 off; ~300 KB per image at ViT-B/16 width, so later epochs "
           "and runs skip the tower")
    switch(a, "--use_compile", 0,
           help="torch.compile the transformer blocks, the output head with its loss, and the vision tower")
    switch(a, "--gradient_checkpointing", 0,
           help="recompute activations in backward: less memory (e.g. dim 768 on a small GPU), ~30%% slower")
    switch(a, "--from_resume", 0, help="continue from the resume file")
    a("--stop_after_steps", type=int, default=0,
      help="stop after this many optimizer steps with a resume file (0 = run to the end); the LR "
           "schedule is unchanged, so a run can be split into time slots")

    a = p.add_argument_group("LoRA").add_argument
    a("--lora_rank", type=int, default=0,
      help="LoRA (peft) adapters of this rank on the LLM's linear layers instead of training them in full "
           "(0 = off); the projector trains in full. Saves {save_weight}_{dim}_lora.safetensors (small) "
           "beside the .pth (adapters merged in). Works with DDP and DeepSpeed (ZeRO-2 and -3 tested)")
    a("--lora_alpha", type=float, help="LoRA scale numerator: the update is alpha/rank * B @ A (default: 2 x rank)")
    a("--lora_dropout", type=float, default=0.0, help="dropout on the LoRA input")
    a("--lora_targets", default=",".join(LORA_LAYERS),
      help="which linear layers of every LLM block get adapters: attention wq,wk,wv,wo and FFN w1,w2,w3")

    a = p.add_argument_group("output").add_argument
    a("--out_dir", default="out", help="where weights, resume files and logs go")
    a("--save_weight", help="weights go to out_dir/{save_weight}_{dim}[_moe].pth")
    a("--save_interval", type=int, default=500, help="optimizer steps between checkpoints")
    a("--log_interval", type=int, default=50, help="optimizer steps between log lines")
    switch(a, "--use_wandb", 0, help="log to Weights & Biases (WANDB_MODE=offline works)")
    a("--wandb_project", default="MiniMind-V", help="the Weights & Biases project")
    switch(a, "--debug", 0, help="on an error, show the full traceback instead of one line "
                                 "(MINIMIND_DEBUG=1 does the same)")

    a = p.add_argument_group("distributed", "one process, torchrun (DDP) or the deepspeed launcher").add_argument
    a("--deepspeed", metavar="CONFIG", help="train through DeepSpeed with this JSON config, e.g. "
      "ds_config/zero2.json; its \"auto\" values come from our flags (default: none, plain PyTorch)")
    a("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK works too)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training flags, as build_parser defines them (help, defaults), read-only. On/off flags
    are the ints 0 and 1, as the command line gives them."""
    data_path: str | None
    images_path: str | None
    allow_outside_images: int
    out_dir: str
    epochs: int
    batch_size: int  # per process and micro-step
    learning_rate: float
    warmup_ratio: float
    device: str  # as given ("auto" too); train() resolves it, and Cluster.device is the one this process uses
    dtype: str  # as given ("auto" too); train() replaces it with the dtype it resolves to
    num_workers: int
    accumulation_steps: int
    grad_clip: float
    log_interval: int
    save_interval: int
    dim: int
    n_layers: int
    max_seq_len: int | None
    use_moe: int
    use_wandb: int
    wandb_project: str
    seed: int
    vision_model_path: str | None  # None: --from_weight's record's, else DEFAULT_VISION_MODEL (see train())
    tokenizer_path: str | None  # None: --from_weight's record's, else "model" with --from_weight none
    image_token_id: int
    from_weight: str | None
    save_weight: str | None
    from_resume: int
    freeze_llm: int | None
    projector: str
    lora_rank: int
    lora_alpha: float | None
    lora_dropout: float
    lora_targets: str
    frames: int  # per video
    max_video_seconds: float
    skip_bad_samples: int
    group_by_length: int
    pad_to_max_len: int
    cache_features: str  # "0" off, "1" out_dir/feature_cache, else a folder (see open_feature_cache)
    use_compile: int
    gradient_checkpointing: int
    stop_after_steps: int
    deepspeed: str | None
    local_rank: int
    debug: int


def parse(parser, argv=None):
    """The command line (argv, default sys.argv) -> TrainConfig."""
    return TrainConfig(**vars(parser.parse_args(argv)))


def plain_args(cfg):
    """The config as saved in a resume file: plain values only (see distributed.rng_state)."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}
