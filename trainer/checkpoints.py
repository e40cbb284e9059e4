"""Checkpoints: the .pth weights (with their record and, under LoRA, the adapter file) and the
resume state, written and read in one place, and what is saved when a run stops or fails."""
import contextlib
import glob
import os
import sys

from model.checkpoint import llm_state_dict

from model.files import DiskFullError, atomic_save, non_finite_keys
from model.lora import adapter_state_dict, has_lora, save_adapter
from model.record import write_record
from trainer.config import plain_args
from trainer.distributed import rng_state, set_rng_state
from trainer.errors import StopTraining, error_message


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
