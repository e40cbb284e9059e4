"""Training loop shared by train_pretrain_vlm.py and train_sft_vlm.py.

The two stages differ only in data, defaults and what is trainable, so both scripts call
`build_parser(...)` with their defaults and then `main(parser)`. One process, torchrun (DDP), the
deepspeed launcher (--deepspeed, see train_engines.py) and CPU or CUDA all go through the same loop;
checkpoints and resume files are written atomically, and SIGINT/SIGTERM or an error in the loop
save a resume checkpoint. Errors with a message for the user end the run with one line
`error: ...` (--debug or MINIMIND_DEBUG=1 for the traceback).
"""
import argparse
import functools
import glob
import json
import math
import os
import random
import signal
import socket
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cli import switch
from dataset.feature_cache import encode_with_cache, open_cache_for
from dataset.lm_dataset import VLMDataset, collate_batch
from model.chat import resolve_image_token_id
from dataset.samples import open_source
from dataset.sampler import ResumableBatchSampler
from model.model_minimind import count_llm_params
from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import CheckpointError, DiskFullError, atomic_save, load_weights, weight_name, weight_path
from train_engines import DeepSpeedEngine, TorchEngine

FREEZE_HELP = "0: projection + whole LLM; 1: projection + last LLM layer; 2: projection only"


def build_parser(description, **defaults):
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--data_path", help="training data: a .jsonl file (with --images_path), or parquet in the released "
                          "schema: a .parquet file, a folder of them or a glob (images inside)")
    a("--images_path", help="jsonl only: the folder its image names are relative to")
    switch(a, "--allow_outside_images", 0,
           help="let jsonl image names leave --images_path ('../x.png', absolute paths); off, such a name is a bad sample")
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
    switch(a, "--use_moe", 0, help="mixture-of-experts FFN")
    switch(a, "--use_wandb", 0, help="log to Weights & Biases (WANDB_MODE=offline works)")
    a("--wandb_project", default="MiniMind-V")
    a("--seed", type=int, default=42, help="model init and data order")
    a("--vision_model_path", default="model/vision_model/clip-vit-base-patch16")
    a("--tokenizer_path", default="model")
    a("--image_token_id", type=int, default=-1,
      help="placeholder id; -1 = <|image_pad|>, or '@' (34) with the released tokenizer")
    a("--from_weight", help="start from out_dir/{from_weight}_{dim}.pth, a .pth path, or 'none' (random)")
    a("--save_weight", help="weights go to out_dir/{save_weight}_{dim}[_moe].pth")
    switch(a, "--from_resume", 0, help="continue from the resume file")
    a("--freeze_llm", type=int, choices=[0, 1, 2], help=FREEZE_HELP)
    switch(a, "--skip_bad_samples", 0,
           help="skip (and count) malformed samples instead of stopping with an error")
    switch(a, "--group_by_length", 1, help="batch samples of similar length")
    switch(a, "--pad_to_max_len", 0,
           help="pad every batch to --max_seq_len instead of its longest sample: fixed shapes, more work "
           "(what the original implementation did; scripts/bench.py times it as the baseline)")
    a("--cache_features", nargs="?", const="auto", default=None, metavar="DIR",
      help="encode each image once and reuse its frozen features from a disk cache "
           "(DIR defaults to out_dir/feature_cache); ~300 KB per image at ViT-B/16 width")
    switch(a, "--use_compile", 0,
           help="torch.compile the transformer blocks, the output head with its loss, and the vision tower")
    switch(a, "--gradient_checkpointing", 0,
           help="recompute activations in backward: less memory (e.g. dim 768 on a small GPU), ~30%% slower")
    a("--stop_after_steps", type=int, default=0,
      help="stop after this many optimizer steps with a resume file (0 = run to the end); the LR "
           "schedule is unchanged, so a run can be split into time slots")
    a("--deepspeed", metavar="CONFIG", help="train through DeepSpeed with this JSON config, e.g. "
      "ds_config/zero2.json; its \"auto\" values come from our flags")
    a("--local_rank", "--local-rank", type=int, default=-1, help="set by the deepspeed launcher (LOCAL_RANK works too)")
    switch(a, "--debug", 0, help="on an error, show the full traceback instead of one line "
                                           "(MINIMIND_DEBUG=1 does the same)")
    p.set_defaults(**defaults)
    return p


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(args):
    """torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (the latter also passes --local_rank). Without them this is one process, with no process group,
    except under --deepspeed, which needs one: then it is a group of one on a free local port."""
    if args.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    if args.deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world == 1 and not args.deepspeed:
        return 0, 1
    if args.device.startswith("cuda"):
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size()


