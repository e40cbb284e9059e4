"""Building a run from its config: the model and its frozen vision tower, the data (dataset, the
feature cache, the length check, the loader), the engine, the checkpointer and the log, and the
state the run starts from; all of it in one Run, which the loop works with."""
import dataclasses
import functools
import os
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader

from cli import preparing_progress
from dataset.feature_cache import encode_with_cache, open_cache_for
from dataset.vlm_dataset import VLMDataset, collate_batch
from dataset.samples import open_source
from dataset.sampler import ResumableBatchSampler
from model.chat import resolve_image_token_id
from model.checkpoint import check_vocab, infer_config_from_state_dict, load_weights, read_checkpoint, weight_path
from model.images import load_processor
from model.lora import LoraSettings, add_lora, has_lora
from model.model_minimind import count_llm_params
from model.model_vlm import MiniMindVLM, VLMConfig, tower_features, tower_token_count
from model.paths import RunFiles, load_tokenizer
from model.record import make_record
from trainer.checkpoints import Checkpointer
from trainer.config import TrainConfig
from trainer.distributed import Cluster, seed_all
from trainer.engines import DeepSpeedEngine, TorchEngine
from trainer.logs import Logger
from trainer.schedule import total_steps


def start_path(cfg):
    """The --from_weight file to start from (which must exist), or None for random weights."""
    return start_weights(cfg) if cfg.from_weight and cfg.from_weight != "none" else None


def start_weights(cfg):
    """The --from_weight file to start from, which must exist."""
    path = weight_path(cfg.out_dir, cfg.from_weight, cfg.dim, cfg.use_moe)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--from_weight {cfg.from_weight}: {path} not found. "
                                + ("Run train_pretrain_vlm.py first, " if "pretrain" in cfg.from_weight else
                                   "Download the MiniMind2 LLM weights (lm_512.pth / lm_768.pth) into out/, ")
                                + "or pass --from_weight none to start from random weights.")
    return path


def set_trainable(model, freeze_llm):
    """--freeze_llm (see config.FREEZE_HELP); with LoRA adapters, they train and the layers they wrap do not."""
    lora = has_lora(model)
    model.requires_grad_(freeze_llm == 0 and not lora)
    if freeze_llm in (1, 3):
        model.layers[-1].requires_grad_(True)
    if freeze_llm == 3:
        model.layers[0].requires_grad_(True)
    for name, p in model.named_parameters():
        if lora and ".lora_" in name:
            p.requires_grad_(True)
    model.vision_proj.requires_grad_(True)
    if model.vision_encoder is not None:
        model.vision_encoder.requires_grad_(False)


def build_model(cfg, tokenizer, device):
    """The VLM to train, on `device`, and its frozen vision tower, taken out of it: the trainer runs
    the tower itself (ImageEncoder), so no engine wraps, partitions or re-casts it. A --from_weight
    checkpoint decides the generation (2025 or 2026 architecture) and, if it has one, the projector;
    --dim/--n_layers/--use_moe must match it (a mismatch is an error listing the keys)."""
    start = start_path(cfg)
    sd = read_checkpoint(start) if start else None
    found = infer_config_from_state_dict(sd, start) if start else {"vocab_size": len(tokenizer)}
    if start:
        check_vocab(tokenizer, cfg.tokenizer_path, found["vocab_size"], start)
        if cfg.generation and cfg.generation != found["generation"]:
            raise ValueError(f"--generation {cfg.generation}: {start} is a {found['generation']} model; drop "
                             f"--generation (a checkpoint brings its own) or pass --from_weight none")
    elif cfg.generation:  # else MiniMindConfig's default
        found["generation"] = cfg.generation
    found.update(dim=cfg.dim, n_layers=cfg.n_layers, use_moe=bool(cfg.use_moe))
    # A head layout asked for wins; against a checkpoint of another one, load_weights names the shapes.
    asked = {k: getattr(cfg, k) for k in ("n_heads", "n_kv_heads", "head_dim")}
    found.update({k: v for k, v in asked.items() if v is not None})
    if cfg.n_heads is not None and cfg.head_dim is None:  # a head count asked for alone: --dim / it wide
        found.pop("head_dim", None)
    found.setdefault("projector", cfg.projector)
    config = VLMConfig(**found, gradient_checkpointing=bool(cfg.gradient_checkpointing),
                       vision_model_path=cfg.vision_model_path,
                       image_token_id=resolve_image_token_id(tokenizer, cfg.image_token_id))
    model = MiniMindVLM(config)
    if start:
        load_weights(model, sd, start)
    if cfg.lora_rank:
        add_lora(model, LoraSettings.from_flags(cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_targets))
    set_trainable(model, cfg.freeze_llm)
    model.to(device)
    # The frozen tower's weights go to the training dtype once: under autocast alone every
    # forward would re-cast its fp32 weights.
    model.vision_encoder.to(getattr(torch, cfg.dtype))
    if cfg.use_compile:
        model.compile_for_training()  # the blocks, the head with its loss, the tower
    tower, model.vision_encoder = model.vision_encoder, None
    return model, tower


