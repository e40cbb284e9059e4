"""Training loop shared by train_pretrain_vlm.py and train_sft_vlm.py.

The two stages differ only in data, defaults and what is trainable, so both scripts call
train_config's `build_parser(...)` with their defaults and parse their flags into a TrainConfig
before importing this module (torch: seconds), then `launch(cfg)`, which runs `train(cfg)`:

    cluster = setup_distributed(cfg)    # one process, torchrun (DDP) or the deepspeed launcher
    run = build_run(cfg, cluster)       # model and tower, data, engine, checkpointer, logger, state
    train_epochs(run)                   # train_step, then log_and_save, once per optimizer step
    run.checkpointer.save(state, "final")

CPU or CUDA, plain or DeepSpeed (--deepspeed, see train_engines.py), all go through the same loop.
Checkpoints and resume files are written atomically, and SIGINT/SIGTERM or an error in the loop
save a resume checkpoint. Errors are exceptions; launch() ends a run that fails with one meant for
the user with one line `error: ...` (--debug or MINIMIND_DEBUG=1 for the traceback).
"""
import contextlib
import dataclasses
import functools
import glob
import itertools
import json
import math
import os
import random
import signal
import socket
import sys
import time
from collections import namedtuple

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from cli import preparing_progress
from dataset.feature_cache import encode_with_cache, open_cache_for
from dataset.lm_dataset import VLMDataset, collate_batch
from dataset.samples import open_source
from dataset.sampler import ResumableBatchSampler
from model.chat import resolve_image_token_id
from model.checkpoint import (CheckpointError, DiskFullError, atomic_save, check_vocab, infer_config_from_state_dict,
                              llm_state_dict, load_weights, non_finite_keys, read_checkpoint, weight_path)
from model.images import load_processor
from model.paths import RunFiles, load_tokenizer
from model.lora import LoraSettings, adapter_state_dict, add_lora, has_lora, save_adapter
from model.model_minimind import count_llm_params
from model.model_vlm import DEFAULT_VISION_MODEL, MiniMindVLM, VLMConfig, tower_features, tower_token_count
from model.precision import describe, dtype_name, resolve_device, resolve_dtype, use_tf32
from model.record import make_record, resolve_folders, write_record
from train_config import TrainConfig, build_parser, parse  # noqa: F401 (build_parser: trainer.main's callers)
from train_engines import DeepSpeedEngine, TorchEngine

# --- Configuration: the flags (train_config.py), parsed once at the edge into a read-only TrainConfig ---

def plain_args(cfg):
    """The config as saved in a resume file: plain values only (see rng_state)."""
    return {k: v if isinstance(v, (bool, int, float, str, type(None))) else str(v)
            for k, v in dataclasses.asdict(cfg).items()}


class StopTraining(Exception):
    """The run ends here on purpose, with nothing (more) to save. main() exits with `exit_code`,
    after the line `error: {message}` when there is a message (rank 0 has one, other ranks end
    quietly)."""

    def __init__(self, message=None, exit_code=1):
        super().__init__(message or "")
        self.message, self.exit_code = message, exit_code


# --- Processes: everything distributed lives here ---

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """This process's place among the training processes, and the collectives the loop uses
    (no-ops for a single process)."""
    rank: int = 0
    world: int = 1
    device: str = "cpu"  # under DDP/DeepSpeed on CUDA: this process's cuda:LOCAL_RANK

    @property
    def is_main(self):
        return self.rank == 0

    def sum(self, tensor):
        """`tensor` summed over all processes (in place)."""
        if self.world > 1:
            dist.all_reduce(tensor)
        return tensor

    def total(self, n):
        """The int `n` summed over all processes, read back (a wait for the GPU's queue under NCCL).
        One process never touches the device: `n` itself."""
        if self.world == 1:
            return int(n)
        return int(self.sum(torch.full((), n, dtype=torch.float64, device=self.device)))  # a fill, not a host copy

    def gather(self, obj):
        """Every process's `obj`, in rank order."""
        if self.world == 1:
            return [obj]
        objs = [None] * self.world
        dist.all_gather_object(objs, obj)
        return objs

    def close(self):
        """Leave together: nobody exits (and makes torchrun stop the others) before rank 0 has saved."""
        if self.world > 1:
            dist.barrier()
            dist.destroy_process_group()


