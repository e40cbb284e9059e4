"""The two ways the training loop runs forward/backward/step and writes checkpoints.

TorchEngine: one process or DDP, torch AdamW, autocast, GradScaler for float16; resume is one file.
DeepSpeedEngine: `--deepspeed ds_config/zeroN.json`; the same torch AdamW handed to
deepspeed.initialize, which partitions it (ZeRO 1/2/3), accumulates, clips and keeps fp32 master
weights; resume is DeepSpeed's own checkpoint directory with our state in its client_state.

Both train a module without the vision tower: the trainer runs the frozen tower itself, in the
engine's `compute_dtype`, and passes its features to the forward. Both give the trainer the same
`full_state()` (fp32, our key names, LoRA adapters apart), from which it writes the `.pth`
(released key names, adapters folded in) and the LoRA adapter file, so eval and export do not care
how a model was trained. The engines take their settings as keywords, not the TrainConfig; errors
are exceptions for trainer.main.launch to report. deepspeed is imported only by DeepSpeedEngine.
"""
import contextlib
import glob
import json
import os
import shutil

import torch
import torch.distributed as dist

from model.checkpoint import llm_state_dict, load_weights, read_checkpoint

from model.files import CheckpointError, atomic_save
from model.lora import has_lora

RESUME_KEYS = {"model", "optimizer", "scaler", "rng", "state"}
RESUME_EXPECTED = ("expected a resume file written by train_pretrain_vlm.py / train_sft_vlm.py: check --out_dir, "
                   "--save_weight, --dim and --use_moe, or drop --from_resume 1 to start afresh")


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def wrap_ddp(model, device):
    """DDP that does not re-broadcast buffers before each forward (torch 2.13 spells broadcast_buffers
    this way): the only buffers are the RoPE tables, computed alike on every rank, so sending rank
    0's copy every step would be pure NCCL traffic. They are still checked once at construction."""
    device = torch.device(device)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None,
        gradient_as_bucket_view=True, forward_sync_buffers=False)