class ImageEncoder:
    """The frozen vision tower, run by the trainer: the model gets its features through
    forward(image_features=...). Kept out of the module an engine trains, ZeRO-3 does not
    partition it (and gather it on every forward), nor bf16 round it beyond the compute dtype."""

    def __init__(self, tower, autocast, cache=None):
        self.tower, self.autocast, self.cache = tower, autocast, cache

    def encode_images(self, pixel_values):
        """[N, 3, H, W] -> [N, image_token_count, C] (what encode_with_cache calls)."""
        return tower_features(self.tower, pixel_values)

    def __call__(self, batch, device):
        """A micro-batch's image features [N, image_token_count, C] in placeholder order, or None."""
        pixels = batch["pixel_values"].to(device, non_blocking=True)  # [M, 3, H, W]: the M <= N uncached images
        with self.autocast:  # the tower in the training dtype, as the model's forward would run it
            if self.cache is not None:
                return encode_with_cache(self, self.cache, pixels, batch["image_keys"], batch["cached"])
            return self.encode_images(pixels) if len(pixels) else None


def open_feature_cache(cfg, tower, processor, is_main):
    """--cache_features: the disk cache of this tower's features, or None (0 or 1, or a folder; "auto"
    and no value are what earlier versions wrote for 1 and 0)."""
    if cfg.cache_features in (None, "0"):
        if is_main and cfg.epochs > 1:
            kb = tower_token_count(tower) * tower.config.hidden_size * 2 / 1024  # fp16 features
            print(f"tip: --cache_features 1 would run the vision tower once per image and reuse its features in "
                  f"epochs 2-{cfg.epochs} (about {kb:.0f} KB of disk per image)", flush=True)
        return None
    cache_dir = (os.path.join(cfg.out_dir, "feature_cache") if cfg.cache_features in ("1", "auto")
                 else cfg.cache_features)
    cache = open_cache_for(tower, processor, cache_dir)
    if is_main:
        print(f"feature cache {cache.dir}: {len(cache)} images cached"
              + (f"; note: {cache.lost_note()}" if cache.lost else ""))
    return cache


def open_dataset(cfg, tokenizer, processor, config, cache, is_main):
    dataset = VLMDataset(cfg.data_path, cfg.images_path, tokenizer, processor, config.image_token_id,
                         config.image_token_count, cfg.max_seq_len, bool(cfg.skip_bad_samples), cache,
                         source=open_source(cfg.data_path, cfg.images_path, bool(cfg.allow_outside_images),
                                            progress=preparing_progress),
                         frames=cfg.frames, max_video_seconds=cfg.max_video_seconds)
    if is_main:
        source = dataset.source
        print(f"{cfg.data_path}: {len(source)} samples" + (f", {source.n_text_only} of them text-only"
                                                             if source.n_text_only else "")
              + (f"; skipped {source.n_bad} bad ones, e.g. {source.bad[0]}" if source.n_bad else ""), flush=True)
    check_lengths(dataset, is_main)
    return dataset


SKIP_WARNING = 0.02  # the share of samples too long for --max_seq_len that is worth a warning up front


def check_lengths(dataset, is_main):
    """Before the first step, not after an epoch: data of which training would skip every sample
    (too long for --max_seq_len, or bad: no answer, JSON that does not parse) is an error, and more than SKIP_WARNING of it
    skipped for its length a warning, with the --max_seq_len that would keep it."""
    check, limit = dataset.check_lengths(), dataset.max_seq_len
    spread = "" if check.checked == check.of else f" checked (spread over the {check.of})"
    if not check.lengths:
        raise ValueError(f"{dataset.path}: no usable samples: all {check.checked}{spread} are bad, "
                         f"e.g. {check.bad[0]}")
    longest, median = max(check.lengths), int(np.median(check.lengths))
    keep = (f"{longest} keeps them whole" if median == longest else
            f"{longest} keeps them all whole, {median} half of them")
    if len(check.too_long) == len(check.lengths):
        raise ValueError(f"{dataset.path}: no sample fits --max_seq_len {limit}: all {len(check.lengths)}{spread} "
                         f"would be cut inside an image or before their answer, so training would skip every one, "
                         f"e.g. {check.too_long[0]}. Raise --max_seq_len: {keep}")
    share = len(check.too_long) / len(check.lengths)
    if is_main and share > SKIP_WARNING:
        print(f"warning: {share:.0%} of the samples ({len(check.too_long)} of {len(check.lengths)}{spread}) do not "
              f"fit --max_seq_len {limit} and will be skipped, e.g. {check.too_long[0]}; --max_seq_len {keep}",
              flush=True)


