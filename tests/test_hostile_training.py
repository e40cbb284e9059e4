"""Hostile files and failures around training: a planted resume file, an error mid-run, a torn log
line, a full disk, files that are not checkpoints. Each ends with one line that names the file and
the fix, without a traceback, and loses no completed step."""
import argparse
import errno
import io
import os
import random
import re
import shutil

import pytest
import torch

import trainer.build
import trainer.checkpoints
import trainer.config
import trainer.distributed
import trainer.errors
import trainer.logs
import trainer.loop
import trainer.main
from builders import checkpointer, config
from conftest import ROOT, TINY_LLM, flags, launch, make_toy_data, read_log
from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import load_weights
from model.files import CheckpointError, DiskFullError, atomic_save
from trainer.engines import check_deepspeed_files


class RunsCode:
    """Unpickling this calls open(marker, "w"): a stand-in for any code a planted file could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def assert_one_line_error(proc, *fragments):
    assert proc.returncode != 0 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), proc.stderr
    return errors[0]


# 1. Resume files, checkpoints and DeepSpeed's files load as tensors and plain values only.

@pytest.mark.slow
def test_a_resume_file_that_would_run_code_is_refused_without_running_it(toy_data, tower_dir, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "MARKER"
    out.mkdir()
    resume = out / "pretrain_vlm_64_resume.pth"
    torch.save({"model": RunsCode(str(marker)), "optimizer": {}, "scaler": {}, "rng": [], "state": {}}, resume)
    proc = launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, out, from_resume=1), check=False)
    line = assert_one_line_error(proc, str(resume), "not a valid resume file", "could run code")
    assert "drop --from_resume 1" in line
    assert not marker.exists()


class RunsShell:
    """Unpickling this calls os.system (posix.system on Linux): torch blocks that module by name."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_weights_file_planting_a_shell_call_is_refused_naming_the_call_not_torchs_advice(tower_dir, tmp_path):
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    marker = tmp_path / "MARKER"
    for planted in (RunsShell(marker), RunsCode(str(marker))):  # a blocked module; a global not allowed
        path = tmp_path / "planted.pth"
        torch.save({"tok_embeddings.weight": planted}, path)
        with pytest.raises(CheckpointError) as refused:
            load_weights(model, str(path))
        held = f"{planted.__reduce__()[0].__module__}.{planted.__reduce__()[0].__name__}"
        assert str(refused.value).startswith(f"{path} is not a valid weights file and was refused: it holds "
                                             f"{held}, which could run code; expected a .pth")
        assert "weights_only" not in str(refused.value) and "\n" not in str(refused.value)
    assert not marker.exists()
    path.write_bytes(b"\x80\x02" + bytes(range(247, 256)) * 300)  # a pickle of no sense: damaged, not planted
    with pytest.raises(CheckpointError, match=r"not written by torch.save \(UnpicklingError: Unsupported operand"):
        load_weights(model, str(path))


def test_a_planted_deepspeed_checkpoint_is_refused_before_deepspeed_loads_it(tmp_path):
    marker = tmp_path / "MARKER"
    tag = tmp_path / "step3"
    tag.mkdir()
    torch.save({"module": {"w": torch.zeros(2)}, "minimind": {"state": {"step": 3}}}, tag / "mp_rank_00_model_states.pt")
    check_deepspeed_files(str(tag))  # tensors and plain values pass
    torch.save({"optimizer_state_dict": RunsCode(str(marker))}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(CheckpointError, match=r"optim_states.pt is not a valid DeepSpeed resume file: it holds "
                                              r"io.open.*could run code"):
        check_deepspeed_files(str(tag))
    assert not marker.exists()


def saved_under(dtype, tower_dir, out):
    """A resume file written by a run with --dtype `dtype` -> the checkpointer of a run with other flags."""
    def run(**flags):
        cfg = config(out_dir=str(out), vision_model_path=tower_dir, **TINY_LLM, **flags)
        return checkpointer(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), cfg, out)
    run(dtype=dtype).save({"epoch": 0, "samples_seen": 4, "step": 2, "wandb_id": None}, "stop")
    return run