def setup_distributed(cfg):
    """torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT
    (the latter also passes --local_rank). Without them this is one process, with no process group,
    except under --deepspeed, which needs one: then it is a group of one on a free local port."""
    if cfg.local_rank >= 0:
        os.environ.setdefault("LOCAL_RANK", str(cfg.local_rank))
    if cfg.deepspeed and "WORLD_SIZE" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if int(os.environ.get("WORLD_SIZE", 1)) == 1 and not cfg.deepspeed:
        return Cluster(0, 1, cfg.device)
    device = cfg.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Cluster(dist.get_rank(), dist.get_world_size(), device)


# --- Random streams: saved in resume files as tensors and plain lists ---

def seed_all(seed):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


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


def set_rng_state(states, rank, world, seed):
    """Restore this rank's RNG streams; after a world-size change, fresh per-rank streams instead."""
    if len(states) != world:
        seed_all(seed + rank)
        return
    state = states[rank]
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- Steps: the schedule, grouping micro-batches and weighing their tokens ---

def lr_at(progress, base_lr, warmup):
    """Linear warmup, then cosine from base_lr down to base_lr/10. `progress` is the fraction of
    all training samples consumed, so the schedule does not depend on the number of processes."""
    if progress < warmup:
        return base_lr * max(progress / warmup, 0.01)
    t = (progress - warmup) / max(1 - warmup, 1e-8)
    return base_lr / 10 + 0.45 * base_lr * (1 + math.cos(math.pi * min(t, 1.0)))


class MicroBatches:
    """One optimizer step's `size` micro-batches, taken from the loader's iterator only as they are
    used, so its workers go on preparing the next ones while the device computes. Collected up
    front, a step with more micro-batches than workers x prefetch would wait for batches every step."""

    def __init__(self, batches, size):
        self.batches, self.size = batches, size

    def __len__(self):
        return self.size

    def __iter__(self):
        return itertools.islice(self.batches, self.size)


def optimizer_steps(loader, n_batches, accumulation_steps):
    """The epoch's n_batches micro-batches, grouped per optimizer step (MicroBatches: iterate each
    group before taking the next). The last group of an epoch may be shorter: it still closes a
    step, so no gradient leaks into the next epoch."""
    batches = iter(loader)
    for start in range(0, n_batches, accumulation_steps):
        yield MicroBatches(batches, min(accumulation_steps, n_batches - start))


def total_steps(n_samples, global_batch, accumulation_steps, epochs):
    """Optimizer steps in a whole run: per epoch, its global batches grouped as optimizer_steps does."""
    return math.ceil(math.ceil(n_samples / global_batch) / accumulation_steps) * epochs


# --- Checkpoints: the .pth weights and the resume state, written and read in one place ---

def write_checkpoint(write, periodic, left):
    """Run one checkpoint write; True if it was written. A full disk at a periodic save is only a
    warning: the files of the last save are intact, training goes on and the next save tries again.
    At the final save, or one before stopping, it ends the run, saying what is `left` on disk."""
    try:
        write()
        return True
    except DiskFullError as e:
        if not periodic:
            raise DiskFullError(f"{e}; {left}") from None
        print(f"warning: {e}; training goes on, and the next save tries again", flush=True)
        return False