def open_data(data_path, images_path, allow_outside_images):
    """The sample reader, printing progress while a parquet file is made randomly accessible (once)."""
    def progress(path, done, total):
        print(f"\rpreparing {path} for random access (once): {done}/{total} rows", end="\n" if done == total else "",
              flush=True)
    return open_source(data_path, images_path, allow_outside_images, progress=progress)


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
    """This process's RNG streams as tensors and plain lists, so that a resume file loads with
    torch.load(weights_only=True), which refuses numpy arrays and other pickled objects."""
    version, internal, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": [version, list(internal), gauss_next],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached_gaussian)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states(world):
    """Every rank's RNG state, in rank order (collective when world > 1)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(states, rank, world, seed):
    """Restore this rank's RNG streams; after a world-size change, fresh per-rank streams instead."""
    if len(states) != world:
        torch.manual_seed(seed + rank)
        random.seed(seed + rank)
        np.random.seed(seed + rank)
        return
    state = states[rank]
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plain_args(args):
    """The flags as saved in a resume file: plain values only (see rng_state)."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v) for k, v in vars(args).items()}


def optimizer_steps(loader, n_batches, accumulation_steps):
    """The epoch's micro-batches, grouped per optimizer step. The last group of an epoch may be
    shorter: it still closes a step, so no gradient leaks into the next epoch."""
    group = []
    for i, batch in enumerate(loader):
        group.append(batch)
        if len(group) == accumulation_steps or i == n_batches - 1:
            yield group
            group = []


def supervised_tokens(batch):
    return int((batch["labels"][:, 1:] != -100).sum())  # the model's targets: labels shifted by one


def token_weighted(out, n_tokens, step_tokens, world, accumulation_steps):
    """The loss to backpropagate for one micro-batch: its share of the mean over *all* supervised
    tokens of the optimizer step (all micro-batches, all ranks). The model's loss is a mean over the
    micro-batch's own tokens, and DDP/DeepSpeed average gradients over ranks, so plain per-rank
    means would weigh a token on a rank (or micro-batch) with few tokens more than one on a full
    one. Scaling by n_tokens * world / step_tokens makes the summed, rank-averaged gradient that of
    the global token mean: the same as one process with the whole batch, up to float rounding.
    The MoE balance loss is a per-micro-batch mean and is simply averaged."""
    aux = out.get("aux_loss")
    ce = out.loss - aux if aux is not None else out.loss
    loss = ce * (n_tokens * world / max(step_tokens, 1))
    return loss + aux / accumulation_steps if aux is not None else loss


def write_checkpoint(write, periodic):
    """Run one checkpoint write; True if it was written. A full disk at a periodic save is only a
    warning: the files of the last save are intact, training goes on and the next save tries again.
    At the final save, or one before stopping, it ends the run, pointing at the last resume file."""
    try:
        write()
        return True
    except DiskFullError as e:
        if not periodic:
            raise DiskFullError(f"{e}; then continue from the last complete checkpoint with "
                                f"--from_resume 1") from None
        print(f"warning: {e}; training goes on, and the next save tries again", flush=True)
        return False


def complete_log_lines(path):
    """The log's lines, without a torn last one (a run killed while appending it), which would stop
    every later resume: it is dropped, with a note."""
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except json.JSONDecodeError:
            print(f"note: {path}: dropped its last line, {lines.pop().strip()[:60]!r}, which a killed run wrote "
                  f"only in part")
    return lines


class Logger:
    """Console line + JSONL record every log_interval steps, and wandb when asked (rank 0 only).
    wandb gets the full config, and its run id lives in the resume file so a resumed run continues
    the same wandb run."""

    def __init__(self, args, path, wandb_id, enabled, resumed_step=None):
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resumed_step is None:
            open(path, "w").close()  # a fresh run overwrites the weights, so its log starts over too
        elif os.path.isfile(path):
            # Steps logged after the checkpoint we resume from (before a kill) are redone: drop
            # those trailing lines so every step appears once.
            lines = complete_log_lines(path)
            while lines and json.loads(lines[-1])["step"] > resumed_step:
                lines.pop()
            with open(path, "w") as f:
                f.writelines(lines)
        if args.use_wandb:
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

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def train(args):
    rank, world = setup_distributed(args)
    is_main = rank == 0
    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP/DeepSpeed broadcast rank 0's anyway)

    from transformers import AutoImageProcessor, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
    config = VLMConfig(dim=args.dim, n_layers=args.n_layers, use_moe=bool(args.use_moe), vocab_size=len(tokenizer),
                       gradient_checkpointing=bool(args.gradient_checkpointing),
                       vision_model_path=args.vision_model_path,
                       image_token_id=resolve_image_token_id(tokenizer, args.image_token_id))
    model = MiniMindVLM(config)
    if args.from_weight and args.from_weight != "none":
        path = weight_path(args.out_dir, args.from_weight, args.dim, args.use_moe)
        if not os.path.isfile(path):
            sys.exit(f"error: --from_weight {args.from_weight}: {path} not found. "
                     + ("Run train_pretrain_vlm.py first, " if "pretrain" in args.from_weight else
                        "Download the MiniMind2 LLM weights (lm_512.pth / lm_768.pth) into out/, ")
                     + "or pass --from_weight none to start from random weights.")
        load_weights(model, path)
    set_trainable(model, args.freeze_llm)
    model.to(args.device)
    if model.vision_encoder is not None:
        # The frozen tower's weights go to the training dtype once: under autocast alone every
        # forward would re-cast its 86M fp32 weights (ViT-B/16, bf16, CPU: 20 -> 24 images/s).
        model.vision_encoder.to(getattr(torch, args.dtype))

    if args.use_compile:
        model.compile_for_training()  # the blocks, the head with its loss, the tower
    # Per-rank random streams from here on (dropout, DataLoader workers); the data order is not
    # random state but a function of (seed, epoch), see ResumableBatchSampler.
    torch.manual_seed(args.seed + rank)
    random.seed(args.seed + rank)
    np.random.seed(args.seed + rank)

    processor = AutoImageProcessor.from_pretrained(args.vision_model_path)
    cache = None
    if args.cache_features:
        cache_dir = os.path.join(args.out_dir, "feature_cache") if args.cache_features == "auto" else args.cache_features
        cache = open_cache_for(model.vision_encoder, processor, cache_dir)
        if is_main:
            print(f"feature cache {cache.dir}: {len(cache)} images cached")
    dataset = VLMDataset(args.data_path, args.images_path, tokenizer, processor, config.image_token_id,
                         config.image_token_count, args.max_seq_len, bool(args.skip_bad_samples), cache,
                         source=open_data(args.data_path, args.images_path, bool(args.allow_outside_images)))
    if is_main:
        source = dataset.source
        print(f"{args.data_path}: {len(source)} samples" + (f", {source.n_text_only} of them text-only"
                                                              if source.n_text_only else "")
              + (f"; skipped {source.n_bad} bad ones, e.g. {source.bad[0]}" if source.n_bad else ""), flush=True)
    # Our sampler plays DistributedSampler's role (each rank its own slice of every global batch,
    # set_epoch reshuffles) but is kept instead of it: the order is one global permutation per
    # (seed, epoch) cut into global batches of batch_size * world, so a resume skips `samples_seen`
    # *global* samples and continues at the right sample even with a different number of processes.
    sampler = ResumableBatchSampler(dataset.lengths, args.batch_size, args.seed, shuffle=True,
                                    group_by_length=bool(args.group_by_length), rank=rank, world_size=world,
                                    accumulation_steps=args.accumulation_steps)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=args.num_workers,
                        collate_fn=functools.partial(collate_batch, pad_id=tokenizer.pad_token_id or 0,
                                                     pad_to=args.max_seq_len if args.pad_to_max_len else 0),
                        worker_init_fn=ignore_sigint,  # Ctrl-C is handled once, by the main process
                        pin_memory=device_type == "cuda", persistent_workers=args.num_workers > 0)

    name = weight_name(args.save_weight, args.dim, args.use_moe)
    save_path, resume_path = os.path.join(args.out_dir, name + ".pth"), os.path.join(args.out_dir, f"{name}_resume.pth")
    params = [p for p in model.parameters() if p.requires_grad]
    n_llm, n_train = count_llm_params(model), sum(p.numel() for p in params)  # before ZeRO partitions them
    if args.deepspeed:
        engine = DeepSpeedEngine(model, params, args, os.path.join(args.out_dir, f"{name}_ds_resume"))
        model = engine.model
    else:
        engine = TorchEngine(model, params, args, device_type, resume_path)
    if is_main:
        os.makedirs(args.out_dir, exist_ok=True)
        for tmp in glob.glob(f"{save_path}.tmp*") + glob.glob(f"{resume_path}.tmp*"):
            os.remove(tmp)  # a write that was killed half-way; the file it was replacing is intact
            print(f"removed {tmp}, an incomplete checkpoint write")

    state = {"epoch": 0, "samples_seen": 0, "step": 0, "wandb_id": None}
    if args.from_resume:
        if not engine.resume_exists():
            sys.exit(f"error: --from_resume 1 but {engine.resume_path} does not exist (drop the flag to start fresh)")
        ckpt = engine.load_resume()
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank that saved it
        set_rng_state(rngs, rank, world, args.seed + ckpt["state"]["step"])
        state = ckpt["state"]
        if is_main:
            print(f"resumed from {engine.resume_path}: epoch {state['epoch'] + 1}, step {state['step']}, "
                  f"{state['samples_seen']} samples into the epoch"
                  + (f" (saved by {len(rngs)} processes, now {world})" if rngs and len(rngs) != world else ""))
    logger = Logger(args, os.path.join(args.out_dir, f"{name}_log.jsonl"), state["wandb_id"], is_main,
                    state["step"] if args.from_resume else None)
    if logger.wandb is not None:
        state["wandb_id"] = logger.wandb.id  # saved with every resume checkpoint
    if is_main:
        print(f"{name}: LLM {n_llm / 1e6:.2f}M params, trainable {n_train / 1e6:.2f}M, {len(dataset)} samples, "
              f"world {world}, device {args.device}, {args.dtype}" + (f", {args.deepspeed}" if args.deepspeed else ""))

    def save(kind="periodic", completed=None):
        """Weights + resume file. kind: "periodic" (a full disk only warns), "stop" or "final".
        `completed`: the snapshot() of the last completed step, which rank 0 saves after an error
        without the collectives below (the other ranks may be stuck in one)."""
        weights = engine.weights()  # collective under DeepSpeed (gathers ZeRO partitions)
        resume = {"rng": all_rng_states(world) if completed is None else completed["rng"],  # collective under DDP
                  "state": dict(completed["state"] if completed else state), "args": plain_args(args)}
        periodic, saved = kind == "periodic", []
        if is_main:
            bad = [k for k, v in weights.items() if not torch.isfinite(v).all()]
            if bad:  # cannot happen while non-finite steps are skipped; never overwrite good weights with it
                sys.exit(f"error: non-finite values in {bad[:3]}: not saving {save_path}")
            if write_checkpoint(lambda: atomic_save(weights, save_path), periodic):
                saved.append(save_path)
        if write_checkpoint(lambda: engine.save_resume(resume, is_main), periodic) and kind != "final":
            saved.append(engine.resume_path)
        if is_main and saved:
            print(f"saved {' and '.join(saved)}", flush=True)

    def save_after_error(error):
        """An error in the loop (an unreadable image, a lost peer...) would lose every step since
        the last save: first save the last completed one, as a stop does. Rank 0 alone, from what
        it holds; not under DeepSpeed with several processes, whose checkpoint needs all of them."""
        if not is_main:
            return
        note = ""
        if last["state"]["step"] == start_step:
            pass  # no step completed in this run: nothing new to save
        elif args.deepspeed and world > 1:
            note = "no resume checkpoint saved (under DeepSpeed every process takes part in it); "
        elif not isinstance(error, DiskFullError):  # a full disk would fail again
            try:
                save("stop", last)
                note = f"saved step {last['state']['step']}, the last one completed before the error below; "
            except Exception as e:
                note = f"could not save a resume checkpoint ({error_message(e)}); "
        if engine.resume_exists():
            note += "once the error is fixed, continue with --from_resume 1"
        if note:
            print(note, file=sys.stderr, flush=True)

    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):  # finish the step, then save a resume checkpoint
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))

    n = len(dataset)
    total_samples = args.epochs * n
    total_steps = math.ceil(math.ceil(n / sampler.global_batch) / args.accumulation_steps) * args.epochs
    t0, steps_this_run, samples_at_t0 = time.time(), 0, state["epoch"] * n + state["samples_seen"]
    window = {"loss": 0.0, "count": 0, "samples": 0, "tokens": 0, "t": time.time()}
    bad_steps, skipped = 0, []

    def snapshot():
        """The state after a completed optimizer step: what an error in the loop saves (see
        save_after_error). Only rank 0's RNG can be saved then; with several processes, the
        resume reseeds them all."""
        return {"state": dict(state), "rng": [rng_state()] if world == 1 else []}

    start_step, last = state["step"], snapshot()
    model.train()
    try:
        for epoch in range(state["epoch"], args.epochs):
            sampler.set_epoch(epoch, state["samples_seen"])
            for micro_batches in optimizer_steps(loader, len(sampler), args.accumulation_steps):
                # Every supervised token of the step, on every rank, weighs the same (see token_weighted).
                step_tokens = torch.tensor(sum(supervised_tokens(b) for b in micro_batches), device=args.device)
                if world > 1:
                    dist.all_reduce(step_tokens)
                step = {"loss": 0.0, "samples": 0, "tokens": 0}  # this rank's share of the step
                for j, batch in enumerate(micro_batches):
                    skipped += batch["skipped"]
                    pixels = batch["pixel_values"].to(args.device, non_blocking=True)
                    with engine.micro_step(last_micro=j == len(micro_batches) - 1):
                        if cache is not None:
                            with engine.autocast:  # the tower in the training dtype, as inside the model's forward
                                images = {"image_features": encode_with_cache(model, cache, pixels, batch["image_keys"],
                                                                              batch["cached"])}
                        else:
                            images = {"pixel_values": pixels}
                        out = engine.forward(input_ids=batch["input_ids"].to(args.device),
                                             labels=batch["labels"].to(args.device), **images)
                        loss = token_weighted(out, supervised_tokens(batch), step_tokens.item(), world,
                                              args.accumulation_steps)
                        engine.backward(loss)
                    step["loss"] += loss.item() / world
                    step["samples"] += batch["n_samples"]
                    step["tokens"] += int(batch["attention_mask"].sum())
                    state["samples_seen"] = min(state["samples_seen"] + sampler.global_batch, n)
                # One all-reduce: the logged loss is the step's global token mean, throughput counts
                # every rank, and a signal on any rank stops all of them at this same step.
                totals = torch.tensor([step["loss"], step["samples"], step["tokens"], stop["signal"]],
                                      dtype=torch.float64, device=args.device)
                if world > 1:
                    dist.all_reduce(totals)
                step_loss, stopping = totals[0].item(), totals[3].item() > 0
                window["samples"] += totals[1].item()
                window["tokens"] += totals[2].item()
                progress = (epoch * n + state["samples_seen"]) / total_samples
                lr = lr_at(progress, args.learning_rate, args.warmup_ratio)
                applied = engine.step(lr, math.isfinite(step_loss))
                if applied:
                    state["step"] += 1
                    steps_this_run += 1
                last = snapshot()  # this step is complete, applied or skipped
                if not applied:
                    bad_steps += 1  # every rank sees the same loss and gradients, so all skip together
                    if is_main:
                        print(f"warning: non-finite loss/gradient at step {state['step'] + 1}, step skipped",
                              flush=True)
                    if bad_steps >= 3:
                        logger.close()
                        sys.exit(1 if not is_main else
                                 "error: 3 consecutive non-finite steps: stopping without saving NaN weights (the "
                                 "last checkpoint is intact). Lower --learning_rate"
                                 + (", or use --dtype bfloat16 instead of float16." if args.dtype == "float16"
                                    else "."))
                else:
                    bad_steps = 0
                    window["loss"] += step_loss
                    window["count"] += 1
                    if state["step"] % args.log_interval == 0 or state["step"] == total_steps:
                        now = time.time()
                        done = epoch * n + state["samples_seen"]
                        rate = (done - samples_at_t0) / max(now - t0, 1e-9)
                        logger.log({"epoch": epoch + 1, "step": state["step"], "total_steps": total_steps,
                                    "loss": window["loss"] / window["count"], "lr": lr,
                                    "samples_per_s": window["samples"] / (now - window["t"]),
                                    "tokens_per_s": window["tokens"] / (now - window["t"]),
                                    "eta_s": (total_samples - done) / max(rate, 1e-9), "time": now})
                        window = {"loss": 0.0, "count": 0, "samples": 0, "tokens": 0, "t": now}
                    if state["step"] % args.save_interval == 0:
                        save()
                if stopping or (args.stop_after_steps and steps_this_run >= args.stop_after_steps):
                    save("stop")
                    logger.close()
                    if world > 1:
                        dist.barrier()  # nobody exits (and makes torchrun stop the others) before rank 0 has saved
                        dist.destroy_process_group()
                    if is_main:
                        print(("interrupted" if stopping else "stopped early") + "; continue with --from_resume 1",
                              flush=True)
                    if stopping:
                        sys.exit(130)  # like an uncaught Ctrl-C, so `pretrain && sft` does not go on
                    return
            n_skipped = torch.tensor(len(skipped), device=args.device)
            if world > 1:
                dist.all_reduce(n_skipped)
            if is_main and n_skipped:
                print(f"epoch {epoch + 1}: skipped {n_skipped.item()} samples"
                      + (f", e.g. {skipped[0]}" if skipped else ""))
            state["epoch"], state["samples_seen"], skipped = epoch + 1, 0, []
    except Exception as e:
        save_after_error(e)
        raise
    save("final")
    logger.close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


# Errors whose message tells the user what is wrong and what to do (bad data, a missing, wrong or
# unsafe file, a full disk): the run ends with that one line. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError, CheckpointError)


def error_message(e):
    """The exception's message; for one re-raised from a DataLoader worker, the original message
    without the worker's traceback that torch puts in front of it."""
    message = str(e)
    marker = f"\n{type(e).__name__}: "
    if message.startswith("Caught ") and marker in message:
        message = message.rsplit(marker, 1)[1]
    return message.strip()


def main(parser, argv=None):
    """The train scripts' entry: train, and end a run that fails with a USER_ERRORS error with the
    line `error: <message>` (exit code 1). --debug or MINIMIND_DEBUG=1 shows the traceback instead."""
    args = parser.parse_args(argv)
    try:
        train(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("MINIMIND_DEBUG", "0") not in ("", "0"):
            raise
        sys.exit(f"error: {error_message(e)}")