def test_resuming_a_bfloat16_run_with_float16_names_the_resume_file_and_the_dtype_it_was_started_with(tower_dir,
                                                                                                       tmp_path):
    run = saved_under("bfloat16", tower_dir, tmp_path)
    resume = tmp_path / "unit_64_resume.pth"
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(resume))} was saved by a run with --dtype bfloat16, "
                                              r"which keeps no float16 loss scale: resume with --dtype bfloat16"):
        run(dtype="float16").resume()


def test_a_float16_run_resumes_under_bfloat16_and_says_so(tower_dir, tmp_path, capsys):
    run = saved_under("float16", tower_dir, tmp_path)
    assert run(dtype="bfloat16").resume()["step"] == 2  # its loss scale is not needed without float16
    assert "step 2, 4 samples into the epoch (saved under float16, now bfloat16)" in capsys.readouterr().out


# 2. An error inside the training loop saves the last completed step first.

@pytest.mark.slow
def test_an_error_mid_run_saves_the_last_completed_step_and_the_run_resumes_from_it(tower_dir, tmp_path):
    data = make_toy_data(tmp_path / "data")
    image = tmp_path / "data" / "images" / "8.png"  # the 9th sample's: the dataset opens images only when used
    good = image.read_bytes()
    image.write_bytes(b"not a png")
    out = tmp_path / "out"
    args = flags(data, tower_dir, out, batch_size=2, epochs=1, save_interval=1000, num_workers=0)
    proc = launch("train_pretrain_vlm.py", args, check=False)
    assert_one_line_error(proc, "data.jsonl:9: cannot read image")
    assert "continue with --from_resume 1" in proc.stderr
    done = [r["step"] for r in read_log(out / "pretrain_vlm_64_log.jsonl")]
    saved = torch.load(out / "pretrain_vlm_64_resume.pth", weights_only=True)["state"]
    assert saved["step"] == len(done) > 0 and saved["samples_seen"] == 2 * len(done)
    assert f"saved step {len(done)}, the last one completed" in proc.stderr

    # 4. A torn last log line (a kill mid-append) is dropped on resume, with a note.
    with open(out / "pretrain_vlm_64_log.jsonl", "a") as f:
        f.write('{"step": 9, "lo')
    image.write_bytes(good)
    proc = launch("train_pretrain_vlm.py", args + ["--from_resume", 1])
    assert f"step {len(done)}," in proc.stdout and "dropped its last line" in proc.stdout
    assert [r["step"] for r in read_log(out / "pretrain_vlm_64_log.jsonl")] == list(range(1, 7))


# 3. Errors for the user are one line; the traceback is there when asked for.

def test_errors_are_one_line_and_the_traceback_is_shown_on_request(monkeypatch, capsys):
    def fail(args):
        raise ValueError("d.jsonl:3: cannot read image: broken. Fix it, or pass --skip_bad_samples 1")

    monkeypatch.setattr(trainer.loop, "train", fail)
    parser = trainer.config.build_parser("test")
    with pytest.raises(SystemExit, match=r"^error: d.jsonl:3: cannot read image: broken\. Fix it"):
        trainer.main.main(parser, [])
    with pytest.raises(ValueError):
        trainer.main.main(parser, ["--debug"])
    monkeypatch.setenv("MINIMIND_DEBUG", "1")
    with pytest.raises(ValueError):
        trainer.main.main(parser, [])
    parser.print_help()
    assert "MINIMIND_DEBUG=1" in capsys.readouterr().out


def test_an_error_from_a_dataloader_worker_prints_without_the_worker_traceback():
    from torch._utils import ExceptionWrapper
    try:
        raise ValueError("d.jsonl:9: cannot read image: broken")
    except ValueError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(ValueError) as info:
        wrapped.reraise()
    assert trainer.errors.error_message(info.value) == "d.jsonl:9: cannot read image: broken"


