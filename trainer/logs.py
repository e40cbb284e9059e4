"""The run's log: a console line and a JSONL record every --log_interval steps (and wandb with
--use_wandb), the numbers they report (Meter), and the log a resumed run continues."""
import dataclasses
import json
import os
import time

from model.paths import RunFiles


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