def ignore_sigint(_worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_loader(cfg, dataset, pad_id, cluster):
    """-> (sampler, loader). Our sampler plays DistributedSampler's role (each rank its own slice of
    every global batch, set_epoch reshuffles) but is kept instead of it: the order is one global
    permutation per (seed, epoch) cut into global batches of batch_size * world, so a resume skips
    `samples_seen` *global* samples and continues at the right sample even with a different number
    of processes."""
    sampler = ResumableBatchSampler(dataset.lengths, cfg.batch_size, cfg.seed, shuffle=True,
                                    group_by_length=bool(cfg.group_by_length), rank=cluster.rank,
                                    world_size=cluster.world, accumulation_steps=cfg.accumulation_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers,
                        collate_fn=functools.partial(collate_batch, pad_id=pad_id,
                                                     pad_to=cfg.max_seq_len if cfg.pad_to_max_len else 0,
                                                     image_token_count=dataset.encoder.image_token_count),
                        worker_init_fn=ignore_sigint,  # Ctrl-C is handled once, by the main process
                        pin_memory=cluster.device.startswith("cuda"), persistent_workers=cfg.num_workers > 0)
    return sampler, loader


@dataclasses.dataclass
class Run:
    """What the loop works with, built by build_run()."""
    cfg: TrainConfig
    cluster: Cluster
    model: torch.nn.Module  # the LLM and projection the engine trains; the tower is the encoder's
    engine: TorchEngine | DeepSpeedEngine
    encoder: ImageEncoder
    sampler: ResumableBatchSampler
    loader: DataLoader
    checkpointer: Checkpointer
    logger: Logger
    state: dict  # epoch, samples_seen (all ranks', into the epoch), step, wandb_id: what a resume restores
    n_samples: int  # per epoch
    total_steps: int

    @property
    def total_samples(self):
        return self.cfg.epochs * self.n_samples

    def samples_done(self, epoch):
        """Samples consumed since training began (all ranks'), `epoch` being the current one."""
        return epoch * self.n_samples + self.state["samples_seen"]


def build_run(cfg, cluster):
    """Model, data, engine, checkpoints and log, and the state the run starts from."""
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP/DeepSpeed broadcast rank 0's anyway)
    tokenizer = load_tokenizer(cfg.tokenizer_path)
    model, tower = build_model(cfg, tokenizer, cluster.device)
    # Per-rank random streams from here on (dropout, DataLoader workers); the data order is not
    # random state but a function of (seed, epoch), see ResumableBatchSampler.
    seed_all(cfg.seed + cluster.rank)
    processor = load_processor(cfg.vision_model_path)  # the PIL form, as eval and serving: the same pixels
    cache = open_feature_cache(cfg, tower, processor, cluster.is_main)
    dataset = open_dataset(cfg, tokenizer, processor, model.config, cache, cluster.is_main)
    sampler, loader = build_loader(cfg, dataset, tokenizer.pad_token_id or 0, cluster)

    files = RunFiles.of(cfg.out_dir, cfg.save_weight, cfg.dim, cfg.use_moe)
    name = os.path.basename(files.stem)  # {save_weight}_{dim}[_moe]
    params = [p for p in model.parameters() if p.requires_grad]
    n_llm, n_train = count_llm_params(model), sum(p.numel() for p in params)  # before ZeRO partitions them
    optimization = dict(learning_rate=cfg.learning_rate, dtype=cfg.dtype, grad_clip=cfg.grad_clip)
    engine = (DeepSpeedEngine(model, params, files.ds_resume, config_path=cfg.deepspeed, batch_size=cfg.batch_size,
                              accumulation_steps=cfg.accumulation_steps, **optimization) if cfg.deepspeed else
              TorchEngine(model, params, cluster.device, files.resume, **optimization))
    record = make_record(model.config, cfg.tokenizer_path, cfg.vision_model_path, start_path(cfg), cfg.data_path)
    checkpointer = Checkpointer(engine, files, cfg, cluster, record)
    if cluster.is_main:
        os.makedirs(cfg.out_dir, exist_ok=True)
        checkpointer.remove_partial_writes()
    state = checkpointer.resume() if cfg.from_resume else {"epoch": 0, "samples_seen": 0, "step": 0, "wandb_id": None}
    logger = Logger(cfg, files.log, state["wandb_id"], cluster.is_main,
                    state["step"] if cfg.from_resume else None)
    if logger.wandb is not None:
        state["wandb_id"] = logger.wandb.id  # saved with every resume checkpoint
    if cluster.is_main:
        print(f"{name}: LLM {n_llm / 1e6:.2f}M params, trainable {n_train / 1e6:.2f}M, {len(dataset)} samples, "
              f"world {cluster.world}, device {cluster.device}, {cfg.dtype}"
              + (f", {cfg.deepspeed}" if cfg.deepspeed else "")
              + (f", LoRA rank {cfg.lora_rank} on {cfg.lora_targets}" if cfg.lora_rank else ""))
    encoder = ImageEncoder(tower.to(engine.compute_dtype), engine.autocast, cache)
    return Run(cfg, cluster, engine.model, engine, encoder, sampler, loader, checkpointer, logger, state,
               n_samples=len(dataset),
               total_steps=total_steps(len(dataset), sampler.global_batch, cfg.accumulation_steps, cfg.epochs))