@pytest.mark.slow
def test_a_missing_data_file_ends_the_script_with_one_line(toy_data, tower_dir, tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    proc = launch("train_pretrain_vlm.py", flags((missing, toy_data[1]), tower_dir, tmp_path / "out"), check=False)
    assert_one_line_error(proc, missing)


# 4. The training log.

def test_a_torn_last_log_line_is_dropped_with_a_note(tmp_path, capsys):
    path = tmp_path / "run_log.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 9, "lo')
    trainer.logs.Logger(argparse.Namespace(use_wandb=False), str(path), None, True, resumed_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert f"note: {path}: dropped its last line" in capsys.readouterr().out


def test_a_torn_middle_log_line_is_dropped_with_a_warning_naming_its_line(tmp_path, capsys):
    path = tmp_path / "run_log.jsonl"
    path.write_bytes(b'{"step": 1}\n{"step": 2, "lo{"step": 2}\n\xff\xfe\n[3]\n{"step": 3}\n{"step": 4}\n')
    trainer.logs.Logger(argparse.Namespace(use_wandb=False), str(path), None, True, resumed_step=3)
    assert path.read_text() == '{"step": 1}\n{"step": 3}\n'
    assert capsys.readouterr().out == (f"warning: {path}: dropped line 2 (not JSON), not a log record, and 2 more such "
                                       f"lines\n")


def test_a_log_of_random_bytes_is_one_line_naming_the_file(tmp_path):
    path = tmp_path / "run_log.jsonl"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + random.Random(0).randbytes(2000))
    with pytest.raises(ValueError, match=f"^{re.escape(str(path))} is not a training log \\(line 1: not UTF-8 text\\): "
                                         "move it away or delete it, then resume"):
        trainer.logs.Logger(argparse.Namespace(use_wandb=False), str(path), None, True, resumed_step=3)


# 5. A full disk.

def failing_file(limit):
    """An open() for atomic_save whose files raise ENOSPC once `limit` bytes are written."""
    class Full(io.FileIO):
        written = 0

        def write(self, b):
            if self.written + len(b) > limit:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.written += len(b)
            return super().write(b)
    return lambda path, mode: Full(path, mode)


@pytest.mark.parametrize("limit", [0, 300])  # at once: OSError; after a few bytes: torch's "unexpected pos"
def test_a_full_disk_removes_the_partial_file_and_names_the_path(tmp_path, monkeypatch, limit):
    import model.files
    path = tmp_path / "w.pth"
    atomic_save({"w": torch.ones(3)}, str(path))
    monkeypatch.setattr(model.files, "open", failing_file(limit), raising=False)
    with pytest.raises(DiskFullError, match=f"^disk full writing {re.escape(str(path))} .*free space"):
        atomic_save({"w": torch.zeros(10000)}, str(path))
    assert os.listdir(tmp_path) == ["w.pth"]  # no partial .tmp file left
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(3))  # the previous file is intact


def test_a_full_disk_warns_at_a_periodic_save_and_stops_the_run_at_the_final_one(capsys):
    def full():
        raise DiskFullError("disk full writing out/x.pth (No space left on device): free space on its disk")

    left = "then continue from step 4, in out/x_resume.pth, with --from_resume 1"  # what the Checkpointer says
    assert trainer.checkpoints.write_checkpoint(full, periodic=True, left=left) is False
    assert "warning: disk full writing out/x.pth" in capsys.readouterr().out
    with pytest.raises(DiskFullError, match=r"out/x.pth .*free space on its disk; then continue from step 4, in "
                                            r"out/x_resume.pth, with --from_resume 1$"):
        trainer.checkpoints.write_checkpoint(full, periodic=False, left=left)
    assert trainer.checkpoints.write_checkpoint(lambda: None, periodic=False, left=left) is True


def test_a_full_disk_at_the_end_of_a_run_that_saved_nothing_does_not_say_continue_with_from_resume(
        tower_dir, tmp_path, monkeypatch):
    import model.files as files_module
    cfg = toy_run(tmp_path, tower_dir, n=2)
    monkeypatch.setattr(files_module, "open", failing_file(0), raising=False)
    with pytest.raises(SystemExit) as end:
        trainer.main.launch(cfg)
    assert str(end.value) == (f"error: disk full writing {tmp_path / 'out' / 'unit_64.pth'} (No space left on device): "
                              f"free space on its disk; nothing of this run was saved: run it again")