class TorchEngine:
    def __init__(self, model, params, device, resume_path, *, learning_rate, dtype, grad_clip):
        """dtype: the autocast dtype's name (--dtype, resolved); grad_clip: the norm clipped to, 0: none."""
        self.model, self.params, self.grad_clip, self.resume_path = model, params, grad_clip, resume_path
        device_type = torch.device(device).type
        self.compute_dtype = getattr(torch, dtype)  # weights stay fp32; autocast computes in this
        self.autocast = (torch.autocast(device_type, dtype=self.compute_dtype)
                         if self.compute_dtype != torch.float32 else contextlib.nullcontext())
        self.optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=True)  # one kernel, CPU and CUDA
        self.scaler = torch.amp.GradScaler(device_type, enabled=self.compute_dtype == torch.float16)
        self.ddp = None
        if world_size() > 1:
            # No find_unused_parameters: the model gives every trainable parameter a gradient on every
            # rank (a batch without images still touches the projection, every MoE expert runs, an
            # all-skipped batch is a dummy row), so DDP's buckets always fill and no rank waits forever.
            self.ddp = wrap_ddp(model, device)

    def micro_step(self, last_micro):
        """Context for one micro-step's forward + backward: gradients are all-reduced only on the
        last micro-step of an optimizer step (no_sync before it)."""
        return self.ddp.no_sync() if self.ddp is not None and not last_micro else contextlib.nullcontext()

    def forward(self, **inputs):
        with self.autocast:
            return (self.ddp or self.model)(**inputs)

    def backward(self, loss):
        self.scaler.scale(loss).backward()  # the loss is already this micro-batch's share of the step

    scales_gradients = True  # step() can rescale the accumulated gradients: see loop.train_step

    def step(self, lr, loss_ok, grad_scale=None):
        """Rescale the gradients by `grad_scale` (a number or a device tensor), clip and step ->
        whether the update was applied, a bool tensor on the device. A step whose
        loss (`loss_ok`, a bool tensor) or gradient is not finite is skipped there, as GradScaler
        skips one: the fused AdamW leaves weights, moments and step count alone when its `found_inf`
        is set, so the host reads nothing to decide. Gradients are dropped either way."""
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.scaler.unscale_(self.optimizer)
        if grad_scale is not None:
            torch._foreach_mul_([p.grad for p in self.params if p.grad is not None], grad_scale)
        clip = self.grad_clip if self.grad_clip > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip)  # a device tensor: no read
        if self.scaler.is_enabled():  # float16: the GradScaler skips overflowing steps and lowers its scale
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = loss_ok
        else:
            applied = loss_ok & torch.isfinite(norm)
            self.optimizer.found_inf = (~applied).float()  # read by the fused kernel
            self.optimizer.step()
            del self.optimizer.found_inf
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def full_state(self):
        """Every weight (fp32, CPU) under the model's own key names, LoRA adapters apart."""
        return {k: v.detach().float().cpu() for k, v in self.model.state_dict().items()}

    def resume_exists(self):
        return os.path.isfile(self.resume_path)

    def save_resume(self, extra, is_main):
        if is_main:
            # with LoRA, the adapters and their base weights apart (our key names); else the .pth's content
            weights = self.full_state() if has_lora(self.model) else llm_state_dict(self.model)
            atomic_save({"model": weights, "optimizer": self.optimizer.state_dict(),
                         "scaler": self.scaler.state_dict(), **extra}, self.resume_path)

    def load_resume(self):
        # weights_only: a resume file holds tensors and plain values only (see distributed.rng_state),
        # so a planted one cannot run code.
        path = self.resume_path
        ckpt = read_checkpoint(path, "resume file", RESUME_EXPECTED)
        missing = RESUME_KEYS - ckpt.keys() if isinstance(ckpt, dict) else RESUME_KEYS
        if missing:
            raise CheckpointError(f"{path} is not a valid resume file: no {sorted(missing)} entries; {RESUME_EXPECTED}")
        if self.scaler.is_enabled() and not ckpt["scaler"]:
            # Only a float16 run has a loss scale to resume; the other way round, none is needed.
            args = ckpt.get("args") if isinstance(ckpt.get("args"), dict) else {}
            saved = args.get("dtype", "bfloat16 or float32")
            raise CheckpointError(f"{path} was saved by a run with --dtype {saved}, which keeps no float16 loss scale: "
                                  f"resume with --dtype {saved}, or start a float16 run from its weights with "
                                  f"--from_weight")
        # every rank loads it: same weights, whatever the world size
        if has_lora(self.model) or any(".lora_" in k for k in ckpt["model"]):
            own = {k: v.shape for k, v in self.model.state_dict().items()}
            if {k: v.shape for k, v in ckpt["model"].items()} != own:
                raise CheckpointError(f"{path} was saved with other LoRA adapters than this run has (or without); "
                                      f"resume with the --lora_rank and --lora_targets it was saved with")
            self.model.load_state_dict(ckpt["model"])
        else:
            load_weights(self.model, ckpt["model"], f"{path} (its model weights)")
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])  # full (unsharded) AdamW state: any world size
        except ValueError as e:
            raise CheckpointError(f"{path}: its optimizer state does not fit this run's trainable parameters ({e}); "
                                  f"resume with the --freeze_llm it was saved with") from None
        self.scaler.load_state_dict(ckpt["scaler"])
        return ckpt


