"""Training loop shared by train_pretrain_vlm.py and train_sft_vlm.py.

The two stages differ only in data, defaults and what is trainable, so both scripts call
`build_parser(...)` with their defaults and then `train(args)`. One process, torchrun (DDP) and
CPU or CUDA all go through the same code; checkpoints and resume files are written atomically.
"""
import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from dataset.feature_cache import encode_with_cache, open_cache_for
from dataset.lm_dataset import VLMDataset, collate_batch, resolve_image_token_id
from dataset.sampler import ResumableBatchSampler
from model.model_minimind import count_llm_params
from model.model_vlm import MiniMindVLM, VLMConfig, atomic_save, llm_state_dict, load_weights

FREEZE_HELP = "0: projection + whole LLM; 1: projection + last LLM layer; 2: projection only"


def build_parser(description, **defaults):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data_path", help="jsonl file of conversations")
    a("--images_path", help="folder the jsonl's image names are relative to")
    a("--out_dir", default="out", help="where weights, resume files and logs go")
    a("--epochs", type=int)
    a("--batch_size", type=int, help="samples per process per micro-step")
    a("--learning_rate", type=float)
    a("--warmup_ratio", type=float, default=0.03, help="fraction of training with linear LR warmup")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="autocast dtype; weights stay fp32. float16 adds a GradScaler")
    a("--num_workers", type=int, default=2, help="DataLoader workers decoding images")
    a("--accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    a("--grad_clip", type=float, default=1.0, help="max gradient norm (0 = no clipping)")
    a("--log_interval", type=int, default=50, help="optimizer steps between log lines")
    a("--save_interval", type=int, default=500, help="optimizer steps between checkpoints")
    a("--dim", type=int, default=512)
    a("--n_layers", type=int, default=8)
    a("--max_seq_len", type=int, help="longer samples are truncated (never inside an image) or skipped")
    a("--use_moe", type=int, default=0, choices=[0, 1])
    a("--use_wandb", action="store_true", help="log to Weights & Biases (WANDB_MODE=offline works)")
    a("--wandb_project", default="MiniMind-V")
    a("--seed", type=int, default=42, help="model init and data order")
    a("--vision_model_path", default="model/vision_model/clip-vit-base-patch16")
    a("--tokenizer_path", default="model")
    a("--image_token_id", type=int, default=-1,
      help="placeholder id; -1 = <|image_pad|>, or '@' (34) with the released tokenizer")
    a("--from_weight", help="start from out_dir/{from_weight}_{dim}.pth, a .pth path, or 'none' (random)")
    a("--save_weight", help="weights go to out_dir/{save_weight}_{dim}[_moe].pth")
    a("--from_resume", type=int, default=0, choices=[0, 1], help="continue from the resume file")
    a("--freeze_llm", type=int, choices=[0, 1, 2], help=FREEZE_HELP)
    a("--skip_bad_samples", type=int, default=0, choices=[0, 1],
      help="skip (and count) malformed samples instead of stopping with an error")
    a("--group_by_length", type=int, default=1, choices=[0, 1], help="batch samples of similar length")
    a("--cache_features", nargs="?", const="auto", default=None, metavar="DIR",
      help="encode each image once and reuse its frozen features from a disk cache "
           "(DIR defaults to out_dir/feature_cache); ~300 KB per image at ViT-B/16 width")
    a("--use_compile", type=int, default=0, choices=[0, 1], help="torch.compile the transformer blocks")
    a("--gradient_checkpointing", type=int, default=0, choices=[0, 1],
      help="recompute activations in backward: less memory (e.g. dim 768 on a small GPU), ~30%% slower")
    a("--stop_after_steps", type=int, default=0,
      help="stop after this many optimizer steps with a resume file (0 = run to the end); the LR "
           "schedule is unchanged, so a run can be split into time slots")
    p.set_defaults(**defaults)
    return p


def weight_path(args, name):
    if name.endswith(".pth") or os.sep in name:
        return name
    return os.path.join(args.out_dir, f"{name}_{args.dim}{'_moe' if args.use_moe else ''}.pth")


def setup_distributed(args):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; without them this is a single process."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1:
        return 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device.startswith("cuda"):
        args.device = f"cuda:{local_rank}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), world


def ignore_sigint(_worker_id):
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def set_trainable(model, freeze_llm):
    model.requires_grad_(freeze_llm == 0)
    if freeze_llm == 1:
        model.layers[-1].requires_grad_(True)
    model.vision_proj.requires_grad_(True)
    if model.vision_encoder is not None:
        model.vision_encoder.requires_grad_(False)


def lr_at(progress, base_lr, warmup):
    """Linear warmup, then cosine from base_lr down to base_lr/10. `progress` is the fraction of
    all training samples consumed, so the schedule does not depend on the number of processes."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1 - warmup, 1e-8)
    return base_lr / 10 + 0.45 * base_lr * (1 + math.cos(math.pi * min(t, 1.0)))


def rng_state():
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Logger:
    """Console line + JSONL record every log_interval steps, and wandb when asked (rank 0 only)."""

    def __init__(self, args, path, wandb_id, enabled):
        self.path, self.enabled, self.wandb = path, enabled, None
        if enabled and args.use_wandb:
            import wandb
            self.wandb = wandb.init(project=args.wandb_project, name=os.path.basename(path)[:-len("_log.jsonl")],
                                    config=vars(args), id=wandb_id, resume="allow")

    def log(self, record):
        if not self.enabled:
            return
        eta = time.strftime("%H:%M:%S", time.gmtime(record["eta_s"]))
        print(f"epoch {record['epoch']} step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} "
              f"lr {record['lr']:.2e} {record['samples_per_s']:.1f} samples/s {record['tokens_per_s']:.0f} tok/s "
              f"eta {eta}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])


def train(args):
    rank, world = setup_distributed(args)
    is_main = rank == 0
    torch.manual_seed(args.seed)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    dtype = getattr(torch, args.dtype)
    autocast = torch.autocast(device_type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    from transformers import AutoImageProcessor, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    config = VLMConfig(dim=args.dim, n_layers=args.n_layers, use_moe=bool(args.use_moe), vocab_size=len(tokenizer),
                       gradient_checkpointing=bool(args.gradient_checkpointing),
                       vision_model_path=args.vision_model_path,
                       image_token_id=resolve_image_token_id(tokenizer, args.image_token_id))
    model = MiniMindVLM(config)
    if args.from_weight and args.from_weight != "none":
        path = weight_path(args, args.from_weight)
        if not os.path.isfile(path):
            sys.exit(f"error: --from_weight {args.from_weight}: {path} not found. "
                     + ("Run train_pretrain_vlm.py first, " if "pretrain" in args.from_weight else
                        "Download the MiniMind2 LLM weights (lm_512.pth / lm_768.pth) into out/, ")
                     + "or pass --from_weight none to start from random weights.")
        load_weights(model, path)
    set_trainable(model, args.freeze_llm)
    model.to(args.device)

    if args.use_compile:
        for layer in model.layers:
            layer.compile(dynamic=True)  # per block: the image-splicing code stays eager

    processor = AutoImageProcessor.from_pretrained(args.vision_model_path)
    cache = None
    if args.cache_features:
        cache_dir = os.path.join(args.out_dir, "feature_cache") if args.cache_features == "auto" else args.cache_features
        cache = open_cache_for(model, processor, cache_dir)
        if is_main:
            print(f"feature cache {cache.dir}: {len(cache)} images cached")
    dataset = VLMDataset(args.data_path, args.images_path, tokenizer, processor, config.image_token_id,
                         config.image_token_count, args.max_seq_len, bool(args.skip_bad_samples), cache)
    if is_main and dataset.bad:
        print(f"skipped {len(dataset.bad)} bad lines of {args.data_path}, e.g. {dataset.bad[0]}")
    sampler = ResumableBatchSampler(dataset.lengths, args.batch_size, args.seed, shuffle=True,
                                    group_by_length=bool(args.group_by_length), rank=rank, world_size=world)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        collate_fn=functools.partial(collate_batch, pad_id=tokenizer.pad_token_id or 0),
                        worker_init_fn=ignore_sigint,  # Ctrl-C is handled once, by the main process
                        pin_memory=device_type == "cuda", persistent_workers=args.num_workers > 0)

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, fused=True)  # one kernel, CPU and CUDA
    scaler = torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    name = f"{args.save_weight}_{args.dim}{'_moe' if args.use_moe else ''}"
    save_path, resume_path = weight_path(args, args.save_weight), os.path.join(args.out_dir, f"{name}_resume.pth")
    state = {"epoch": 0, "samples_seen": 0, "step": 0, "wandb_id": None}
    if args.from_resume:
        if not os.path.isfile(resume_path):
            sys.exit(f"error: --from_resume 1 but {resume_path} does not exist (drop the flag to start fresh)")
        ckpt = torch.load(resume_path, map_location="cpu", weights_only=False)
        load_weights(model, ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"])
        state = ckpt["state"]
        if is_main:
            print(f"resumed from {resume_path}: epoch {state['epoch'] + 1}, step {state['step']}, "
                  f"{state['samples_seen']} samples into the epoch")
    if is_main and not state["wandb_id"] and args.use_wandb:
        import wandb
        state["wandb_id"] = wandb.util.generate_id()
    logger = Logger(args, os.path.join(args.out_dir, f"{name}_log.jsonl"), state["wandb_id"], is_main)
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        n_train = sum(p.numel() for p in params)
        print(f"{name}: LLM {count_llm_params(model) / 1e6:.2f}M params, trainable {n_train / 1e6:.2f}M, "
              f"{len(dataset)} samples, world {world}, device {args.device}, {args.dtype}")

    def save(final=False):
        if is_main:
            atomic_save(llm_state_dict(model), save_path)
            atomic_save({"model": llm_state_dict(model), "optimizer": optimizer.state_dict(),
                         "scaler": scaler.state_dict(), "rng": rng_state(), "state": dict(state),
                         "args": vars(args)}, resume_path)
            print(f"saved {save_path}" + ("" if final else f" and {resume_path}"), flush=True)

    stop = {"signal": None}
    signal.signal(signal.SIGINT, lambda sig, frame: stop.update(signal=sig))  # finish the step, then save

    n = len(dataset)
    total_samples = args.epochs * n
    total_steps = math.ceil(math.ceil(n / sampler.global_batch) / args.accumulation_steps) * args.epochs
    t0, steps_this_run, samples_at_t0 = time.time(), 0, state["epoch"] * n + state["samples_seen"]
    window = {"loss": 0.0, "count": 0, "samples": 0, "tokens": 0, "t": time.time()}
    bad_steps, skipped = 0, []
    model.train()
    for epoch in range(state["epoch"], args.epochs):
        sampler.set_epoch(epoch, state["samples_seen"])
        micro, step_loss, n_batches = 0, 0.0, len(sampler)
        for i, batch in enumerate(loader):
            skipped += batch["skipped"]
            # The epoch's last micro-batch always closes a step, so no gradient leaks into the next epoch.
            last_micro = micro == args.accumulation_steps - 1 or i == n_batches - 1
            sync = contextlib.nullcontext() if (world == 1 or last_micro) else train_model.no_sync()
            pixels = batch["pixel_values"].to(args.device, non_blocking=True)
            with sync, autocast:
                images = ({"image_features": encode_with_cache(model, cache, pixels, batch["image_paths"], batch["cached"])}
                          if cache is not None else {"pixel_values": pixels})
                out = train_model(batch["input_ids"].to(args.device), labels=batch["labels"].to(args.device), **images)
                loss = out.loss / args.accumulation_steps
            with sync:
                scaler.scale(loss).backward()
            step_loss += loss.item()
            window["samples"] += batch["n_samples"] * world
            window["tokens"] += int(batch["attention_mask"].sum()) * world
            state["samples_seen"] = min(state["samples_seen"] + sampler.global_batch, n)
            micro += 1
            if not last_micro:
                continue
            micro = 0
            progress = (epoch * n + state["samples_seen"]) / total_samples
            for g in optimizer.param_groups:
                g["lr"] = lr_at(progress, args.learning_rate, args.warmup_ratio)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float("inf"))
            bad = torch.tensor(float(not (math.isfinite(step_loss) and math.isfinite(norm))))
            if world > 1:
                dist.all_reduce(bad)  # every rank must agree to skip, or they desynchronise
            if bad.item() and dtype != torch.float16:  # fp16 overflow is the GradScaler's job
                bad_steps += 1
                optimizer.zero_grad(set_to_none=True)
                if is_main:
                    print(f"warning: non-finite loss/gradient at step {state['step'] + 1}, step skipped")
                if bad_steps >= 3:
                    raise RuntimeError("3 consecutive non-finite steps: stopping without saving NaN weights. "
                                       "Lower --learning_rate, or use --dtype bfloat16 instead of float16.")
                step_loss = 0.0
                continue
            bad_steps = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            steps_this_run += 1
            window["loss"] += step_loss
            window["count"] += 1
            step_loss = 0.0
            if state["step"] % args.log_interval == 0 or state["step"] == total_steps:
                now = time.time()
                done = epoch * n + state["samples_seen"]
                rate = (done - samples_at_t0) / max(now - t0, 1e-9)
                logger.log({"epoch": epoch + 1, "step": state["step"], "total_steps": total_steps,
                            "loss": window["loss"] / window["count"], "lr": optimizer.param_groups[0]["lr"],
                            "samples_per_s": window["samples"] / (now - window["t"]),
                            "tokens_per_s": window["tokens"] / (now - window["t"]),
                            "eta_s": (total_samples - done) / max(rate, 1e-9), "time": now})
                window = {"loss": 0.0, "count": 0, "samples": 0, "tokens": 0, "t": now}
            if state["step"] % args.save_interval == 0:
                save()
            if stop["signal"] or (args.stop_after_steps and steps_this_run >= args.stop_after_steps):
                save()
                if is_main:
                    print("stopped early; continue with --from_resume 1")
                return
        if is_main and skipped:
            print(f"epoch {epoch + 1}: skipped {len(skipped)} samples, e.g. {skipped[0]}")
        state["epoch"], state["samples_seen"], skipped = epoch + 1, 0, []
    save(final=True)
    if world > 1:
        dist.destroy_process_group()