class Checkpointer:
    """The run's .pth weights and its resume state: the engine's weights and optimizer (the engine
    stores them: one file, or DeepSpeed's directory), every rank's RNG streams, the progress state
    and the flags. Tensors and plain values only, so a resume file loads with weights_only=True."""

    def __init__(self, engine, files, cfg, cluster, record):
        self.engine, self.cluster, self.record = engine, cluster, record
        self.weights_path, self.adapter_path = files.weights, files.adapter  # the adapter: with --lora_rank
        self.args, self.seed = plain_args(cfg), cfg.seed
        self.all_ranks_save = bool(cfg.deepspeed) and cluster.world > 1  # DeepSpeed's checkpoint needs every rank
        self.start_step, self.last = 0, None
        self.resume_step = None  # the step of this run's last complete resume file (or the one it resumed)

    def remove_partial_writes(self):
        for tmp in glob.glob(f"{self.weights_path}.tmp*") + glob.glob(f"{self.engine.resume_path}.tmp*"):
            os.remove(tmp)  # a write that was killed half-way; the file it was replacing is intact
            print(f"removed {tmp}, an incomplete checkpoint write")

    def resume(self):
        """Restore the engine's weights and optimizer and this rank's RNG streams -> the saved state."""
        engine, cluster = self.engine, self.cluster
        if not engine.resume_exists():
            raise FileNotFoundError(f"--from_resume 1 but {engine.resume_path} does not exist "
                                    f"(drop the flag to start fresh)")
        ckpt = engine.load_resume()
        rngs = ckpt["rng"] if isinstance(ckpt["rng"], list) else [ckpt["rng"]]  # one per rank that saved it
        state = ckpt["state"]
        self.resume_step = state["step"]
        set_rng_state(rngs, cluster.rank, cluster.world, self.seed + state["step"])
        if cluster.is_main:
            other_world = rngs and len(rngs) != cluster.world
            args, dtype = ckpt.get("args"), self.args["dtype"]
            saved_dtype = args.get("dtype") if isinstance(args, dict) else None
            print(f"resumed from {engine.resume_path}: epoch {state['epoch'] + 1}, step {state['step']}, "
                  f"{state['samples_seen']} samples into the epoch"
                  + (f" (saved by {len(rngs)} processes, now {cluster.world})" if other_world else "")
                  + (f" (saved under {saved_dtype}, now {dtype})" if saved_dtype and saved_dtype != dtype else ""))
        return state

    def begin(self, state):
        """The loop starts at `state`: the step an error has to be past for a save to be worth it."""
        self.start_step = state["step"]
        self.step_done(state)

    def step_done(self, state):
        """Remember the state after a completed optimizer step (applied or skipped): what an error
        saves. Only this rank's RNG can be saved then; with several processes, the resume reseeds
        them all."""
        self.last = {"state": dict(state), "rng": [rng_state()] if self.cluster.world == 1 else []}

    def save(self, state, kind="periodic", rngs=None):
        """Weights + resume file. kind: "periodic" (a full disk only warns), "stop" or "final".
        `rngs`: the RNG streams to save instead of gathering every rank's (after an error, when
        rank 0 saves alone, without collectives: the other ranks may be stuck in one)."""
        full = self.engine.full_state()  # collective under DeepSpeed (gathers ZeRO partitions)
        model = self.engine.model
        weights = llm_state_dict(model, full)  # released key names, LoRA adapters folded in
        resume = {"rng": self.cluster.gather(rng_state()) if rngs is None else rngs,  # collective under DDP
                  "state": dict(state), "args": self.args}
        periodic, saved, is_main = kind == "periodic", [], self.cluster.is_main
        if is_main:
            bad = non_finite_keys(weights)
            if bad:  # cannot happen while non-finite steps are skipped; never overwrite good weights with it
                raise StopTraining(f"non-finite values in {bad[:3]}: not saving {self.weights_path}")
            if write_checkpoint(lambda: atomic_save(weights, self.weights_path), periodic, self.left(saved, state)):
                write_record(self.record, self.weights_path)  # what the weights need: tokenizer, tower, shape
                saved.append(self.weights_path)
            if has_lora(model) and write_checkpoint(
                    lambda: save_adapter(adapter_state_dict(model, full), model.lora_settings, model.config,
                                         self.adapter_path), periodic, self.left(saved, state)):
                saved.append(self.adapter_path)
        if write_checkpoint(lambda: self.engine.save_resume(resume, is_main), periodic, self.left(saved, state)):
            self.resume_step = state["step"]
            if kind != "final":
                saved.append(self.engine.resume_path)
        if is_main and saved:
            print(f"saved {' and '.join(saved)}", flush=True)

    def left(self, saved, state):
        """What is on disk when a save cannot complete: the files of it already `saved`, and the
        resume file a run can continue from, if this run has one."""
        done = f"{' and '.join(saved)} {'hold' if len(saved) > 1 else 'holds'} step {state['step']}; " if saved else ""
        if self.resume_step is not None:
            return done + (f"then continue from step {self.resume_step}, in {self.engine.resume_path}, "
                           f"with --from_resume 1")
        return done + ("no resume file of this run was written, so --from_resume 1 cannot continue it" if saved else
                       "nothing of this run was saved: run it again")

    @contextlib.contextmanager
    def saving_on_error(self):
        """Around the loop: an error in it (an unreadable image, a lost peer...) would lose every
        step since the last save, so the last completed one is saved first, as a stop does."""
        try:
            yield
        except StopTraining:
            raise
        except Exception as e:
            self.save_after_error(e)
            raise

    def save_after_error(self, error):
        """Rank 0 alone, from what it holds; not under DeepSpeed with several processes."""
        if not self.cluster.is_main:
            return
        note, last = "", self.last
        if last["state"]["step"] == self.start_step:
            pass  # no step completed in this run: nothing new to save
        elif self.all_ranks_save:
            note = "no resume checkpoint saved (under DeepSpeed every process takes part in it); "
        elif not isinstance(error, DiskFullError):  # a full disk would fail again
            try:
                self.save(last["state"], "stop", rngs=last["rng"])
                note = f"saved step {last['state']['step']}, the last one completed before the error below; "
            except Exception as e:
                note = f"could not save a resume checkpoint ({error_message(e)}); "
        if self.resume_step is not None:  # a resume file left by another run would not continue this one
            note += "once the error is fixed, continue with --from_resume 1"
        if note:
            print(note, file=sys.stderr, flush=True)