def test_a_full_disk_at_a_final_save_names_what_was_saved_last(tower_dir, tmp_path, monkeypatch):
    import model.files as files_module
    cfg = config(out_dir=str(tmp_path), vision_model_path=tower_dir, **TINY_LLM)
    saver = checkpointer(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), cfg, tmp_path)
    weights, resume = tmp_path / "unit_64.pth", tmp_path / "unit_64_resume.pth"
    full_for_resume = failing_file(0)
    monkeypatch.setattr(files_module, "open", lambda path, mode: (full_for_resume if "_resume" in path else
                                                                       io.FileIO)(path, mode), raising=False)
    with pytest.raises(DiskFullError) as error:  # the weights fit, the resume file does not
        saver.save({"epoch": 0, "samples_seen": 2, "step": 1, "wandb_id": None}, "final")
    assert str(error.value).endswith(f"free space on its disk; {weights} holds step 1; no resume file of this run was "
                                     f"written, so --from_resume 1 cannot continue it")
    monkeypatch.undo()
    saver.save({"epoch": 0, "samples_seen": 4, "step": 2, "wandb_id": None})
    monkeypatch.setattr(files_module, "open", failing_file(0), raising=False)
    saver.save({"epoch": 0, "samples_seen": 8, "step": 4, "wandb_id": None})  # periodic: a warning, the run goes on
    with pytest.raises(DiskFullError) as error:
        saver.save({"epoch": 0, "samples_seen": 10, "step": 5, "wandb_id": None}, "final")
    assert str(error.value) == (f"disk full writing {weights} (No space left on device): free space on its disk; then "
                                f"continue from step 2, in {resume}, with --from_resume 1")


# 6. Files that are not the checkpoint they were given as.

def hostile_weights(tmp_path):
    good = tmp_path / "good.pth"
    atomic_save({"w": torch.zeros(100000)}, str(good))
    cases = {"list": ([torch.zeros(1)], "holds a list, not model weights"),
             "empty": ({}, "is empty: no MiniMind weights"),
             "resume": ({"model": {}, "optimizer": {}}, "is a trainer resume file, not model weights")}
    paths = {}
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        paths[name] = (str(tmp_path / f"{name}.pth"), message)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:1000])
    paths["truncated"] = (str(tmp_path / "truncated.pth"), "is not a valid weights file: truncated, or not written "
                                                            "by torch.save (RuntimeError: PytorchStreamReader")
    return paths


def test_files_that_are_not_model_weights_say_what_they_are(tower_dir, tmp_path):
    from cli import add_model_args
    from model.inference import load_model
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    for path, message in hostile_weights(tmp_path).values():
        expected = f"^{re.escape(f'{path} {message}')}.*--weight / --from_weight"
        with pytest.raises(CheckpointError, match=expected):
            load_weights(model, path)
        args = add_model_args(argparse.ArgumentParser()).parse_args(
            ["--weight", path, "--vision_model_path", tower_dir, "--device", "cpu"])
        with pytest.raises(CheckpointError, match=expected):
            load_model(args)


def test_a_checkpoint_whose_embedding_is_all_nan_is_refused_naming_the_file(tower_dir, tmp_path):
    from model.inference import InferenceConfig, load_model
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    sd = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    sd["tok_embeddings.weight"] = torch.full_like(sd["tok_embeddings.weight"], float("nan"))
    path = str(tmp_path / "nan_64.pth")
    torch.save(sd, path)
    expected = (f"{path} holds NaN or inf values in ['tok_embeddings.weight']: it is damaged, or was saved by a run "
                f"that diverged; use another checkpoint")
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}"):
        load_weights(model, path)
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}"):  # what eval, the demo and the API load with
        load_model(InferenceConfig(weight=path, vision_model_path=tower_dir, tokenizer_path="model", device="cpu"))