def deepspeed_config(path, world, hidden, *, batch_size, accumulation_steps, grad_clip, dtype):
    """The JSON config with our flags filled in where it says "auto" (or says nothing): batch sizes,
    accumulation, clipping, bf16/fp16 from --dtype, and ZeRO's buffer sizes from the LLM's width
    `hidden`. A concrete value that contradicts a flag is an error, since the data loader follows
    the flags."""
    with open(path) as f:
        ds = json.load(f)
    filled = {"train_micro_batch_size_per_gpu": batch_size,
              "gradient_accumulation_steps": accumulation_steps,
              "train_batch_size": batch_size * accumulation_steps * world,
              "gradient_clipping": float(grad_clip)}
    for key, value in filled.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"{path}: {key} is {ds[key]}, but the flags give {value}; set it to \"auto\"")
    explicit = any(ds.get(k, {}).get("enabled") is True for k in ("bf16", "fp16"))
    for key, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        block = ds.setdefault(key, {})
        if block.get("enabled", "auto") == "auto":
            block["enabled"] = not explicit and dtype == name
    zero = ds.get("zero_optimization")
    if zero:
        # As HF Trainer sizes them. Left out, DeepSpeed takes 5e8-element buckets, far more than the
        # whole gradient of these models, and allocates them on every GPU.
        stage = zero.get("stage", 0)
        sizes = {"reduce_bucket_size": hidden * hidden}
        if stage in (1, 2):
            sizes["allgather_bucket_size"] = hidden * hidden
        if stage == 3:
            sizes.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                         stage3_param_persistence_threshold=10 * hidden)
        for key, value in sizes.items():
            if zero.get(key, "auto") == "auto":
                zero[key] = value
    ds.setdefault("steps_per_print", 2 ** 31 - 1)  # we log ourselves
    return ds


# DeepSpeed's own classes in its checkpoints (ZeRO stage, loss-scaler settings, fp32 slice addresses):
# plain data, harmless to rebuild. Our part, the client_state, holds plain values only.
DEEPSPEED_GLOBALS = {"deepspeed.runtime.zero.config.ZeroStageEnum", "deepspeed.runtime.fp16.loss_scaler.LossScaler",
                     "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                     "deepspeed.utils.tensor_fragment.fragment_address"}


def check_deepspeed_files(tag_dir):
    """DeepSpeed loads its checkpoint with torch.load(weights_only=False) (TorchCheckpointEngine),
    which would run any code a planted file names. So before it does, list the globals each file
    imports, by reading its pickle without running it, and refuse the checkpoint if one is neither
    allowed under weights_only=True nor one of DeepSpeed's data classes above."""
    for path in sorted(glob.glob(os.path.join(tag_dir, "*.pt"))):
        try:
            unsafe = sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_GLOBALS)
        except Exception as e:  # not a zip written by torch.save, or a pickle op the scan does not know
            raise CheckpointError(f"{path} is not a valid DeepSpeed resume file ({e}); {RESUME_EXPECTED}") from None
        if unsafe:
            raise CheckpointError(f"{path} is not a valid DeepSpeed resume file: it holds {unsafe[0]}, not only "
                                  f"tensors, plain values and DeepSpeed's own data, and loading that could run code, "
                                  f"so it was refused; {RESUME_EXPECTED}")