# --- Logging ---

def log_step(line):
    """A log line (bytes) -> its step, or why it is not a log record."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return "not UTF-8 text"
    except json.JSONDecodeError:
        return "not JSON"
    step = record.get("step") if isinstance(record, dict) else None
    return step if type(step) is int else "no step number"


def log_records(path):
    """The records of the log a run resumes -> [(line, step)]. A line that is not a record would stop
    every later resume, so it is dropped: a torn last line (a run killed while appending it) with a
    note, any other (damaged bytes, a torn line that another run wrote after) with a warning naming
    it. A file without any record but such lines is no log of ours: a ValueError naming it."""
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    records, bad = [], []
    for n, line in enumerate(lines, 1):
        if line.strip():
            step = log_step(line)
            if isinstance(step, int):
                records.append((line.decode() + "\n", step))
            else:
                bad.append((n, step))
    if bad and not records and bad[0][0] < len(lines):
        raise ValueError(f"{path} is not a training log (line {bad[0][0]}: {bad[0][1]}): move it away or delete it, "
                         f"then resume (the log starts again)")
    if bad and bad[-1][0] == len(lines):  # the last line, without its newline
        print(f"note: {path}: dropped its last line, {lines[-1].decode(errors='replace').strip()[:60]!r}, which "
              f"a killed run wrote only in part")
        bad.pop()
    if bad:
        print(f"warning: {path}: dropped line {bad[0][0]} ({bad[0][1]}), not a log record"
              + (f", and {len(bad) - 1} more such lines" if len(bad) > 1 else ""), flush=True)
    return records


class Logger:
    """Console line + JSONL record every log_interval steps, and wandb when cfg.use_wandb (rank 0
    only). wandb gets the full config, and its run id lives in the resume file so a resumed run
    continues the same wandb run."""

    def __init__(self, cfg, path, wandb_id, enabled, resumed_step=None):
        self.path, self.enabled, self.wandb = path, enabled, None
        if not enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if resumed_step is None:
            open(path, "w").close()  # a fresh run overwrites the weights, so its log starts over too
        elif os.path.isfile(path):
            # Steps logged after the checkpoint we resume from (before a kill) are redone: drop
            # those trailing lines so every step appears once.
            records = log_records(path)
            while records and records[-1][1] > resumed_step:
                records.pop()
            with open(path, "w") as f:
                f.writelines(line for line, _ in records)
        if cfg.use_wandb:
            import wandb
            self.wandb = wandb.init(project=cfg.wandb_project, name=os.path.basename(RunFiles.from_file(path, "log").stem),
                                    config=dataclasses.asdict(cfg), id=wandb_id, resume="allow")

    def log(self, record):
        if not self.enabled:
            return
        timing = ("first step of the run, not timed" if record["eta_s"] is None else
                  f"{record['samples_per_s']:.1f} samples/s {record['tokens_per_s']:.0f} tok/s "
                  f"eta {time.strftime('%H:%M:%S', time.gmtime(record['eta_s']))}")
        print(f"epoch {record['epoch']} step {record['step']}/{record['total_steps']} loss {record['loss']:.4f} "
              f"lr {record['lr']:.2e} {timing}", flush=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


class Meter:
    """What a log line reports: the mean loss since the previous line, the throughput (all ranks)
    since then, and the time left at the pace of this run so far. The run's first step is left out
    of throughput and pace: it compiles the model (--use_compile 1: a minute or more) and starts the
    loader's workers, and counted, it would put an ETA of many minutes on a run of seconds. Until a
    later step has been timed, both are None. `clock` is time.time, or a stand-in in tests."""

    def __init__(self, clock=time.time):
        self.clock, self.t0, self.done_at_t0 = clock, None, 0  # t0: when the first step ended
        self.reset(clock())

    def reset(self, now):
        self.loss, self.steps, self.samples, self.tokens, self.since = 0.0, 0, 0, 0, now

    def add(self, step, done):
        """A finished step (`done`: samples consumed once it ended): its samples and tokens count,
        unless it was the run's first; its loss only if it was applied."""
        if step.applied:
            self.loss += step.loss
            self.steps += 1
        if self.t0 is None:  # the first step: the clock starts now
            self.t0 = self.since = self.clock()
            self.done_at_t0 = done
            return
        self.samples += step.samples
        self.tokens += step.tokens

    def report(self, lr, done, total):
        """-> loss, lr, rates and ETA (`done` of `total` samples consumed); starts the next window."""
        now = self.clock()
        timed = self.t0 is not None and done > self.done_at_t0 and now > self.since
        rate = (done - self.done_at_t0) / (now - self.t0) if timed else None
        record = {"loss": float(self.loss / self.steps), "lr": lr,  # the device's loss, read once per log line
                  "samples_per_s": self.samples / (now - self.since) if timed else None,
                  "tokens_per_s": self.tokens / (now - self.since) if timed else None,
                  "eta_s": (total - done) / max(rate, 1e-9) if timed else None, "time": now}
        self.reset(now)
        return record


