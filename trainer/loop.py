"""The training loop, top to bottom: train(cfg) sets up the processes and builds the run, then
train_epochs runs it one optimizer step at a time:

    train_step      forward and backward over the step's micro-batches, then the update
    log_and_save    after an applied step: a log line, a checkpoint
    skipped_step    after a non-finite one: a warning; the third in a row stops the run
    end_epoch       the epoch's skipped samples, and the state moved to the next epoch

CPU or CUDA, plain or DeepSpeed (--deepspeed, see engines.py), all go through this same loop.
SIGINT/SIGTERM or an error in it save a resume checkpoint (checkpoints.py).
"""
import dataclasses
import signal
from collections import namedtuple

import torch

from model.model_vlm import DEFAULT_VISION_MODEL
from model.precision import describe, dtype_name, resolve_device, resolve_dtype, use_tf32
from model.record import resolve_folders
from trainer.build import build_run, start_path
from trainer.distributed import setup_distributed
from trainer.errors import StopTraining
from trainer.logs import Meter
from trainer.schedule import lr_at, optimizer_steps


def train(cfg):
    """A training run, from its config to the final checkpoint."""
    # "auto" device and dtype become the real ones here, once: every piece built below, and the
    # flags saved in resume files, see what this run actually uses.
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
    # An error in the loop first saves the last completed step; a stop (a signal, --stop_after_steps)
    # saves a resume file to continue from; only a run that went to its end writes the final weights.
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
    lr = lr_at(run.samples_done(epoch) / run.total_samples, cfg.learning_rate, cfg.warmup_ratio, cfg.decay_ratio)
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