def test_a_tokenizer_larger_than_the_checkpoints_embedding_is_refused_in_eval_and_training(tower_dir, tokenizer,
                                                                                           tmp_path):
    from model.inference import InferenceConfig, load_model
    wider = tmp_path / "tokenizer"
    bigger = type(tokenizer).from_pretrained(os.path.join(ROOT, "model"))
    bigger.add_tokens(["<extra_0>", "<extra_1>"])
    bigger.save_pretrained(wider)
    path = tmp_path / "w_64.pth"
    torch.save({k: v for k, v in MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)).state_dict().items()
                if not k.startswith("vision_encoder.")}, path)
    expected = (f"the tokenizer at {wider} has 6402 tokens, but {path} embeds only 6400: pass --tokenizer_path the "
                f"tokenizer {path} was trained with")
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        load_model(InferenceConfig(weight=str(path), vision_model_path=tower_dir, tokenizer_path=str(wider), device="cpu"))
    cfg = config(vision_model_path=tower_dir, tokenizer_path=str(wider), from_weight=str(path), **TINY_LLM)
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}$"):
        trainer.build.build_model(cfg, bigger, "cpu")


def test_a_tower_whose_pytorch_model_bin_holds_a_pickle_is_refused_in_one_line(tower_dir, tmp_path):
    from model.model_vlm import load_vision_tower
    tower, marker = tmp_path / "tower", tmp_path / "MARKER"
    shutil.copytree(tower_dir, tower)
    (tower / "model.safetensors").unlink()
    torch.save({"vision_model.embeddings.patch_embedding.weight": RunsCode(str(marker))}, tower / "pytorch_model.bin")
    expected = (f"vision tower {tower / 'pytorch_model.bin'} was refused: it holds more than tensors (objects whose "
                f"loading could run code), or is damaged; get the tower again, as model.safetensors where it is offered")
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):
        load_vision_tower(str(tower))
    assert not marker.exists()


def test_weights_of_another_size_name_the_file_and_the_flags(tower_dir, tmp_path):
    path = str(tmp_path / "wide.pth")
    wide = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, dim=128, n_layers=2))
    atomic_save({k: v for k, v in wide.state_dict().items() if not k.startswith("vision_encoder.")}, path)
    expected = (f"{path} does not match the model (check --dim/--n_layers/--use_moe): the file has generation "
                "minimind2, dim 128, 2 layers, use_moe 0, linear projector; the model generation minimind2, dim 64, "
                "2 layers, use_moe 0, linear projector; missing: []; unexpected: []; other shape: [")
    with pytest.raises(CheckpointError, match=f"^{re.escape(expected)}"):
        load_weights(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), path)


@pytest.mark.slow
def test_resuming_with_other_model_flags_names_the_resume_file_and_the_flags(toy_data, tower_dir, tmp_path):
    launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path, epochs=1, stop_after_steps=1))
    resume = tmp_path / "pretrain_vlm_64_resume.pth"
    proc = launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path, epochs=1, n_layers=3, from_resume=1),
                  check=False)
    assert_one_line_error(proc, f"{resume} (its model weights) does not match the model (check --dim/--n_layers",
                          "the file has generation minimind2, dim 64, 2 layers", "the model generation minimind2, dim 64, 3 layers",
                          "missing: ['layers.2.")
    # The file names carry --dim, so only a copied (or renamed) resume file meets another --dim.
    shutil.copy(resume, tmp_path / "pretrain_vlm_128_resume.pth")
    proc = launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path, epochs=1, dim=128, from_resume=1),
                  check=False)
    assert_one_line_error(proc, "pretrain_vlm_128_resume.pth (its model weights) does not match the model",
                          "the file has generation minimind2, dim 64", "the model generation minimind2, dim 128", "other shape: ['")