# --- Building a run: model and tower, data, engine ---

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
    """--freeze_llm (see train_config.FREEZE_HELP); with LoRA adapters, they train and the layers they wrap do not."""
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
    found.update(dim=cfg.dim, n_layers=cfg.n_layers, use_moe=bool(cfg.use_moe))
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


# --- The loop ---

class StopSignals:
    """SIGINT/SIGTERM only take note: the loop finishes its step, then saves a resume checkpoint."""

    def __init__(self):
        self.received = 0
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.handle)

    def handle(self, signum, _frame):
        self.received = signum


# One optimizer step, its numbers summed over all ranks; `empty`: not taken, every sample of it was
# skipped; `skipped`: this rank's skipped samples (their reasons).
Step = namedtuple("Step", "loss lr applied stop samples tokens empty skipped", defaults=(False, ()))


def forward_backward(run, batch, weight, last_micro):
    """One micro-batch: forward, and backward of its summed loss times `weight` -> that summed loss
    (the mean over its supervised tokens times their count), still on the device."""
    engine, device = run.engine, run.cluster.device
    # The loader pins its batches on CUDA, so these copies are queued and the host goes on.
    to_device = lambda key: batch[key].to(device, non_blocking=True)  # noqa: E731
    with engine.micro_step(last_micro):
        out = engine.forward(input_ids=to_device("input_ids"), labels=to_device("labels"),
                             supervised=to_device("supervised"), image_features=run.encoder(batch, device),
                             image_slots=to_device("image_slots"))
        loss = out.loss * batch["n_supervised"]  # the MoE balance loss in it weighs in like the tokens
        engine.backward(loss * weight)
    return loss.detach()