class DeepSpeedEngine:
    def __init__(self, model, params, resume_path, *, config_path, learning_rate, dtype, grad_clip, batch_size,
                 accumulation_steps):
        """config_path: the DeepSpeed JSON (--deepspeed), its "auto" values filled from the other arguments.
        `model` must not hold the vision tower (the trainer keeps it apart): ZeRO-3 would
        partition it and gather it on every forward, and bf16 would round it."""
        if getattr(model, "vision_encoder", None) is not None:
            raise RuntimeError("DeepSpeedEngine: take the vision tower out of the model first "
                               "(trainer.build.build_model)")
        import deepspeed
        self.ds, self.resume_path = deepspeed, resume_path  # a directory
        ds_cfg = deepspeed_config(config_path, world_size(), model.config.dim, batch_size=batch_size,
                                  accumulation_steps=accumulation_steps, grad_clip=grad_clip, dtype=dtype)
        self.fp16 = ds_cfg["fp16"]["enabled"]
        self.stage = ds_cfg.get("zero_optimization", {}).get("stage", 0)
        # What DeepSpeed computes in; the trainer runs the tower in it too.
        self.compute_dtype = (torch.bfloat16 if ds_cfg["bf16"]["enabled"] else
                              torch.float16 if self.fp16 else torch.float32)
        # Frozen LLM weights stay exactly as loaded in the .pth: DeepSpeed holds them only in 16 bits.
        self.frozen = {n: p.detach().float().cpu().clone()
                       for n, p in model.named_parameters(remove_duplicate=False) if not p.requires_grad}
        if self.stage == 3:
            # A batch without images touches the projection outside its own forward (see embed()).
            for p in model.vision_proj.parameters():
                deepspeed.zero.register_external_parameter(model, p)
        optimizer = torch.optim.AdamW(params, lr=learning_rate, fused=True)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=params,
                                                                 optimizer=optimizer, config=ds_cfg)
        self.model = self.engine.module
        self.autocast = contextlib.nullcontext()  # DeepSpeed's module, and the tower, hold compute_dtype weights

    def micro_step(self, last_micro):
        # Our loop decides where an optimizer step ends (also at an epoch's end), not a micro-step count.
        self.engine.set_gradient_accumulation_boundary(last_micro)
        return contextlib.nullcontext()

    def forward(self, **inputs):
        return self.engine(**inputs)

    def backward(self, loss):
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already this micro-batch's share

    # It reduces (ZeRO: partitions) gradients during backward, where they can no longer be rescaled:
    # the trainer weighs each micro-batch by the step's token count, known before the first backward.
    scales_gradients = False

    def step(self, lr, loss_ok, grad_scale=None):
        if grad_scale is not None:
            raise ValueError("DeepSpeedEngine cannot rescale gradients after backward")
        for g in self.optimizer.param_groups:  # the ZeRO optimizer's groups are the inner AdamW's
            g["lr"] = lr
        self.engine.step()  # clips; skips (and says so) when a gradient is not finite
        # As TorchEngine.step, a bool tensor. DeepSpeed reads its overflow flag on the host itself;
        # fp16: overflow is its loss scaler's.
        return loss_ok if self.fp16 or self.engine.was_step_applied() else torch.zeros_like(loss_ok)

    def full_state(self):
        """Every weight (fp32, CPU) under the model's own key names, LoRA adapters apart, on every rank
        (collective: call on all). Trainable ones from the optimizer's fp32 master copy, gathered
        from the ZeRO partitions."""
        from deepspeed.utils import safe_get_full_fp32_param
        out, done = {}, {}
        for name, t in self.model.state_dict(keep_vars=True).items():
            if name in self.frozen:
                value = self.frozen[name]
            elif isinstance(t, torch.nn.Parameter):
                if id(t) not in done:  # tied weights (output = tok_embeddings) are gathered once
                    full = safe_get_full_fp32_param(t)
                    if full is None:  # no fp32 master (plain fp32 without ZeRO): the parameter itself
                        with self.ds.zero.GatheredParameters([t]):
                            full = t.detach().clone()
                    done[id(t)] = full.float().cpu()
                value = done[id(t)]
            else:
                value = t.detach().float().cpu()
            out[name] = value
        return out

    def resume_exists(self):
        return os.path.isfile(os.path.join(self.resume_path, "latest"))

    def save_resume(self, extra, is_main):
        """DeepSpeed's checkpoint (every rank writes its shard). Its `latest` file is written last,
        so a run killed mid-save resumes from the previous complete tag, which is only then pruned."""
        tag = f"step{extra['state']['step']}"
        self.engine.save_checkpoint(self.resume_path, tag=tag, client_state={"minimind": extra})
        if world_size() > 1:
            dist.barrier()
        if is_main:
            for old in glob.glob(os.path.join(self.resume_path, "step*")):
                if os.path.basename(old) != tag:
                    shutil.rmtree(old, ignore_errors=True)

    def load_resume(self):
        with open(os.path.join(self.resume_path, "latest")) as f:
            tag = f.read().strip()
        shards = len(glob.glob(os.path.join(self.resume_path, tag, "*optim_states.pt")))  # one per ZeRO rank
        if shards and shards != world_size():
            raise CheckpointError(f"{self.resume_path} was saved by {shards} processes; resume it with {shards} "
                                  f"(ZeRO partitions the optimizer state), or start a new run from the .pth with "
                                  f"--from_weight")
        check_deepspeed_files(os.path.join(self.resume_path, tag))
        path, client = self.engine.load_checkpoint(self.resume_path)
        if path is None:
            raise CheckpointError(f"could not load the DeepSpeed checkpoint in {self.resume_path}")
        return client["minimind"]