@pytest.mark.slow
def test_a_truncated_resume_file_names_itself(toy_data, tower_dir, tmp_path):
    resume = tmp_path / "pretrain_vlm_64_resume.pth"
    torch.save({"state": {}}, resume)
    resume.write_bytes(resume.read_bytes()[:100])
    proc = launch("train_pretrain_vlm.py", flags(toy_data, tower_dir, tmp_path, from_resume=1), check=False)
    assert_one_line_error(proc, f"{resume} is not a valid resume file: truncated", "drop --from_resume 1")


# 7. The feature cache.

def toy_run(tmp_path, tower_dir, n=4, **flags):
    """The config of an in-process run of the tiny model on n toy samples (one epoch, batch 1, CPU, fp32)."""
    data_path, images = make_toy_data(tmp_path / "data", n=n)
    return config(data_path=data_path, images_path=images, out_dir=str(tmp_path / "out"), vision_model_path=tower_dir,
                  tokenizer_path="model", num_workers=0, log_interval=1, batch_size=1, **TINY_LLM, **flags)


def test_a_damaged_feature_cache_ends_the_run_in_one_line_and_one_cut_short_is_encoded_again(tower_dir, tmp_path,
                                                                                              capsys):
    from dataset.feature_cache import open_cache_for
    from model.images import load_processor
    from model.model_vlm import load_vision_tower
    cfg = toy_run(tmp_path, tower_dir, cache_features=str(tmp_path / "cache"))
    cache = open_cache_for(load_vision_tower(tower_dir), load_processor(tower_dir), cfg.cache_features)
    cache.add("an image", torch.zeros(cache.row_shape))
    index = os.path.join(cache.dir, cache.writer[0] + ".idx")
    with open(index, "a") as f:
        f.write('{"key": "another image", "row": 1}\n')  # a row the .bin does not hold
    trainer.loop.train_epochs(trainer.build.build_run(cfg, trainer.distributed.Cluster()))
    assert (f"1 images cached; note: 1 cached rows are not in their .bin file, cut short? (e.g. {index}:2: row 1); "
            f"those images are encoded again") in capsys.readouterr().out
    with open(index, "a") as f:
        f.write('{"row": 2}\n')
    with pytest.raises(SystemExit, match=f"^error: {re.escape(index)}:3: no \"key\" string, not a line of a "
                                         f"feature-cache index: delete the folder {re.escape(cache.dir)}, and"):
        trainer.main.launch(cfg)


# 8. Skipped samples.

def test_a_step_whose_samples_were_all_skipped_is_not_taken_and_not_logged(tower_dir, tmp_path, capsys):
    cfg = toy_run(tmp_path, tower_dir, n=2, skip_bad_samples=1)
    for image in (tmp_path / "data" / "images").iterdir():
        image.write_bytes(b"not a png")  # opened only when the sample is used: skipped then
    run = trainer.build.build_run(cfg, trainer.distributed.Cluster())
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    trainer.loop.train_epochs(run)
    assert all(torch.equal(v, before[k]) for k, v in run.model.state_dict().items())  # not even weight decay
    assert not run.engine.optimizer.state and run.state["step"] == 0
    out = capsys.readouterr().out
    assert " loss " not in out and read_log(tmp_path / "out" / "unit_64_log.jsonl") == []
    assert "epoch 1: skipped 2 samples, e.g. " in out and out.rstrip().endswith(
        "; optimizer steps not taken, every sample of them skipped: 2")


def test_a_run_with_an_empty_step_logs_every_step_it_takes_up_to_its_last(tower_dir, tmp_path, capsys):
    cfg = toy_run(tmp_path, tower_dir, n=4, skip_bad_samples=1)
    (tmp_path / "data" / "images" / "2.png").write_bytes(b"not a png")
    trainer.loop.train_epochs(trainer.build.build_run(cfg, trainer.distributed.Cluster()))
    log = read_log(tmp_path / "out" / "unit_64_log.jsonl")
    assert [(r["step"], r["total_steps"]) for r in log[1:]] == [(2, 3), (3, 3)] and all(r["loss"] > 1 for r in log)
    assert "not taken, every sample of them skipped: 1" in capsys.readouterr().out