def train_step(run, epoch, micro_batches, stop_signal):
    """One optimizer step: forward and backward over this rank's micro-batches, then the update -> Step.

    Every supervised token of the step, on every rank, weighs the same: the gradient is that of the
    step's global token mean, as one process with the whole batch would compute it. Plain per-rank
    (or per-micro-batch) means would weigh a token of a batch with few more than one of a full one.
    TorchEngine backpropagates each micro-batch's summed loss times a stand-in weight known on every
    rank up front (world / the step's samples, all ranks': the same whether a run was resumed or
    not), and rescales the gradients once the step's tokens are counted (all-reduced, unread).
    DeepSpeed reduces gradients during backward, past rescaling: it takes the micro-batches first.

    The host reads the device once, after the update is queued: whether it was applied (with
    several processes, also the step's totals). The loss stays on the device until a log line."""
    cfg, cluster, state = run.cfg, run.cluster, run.state
    lazy = run.engine.scales_gradients
    if not lazy:
        micro_batches = list(micro_batches)
    # DeepSpeed reads the device in its step anyway (its overflow flag), so reading the count here costs little.
    known = None if lazy else cluster.total(sum(b["n_supervised"] for b in micro_batches))
    losses, n_tokens, samples, tokens, skipped, weight = [], 0, 0, 0, [], None
    for j, batch in enumerate(micro_batches):
        n = batch["n_supervised"]
        if weight is None:
            samples_in_step = run.sampler.global_batch * len(micro_batches)
            weight = cluster.world / (samples_in_step if lazy else clamp_one(known))
        # Left out, having nothing to learn from: with one process a micro-batch without supervised
        # tokens (DDP needs every rank in each backward); under DeepSpeed a step without any, on all ranks.
        if (n or cluster.world > 1) if lazy else known:
            losses.append(forward_backward(run, batch, weight, j == len(micro_batches) - 1))
        n_tokens, samples, tokens = n_tokens + n, samples + batch["n_samples"], tokens + batch["n_tokens"]
        skipped += batch["skipped"]
        state["samples_seen"] = min(state["samples_seen"] + run.sampler.global_batch, run.n_samples)
    lr = lr_at(run.samples_done(epoch) / run.total_samples, cfg.learning_rate, cfg.warmup_ratio)
    loss = torch.stack(losses).sum() if losses else torch.zeros((), device=cluster.device)
    if cluster.world == 1:
        if not n_tokens:  # not taken: AdamW's weight decay and momentum would move the weights even so
            return Step(loss, lr, False, stop_signal > 0, samples, tokens, empty=True, skipped=skipped)
        loss = loss / n_tokens
        applied = run.engine.step(lr, torch.isfinite(loss), 1 / (weight * n_tokens) if lazy else None)
        return finish_step(state, Step(loss, lr, bool(applied), stop_signal > 0, samples, tokens,  # the one read
                                       skipped=skipped))
    # One all-reduce: the step's tokens, the logged loss (their global mean), throughput over every
    # rank, and a signal on any rank, which stops all of them at this same step.
    counts = torch.tensor([n_tokens, samples, tokens, stop_signal], dtype=torch.float64)
    totals = cluster.sum(torch.cat([loss.to(torch.float64).view(1), counts.to(cluster.device, non_blocking=True)]))
    loss, all_tokens = totals[0] / clamp_one(totals[1]), totals[1]
    grad_scale = cluster.world / (weight * clamp_one(all_tokens)) if lazy else None
    applied = (run.engine.step(lr, torch.isfinite(loss) & (all_tokens > 0), grad_scale) if lazy or known else
               torch.zeros((), dtype=torch.bool, device=cluster.device))  # DeepSpeed cannot drop a step itself
    all_tokens, samples, tokens, stop, applied = torch.cat([totals[1:], applied.view(1)]).tolist()  # the one read
    return finish_step(state, Step(loss, lr, bool(applied), stop > 0, int(samples), int(tokens),
                                   empty=all_tokens == 0, skipped=skipped))


def clamp_one(n):
    """max(n, 1) for an int or a device tensor (which it leaves unread)."""
    return n.clamp(min=1) if torch.is_tensor(n) else max(n, 1)


def finish_step(state, step):
    if step.applied:
        state["step"] += 1
    return step


def log_and_save(run, meter, epoch, lr):
    """After an applied step: a log line every log_interval steps (and at the last step), a
    checkpoint every save_interval steps."""
    step = run.state["step"]
    if step % run.cfg.log_interval == 0 or step == run.total_steps:
        run.logger.log({"epoch": epoch + 1, "step": step, "total_steps": run.total_steps,
                        **meter.report(lr, run.samples_done(epoch), run.total_samples)})
    if step % run.cfg.save_interval == 0:
        run.checkpointer.save(run.state)


def skipped_step(run, bad_steps):
    """A step with a non-finite loss or gradient was skipped, on every rank alike (all see the same
    loss and gradients). The third in a row stops the run, without saving NaN weights."""
    if run.cluster.is_main:
        print(f"warning: non-finite loss/gradient at step {run.state['step'] + 1}, step skipped", flush=True)
    if bad_steps >= 3:
        run.logger.close()
        hint = ", or use --dtype bfloat16 instead of float16." if run.cfg.dtype == "float16" else "."
        message = ("3 consecutive non-finite steps: stopping without saving NaN weights (the last checkpoint is "
                   "intact). Lower --learning_rate" + hint)
        raise StopTraining(message if run.cluster.is_main else None)


