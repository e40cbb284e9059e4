"""Faults: SIGKILL mid-epoch and mid-checkpoint-write, non-finite losses, Ctrl-C. Single process."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT, TINY_LLM, flags, launch, read_log

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses

SCRIPT = os.path.join(ROOT, "train_pretrain_vlm.py")
TOTAL_STEPS = 18  # 12 samples, batch 2, 3 epochs


STARTED = []


@pytest.fixture(autouse=True)
def no_stray_runs():
    yield
    while STARTED:  # a failed test must not leave a training run behind
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def start(args, log_path, die_at_write=None, **popen):
    """The script in a subprocess; with die_at_write=N it SIGKILLs itself half-way through its Nth checkpoint write."""
    wrapper = [os.path.join(ROOT, "tests", "die_mid_write.py"), str(die_at_write)] if die_at_write else []
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, *wrapper, SCRIPT, *map(str, args)], cwd=ROOT, stdout=log,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"}, **popen)
    STARTED.append(proc)
    return proc


def wait_for(condition, proc, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before the moment to interrupt it"
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def logged_steps(out):
    path = out / "pretrain_vlm_64_log.jsonl"
    return len(read_log(path)) if path.exists() else 0


def tmp_files(out):
    return {name for name in os.listdir(out) if ".tmp" in name} if out.exists() else set()


def assert_checkpoints_load(out, tower_dir):
    """Whatever moment a run died at, the files under the real names are complete and finite."""
    from model.checkpoint import load_weights
    from model.model_vlm import MiniMindVLM, VLMConfig
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    sd = load_weights(model, str(out / "pretrain_vlm_64.pth"))
    assert all(torch.isfinite(v).all() for v in sd.values())
    resume = torch.load(out / "pretrain_vlm_64_resume.pth", weights_only=True)
    load_weights(model, resume["model"])
    return resume["state"]["step"]


def test_sigkill_mid_epoch_and_mid_checkpoint_write_then_resume_reproduces_the_uninterrupted_run(
        toy_data, tower_dir, tmp_path):
    args = flags(toy_data, tower_dir, tmp_path / "b", batch_size=2, epochs=3, dtype="bfloat16", save_interval=1)
    launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path / "a", batch_size=2, epochs=3,
                                          dtype="bfloat16"))
    out = tmp_path / "b"

    # 1. SIGKILL in the middle of epoch 1, a few steps in.
    proc = start(args, tmp_path / "run0.txt")
    wait_for(lambda: logged_steps(out) >= 3, proc)
    proc.kill()
    proc.wait()
    assert 2 <= assert_checkpoints_load(out, tower_dir) < TOTAL_STEPS

    # 2. SIGKILL while a checkpoint is being written: the run kills itself half-way through its
    # third write (the second save's first file), leaving a partial temp file.
    stale = tmp_files(out)
    proc = start(args + ["--from_resume", 1], tmp_path / "run1.txt", die_at_write=3)
    proc.wait(300)
    assert proc.returncode == -signal.SIGKILL
    assert not stale & tmp_files(out), "the restarted run should have removed the old partial writes"
    assert tmp_files(out) - stale, "the killed write should have left its partial temp file"
    assert assert_checkpoints_load(out, tower_dir) < TOTAL_STEPS

    # 3. Resume to the end: the partial file is cleaned up, the log has every step once, and the
    # weights are those of the uninterrupted run.
    proc = launch("train_pretrain_vlm.py", args + ["--from_resume", 1])
    assert "an incomplete checkpoint write" in proc.stdout and not tmp_files(out)
    full, split = read_log(tmp_path / "a" / "pretrain_vlm_64_log.jsonl"), read_log(out / "pretrain_vlm_64_log.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, TOTAL_STEPS + 1))
    assert all(abs(x["loss"] - y["loss"]) < 1e-4 for x, y in zip(full, split))
    wa, wb = torch.load(tmp_path / "a" / "pretrain_vlm_64.pth"), torch.load(out / "pretrain_vlm_64.pth")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_non_finite_losses_stop_the_run_without_writing_nan_weights(toy_data, tower_dir, tmp_path):
    # An absurd learning rate: step 1 is fine, then the weights are ~1e30 and every loss is NaN/inf.
    proc = launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path, batch_size=2, epochs=1,
                                                 learning_rate=1e30, dtype="bfloat16", save_interval=1), check=False)
    assert proc.returncode == 1
    assert proc.stdout.count("step skipped") == 3 and "3 consecutive non-finite steps" in proc.stderr
    assert [r["step"] for r in read_log(tmp_path / "pretrain_vlm_64_log.jsonl")] == [1]
    sd = torch.load(tmp_path / "pretrain_vlm_64.pth")  # step 1's, the last good one
    assert all(torch.isfinite(v).all() for v in sd.values())


def test_ctrl_c_saves_a_resume_checkpoint_and_the_run_continues_from_it(toy_data, tower_dir, tmp_path):
    # One DataLoader worker: Ctrl-C reaches the whole process group, and the worker must ignore it.
    args = flags(toy_data, tower_dir, tmp_path, batch_size=2, epochs=3, num_workers=1, dtype="bfloat16")
    proc = start(args, tmp_path / "run.txt", start_new_session=True)
    wait_for(lambda: logged_steps(tmp_path) >= 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    output = (tmp_path / "run.txt").read_text()
    assert "interrupted; continue with --from_resume 1" in output and "Traceback" not in output
    stopped_at = torch.load(tmp_path / "pretrain_vlm_64_resume.pth", weights_only=True)["state"]["step"]
    assert 1 <= stopped_at < TOTAL_STEPS
    proc = launch("train_pretrain_vlm.py", args + ["--from_resume", 1])
    assert f"step {stopped_at}," in proc.stdout
    assert [r["step"] for r in read_log(tmp_path / "pretrain_vlm_64_log.jsonl")] == list(range(1, TOTAL_STEPS + 1))


def test_sigusr1_prints_where_each_thread_is_and_training_goes_on(toy_data, tower_dir, tmp_path):
    """How to see where a stuck rank waits: `kill -USR1 <pid>` prints the stacks, the run is unharmed."""
    args = flags(toy_data, tower_dir, tmp_path, batch_size=2, epochs=3, dtype="float32")
    proc = start(args, tmp_path / "run.txt")
    wait_for(lambda: logged_steps(tmp_path) >= 1, proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=120) == 0
    output = (tmp_path / "run.txt").read_text()
    assert "most recent call first" in output and os.path.join("trainer", "loop.py") in output
    assert [r["step"] for r in read_log(tmp_path / "pretrain_vlm_64_log.jsonl")] == list(range(1, TOTAL_STEPS + 1))