def end_epoch(run, epoch, skipped, empty_steps):
    """Report the epoch's skipped samples (all ranks') and the steps not taken for want of any, and
    move the state to the next epoch."""
    n_skipped = run.cluster.total(len(skipped))
    if run.cluster.is_main and n_skipped:
        print(f"epoch {epoch + 1}: skipped {n_skipped} samples" + (f", e.g. {skipped[0]}" if skipped else "")
              + (f"; optimizer steps not taken, every sample of them skipped: {empty_steps}" if empty_steps else ""))
    run.state.update(epoch=epoch + 1, samples_seen=0)


def train_epochs(run):
    """The epochs from where the run stands -> None when they are done, or why the run stopped
    early, right after a step: "interrupted" (a signal on any rank) or "stopped early"
    (--stop_after_steps)."""
    cfg, state = run.cfg, run.state
    signals, meter = StopSignals(), Meter()
    bad_steps, steps_this_run = 0, 0
    run.checkpointer.begin(state)
    run.model.train()
    if cfg.use_compile and run.cluster.is_main:
        print("compiling the model in the first step (about a minute, once: later runs reuse the compiled code "
              "from the cache); the rate and ETA leave that step out", flush=True)
    for epoch in range(state["epoch"], cfg.epochs):
        run.sampler.set_epoch(epoch, state["samples_seen"])
        skipped, empty_steps = [], 0  # this rank's skipped samples in this epoch; steps left without any
        for micro_batches in optimizer_steps(run.loader, len(run.sampler), cfg.accumulation_steps):
            step = train_step(run, epoch, micro_batches, signals.received)
            skipped += step.skipped
            run.checkpointer.step_done(state)
            meter.add(step, run.samples_done(epoch))
            if step.applied:
                bad_steps, steps_this_run = 0, steps_this_run + 1
                log_and_save(run, meter, epoch, step.lr)
            else:
                run.total_steps -= 1  # so the run's last step is still logged, and the total shown is right
                if step.empty:
                    empty_steps += 1
                else:
                    bad_steps += 1
                    skipped_step(run, bad_steps)
            if step.stop:
                return "interrupted"
            if cfg.stop_after_steps and steps_this_run >= cfg.stop_after_steps:
                return "stopped early"
        end_epoch(run, epoch, skipped, empty_steps)
    return None


def train(cfg):
    """A training run, from its config to the final checkpoint."""
    cfg = dataclasses.replace(cfg, device=resolve_device(cfg.device))
    cluster = setup_distributed(cfg)
    dtype, why = resolve_dtype(cfg.dtype, cluster.device)
    # The tokenizer and tower: given, or those --from_weight's record names (see model/record.py).
    tokenizer_path, tower_path, _ = resolve_folders(start_path(cfg), cfg.tokenizer_path, cfg.vision_model_path,
                                                    DEFAULT_VISION_MODEL)
    cfg = dataclasses.replace(cfg, dtype=dtype_name(dtype), tokenizer_path=tokenizer_path,
                              vision_model_path=tower_path)
    use_tf32(cluster.device, dtype)
    if cluster.is_main:
        print(describe(dtype, why), flush=True)
    run = build_run(cfg, cluster)
    with run.checkpointer.saving_on_error():
        stopped = train_epochs(run)
        if stopped:
            run.checkpointer.save(run.state, "stop")
    if not stopped:
        run.checkpointer.save(run.state, "final")
    run.logger.close()
    cluster.close()
    if stopped and cluster.is_main:
        print(f"{stopped}; continue with --from_resume 1", flush=True)
    if stopped == "interrupted":
        raise StopTraining(exit_code=130)  # like an uncaught Ctrl-C, so `pretrain && sft` does not go on


# --- The entry point ---

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
    """The flags (argv, default sys.argv) become a TrainConfig, then run."""
    launch(parse(parser, argv))


def launch(cfg):
    """The train scripts' entry, once their flags are parsed: train. A run that fails with
    a USER_ERRORS error ends with the line `error: <message>` (exit code 1); --debug or
    MINIMIND_DEBUG=1 shows the traceback instead. A StopTraining ends it with its own code."""
    try:
        train(cfg)
    except StopTraining as e:
        sys.exit(f"error: {e.message}" if e.message else e.exit_code)
    except USER_ERRORS as e:
        if cfg.debug or os.environ.get("MINIMIND_DEBUG", "0") not in ("", "0"):
            raise
        sys.exit(f"error: {error_message(e)}")
