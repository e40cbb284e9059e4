"""Multi-process training on CPU, as CI runs it: torchrun (DDP over gloo, the same code path as NCCL)
and DeepSpeed (ZeRO-2 under the deepspeed launcher, ZeRO-3 in one process without a launcher).
Every run is the real script in a subprocess on toy data with the tiny tower and LLM; a rank that
waits forever in a collective shows up as a timeout, not as a stuck CI job.

The 1-process reference (batch 4) and the 2-process runs (batch 2 each) see the same global batches
in the same order: ResumableBatchSampler cuts one permutation per (seed, epoch) into global batches.
They run in float32 so that the comparison measures the distributed logic, not bf16 rounding of
differently shaped (differently padded) batches.
"""
import json
import os

import pytest
import torch

from conftest import ROOT, TINY_LLM, assert_losses_match, flags, free_port, launch, read_log, write_image

pytestmark = pytest.mark.slow  # every test here runs the scripts under torchrun or DeepSpeed

def load_for_eval(path, tower_dir):
    """Load a .pth the way eval_vlm.py does."""
    from cli import add_model_args
    from model.inference import load_model
    import argparse
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--weight", str(path), "--vision_model_path", tower_dir, "--device", "cpu", "--dtype", "float32"])
    model, _, _ = load_model(args)
    return model


@pytest.fixture(scope="module")
def data(mixed_toy_data):
    """12 samples, 3 global batches of 4 per epoch, the very first micro-batch text-only (see conftest)."""
    return mixed_toy_data


@pytest.fixture(scope="module")
def reference(one_process_reference):
    """The uninterrupted 1-process pretrain run every distributed run is compared with (6 steps)."""
    return one_process_reference


def test_two_process_pretrain_matches_one_process(data, tower_dir, reference, tmp_path):
    """2 processes x batch 2 == 1 process x batch 4, step by step.

    Why not bit-exact: each rank's loss is a mean over *its* supervised tokens and DDP then averages
    gradients over ranks, so a rank with fewer tokens would weigh each of them more. The trainer
    weighs every rank's tokens by world / global tokens (trainer.loop.train_step),
    which makes the averaged gradient that of the global token mean, and logs the mean over ranks,
    which is then the global token mean too. What is left is float rounding: different reduction
    order (per-rank sums, then the all-reduce), different padding per batch, and under bf16 autocast
    differently shaped matmuls; hence a tolerance, not equality."""
    launch("train_pretrain_vlm.py", flags(data, tower_dir, tmp_path, batch_size=2), nproc=2, launcher="torchrun")
    diff = assert_losses_match(read_log(tmp_path / "pretrain_vlm_64_log.jsonl"),
                               read_log(reference / "pretrain_vlm_64_log.jsonl"))
    print(f"max |loss(2 procs) - loss(1 proc)| = {diff:.2e}")
    model = load_for_eval(tmp_path / "pretrain_vlm_64.pth", tower_dir)
    ref = torch.load(reference / "pretrain_vlm_64.pth")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")}
    assert set(state) == set(ref)  # diverging names would otherwise compare nothing
    assert all(torch.allclose(v, ref[k], atol=1e-4) for k, v in state.items())


def make_awkward_data(root):
    """8 samples for 2 ranks x batch 2 that make one rank's batch all-skipped (too long for
    --max_seq_len 300) in one step and one rank's batch text-only (no image) in another."""
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    for i, color in enumerate(["red", "green", "blue", "yellow"] * 2):
        if i < 6:
            write_image(images / f"{i}.png", color)
        question = "<image>\nWhat color is it?" + (" please" * 150 if i < 2 else "") if i < 6 else "Name a color."
        lines.append(json.dumps({"conversations": [{"role": "user", "content": question},
                                                   {"role": "assistant", "content": color}],
                                 "image": f"{i}.png" if i < 6 else ""}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "data.jsonl"), str(images)


def test_two_process_sft_survives_an_all_skipped_batch_and_a_batch_without_images(tower_dir, tokenizer, processor,
                                                                                   tmp_path):
    from dataset.vlm_dataset import VLMDataset
    from model.chat import resolve_image_token_id
    from dataset.sampler import ResumableBatchSampler
    data = make_awkward_data(tmp_path / "data")
    # First check the data does what this test is about, with the trainer's own dataset and sampler.
    ds = VLMDataset(*data, tokenizer, processor, resolve_image_token_id(tokenizer), 196, 300, True)
    per_rank = []
    for rank in (0, 1):
        sampler = ResumableBatchSampler(ds.lengths, 2, seed=7, rank=rank, world_size=2)
        sampler.set_epoch(0)
        per_rank.append(list(sampler))
    all_skipped = [[all("skip" in ds[i] for i in b) for b in batches] for batches in per_rank]
    no_images = [[all(not ds.source.get(i).images for i in b) for b in batches] for batches in per_rank]
    assert all_skipped == [[True, False], [False, False]] and no_images == [[False, False], [False, True]]

    # Both micro-batches make one optimizer step: the first runs under no_sync, the second all-reduces.
    out = tmp_path / "out"
    proc = launch("train_sft_vlm.py", flags(data, tower_dir, out, batch_size=2, accumulation_steps=2, epochs=1,
                                            max_seq_len=300, skip_bad_samples=1, dtype="bfloat16"),
                  nproc=2, launcher="torchrun")
    assert "epoch 1: skipped 2 samples" in proc.stdout and "world 2" in proc.stdout
    assert [r["step"] for r in read_log(out / "sft_vlm_64_log.jsonl")] == [1]
    load_for_eval(out / "sft_vlm_64.pth", tower_dir)


def test_resume_with_fewer_processes_continues_at_the_right_sample(data, tower_dir, reference, tmp_path):
    """2 processes stop after 2 of 6 steps (mid-epoch 1); 1 process with the same global batch (4)
    resumes: same samples, same step count, restored AdamW state, hence the uninterrupted losses."""
    launch("train_pretrain_vlm.py", flags(data, tower_dir, tmp_path, batch_size=2, stop_after_steps=2),
           nproc=2, launcher="torchrun")
    proc = launch("train_pretrain_vlm.py", flags(data, tower_dir, tmp_path, from_resume=1))
    assert "resumed from" in proc.stdout and "step 2, 8 samples into the epoch (saved by 2 processes, now 1)" in proc.stdout
    assert_losses_match(read_log(tmp_path / "pretrain_vlm_64_log.jsonl"),
                        read_log(reference / "pretrain_vlm_64_log.jsonl"))


def test_deepspeed_zero3_one_process_trains_resumes_and_matches_plain_training(data, tower_dir, reference, tmp_path):
    """ZeRO-3 without a launcher (the trainer makes a process group of one), batch 2 x 2 accumulation
    steps. float32, so it must reproduce the plain batch-4 run: the frozen tower, kept out of the
    engine, feeds the same image features, accumulation weighs every token of the step alike, a
    micro-batch without images works (the projection is used outside its module), and resuming
    from DeepSpeed's own checkpoint continues the same trajectory."""
    args = flags(data, tower_dir, tmp_path, batch_size=2, accumulation_steps=2, deepspeed="ds_config/zero3.json")
    launch("train_pretrain_vlm.py", args + ["--stop_after_steps", 3])
    assert os.path.isfile(tmp_path / "pretrain_vlm_64_ds_resume" / "latest")
    proc = launch("train_pretrain_vlm.py", args + ["--from_resume", 1])
    assert "resumed from" in proc.stdout and "step 3" in proc.stdout
    log = read_log(tmp_path / "pretrain_vlm_64_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"] - 0.5
    assert_losses_match(log, read_log(reference / "pretrain_vlm_64_log.jsonl"))
    sd, ref = torch.load(tmp_path / "pretrain_vlm_64.pth"), torch.load(reference / "pretrain_vlm_64.pth")
    assert sd.keys() == ref.keys() and all(v.dtype == torch.float32 for v in sd.values())
    assert all(torch.allclose(sd[k], ref[k], atol=1e-4) for k in ref)
    load_for_eval(tmp_path / "pretrain_vlm_64.pth", tower_dir)


def test_deepspeed_zero2_two_processes_bf16_sft(data, tower_dir, tmp_path):
    """ZeRO-2 under `deepspeed --num_gpus 2` (it passes --local_rank), bf16 from the config's
    "auto", only the last layer and the projection trained: the loss goes down, and the frozen
    weights come out bit-identical in fp32 although DeepSpeed held them only in bf16."""
    launch("train_sft_vlm.py", flags(data, tower_dir, tmp_path, batch_size=2, freeze_llm=1, dtype="bfloat16",
                                     deepspeed="ds_config/zero2.json"), nproc=2, launcher="deepspeed")
    log = read_log(tmp_path / "sft_vlm_64_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 7)) and log[-1]["loss"] < log[0]["loss"] - 0.2
    torch.manual_seed(7)  # the run's --seed: the same random initial weights
    from model.model_vlm import MiniMindVLM, VLMConfig
    init = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)).state_dict()
    sd = torch.load(tmp_path / "sft_vlm_64.pth")
    trained = {k for k in sd if k.startswith(("layers.1.", "vision_proj."))}
    assert all(torch.equal(sd[k], init[k]) for k in sd.keys() - trained)
    assert all(not torch.equal(sd[k], init[k]) for k in trained)
    assert all(v.dtype == torch.float32 for v in sd.values())
    load_for_eval(tmp_path / "sft_vlm_64.pth", tower_dir)


@pytest.fixture(scope="module")
def lora_reference(data, tower_dir, tmp_path_factory):
    """A 1-process LoRA SFT run (rank 4, fp32, batch 4) from random weights: what the distributed
    LoRA runs must reproduce."""
    out = tmp_path_factory.mktemp("lora_ref")
    launch("train_sft_vlm.py", flags(data, tower_dir, out, lora_rank=4, freeze_llm=2))
    return out


@pytest.mark.parametrize("how", ["torchrun", "zero2", "zero3"])
def test_lora_sft_under_ddp_and_deepspeed_matches_one_process(data, tower_dir, lora_reference, tmp_path, how):
    """LoRA adapters train the same under DDP (2 processes x batch 2), DeepSpeed ZeRO-2 and ZeRO-3
    (batch 2 x 2 accumulation steps): the same losses, the same merged .pth and adapter file."""
    args = flags(data, tower_dir, tmp_path, lora_rank=4, freeze_llm=2, batch_size=2)
    if how == "torchrun":
        launch("train_sft_vlm.py", args, nproc=2, launcher="torchrun")
    else:
        launch("train_sft_vlm.py", args + ["--accumulation_steps", 2, "--deepspeed", f"ds_config/{how}.json"])
    assert_losses_match(read_log(tmp_path / "sft_vlm_64_log.jsonl"), read_log(lora_reference / "sft_vlm_64_log.jsonl"))
    from safetensors.torch import load_file
    for name, load in (("sft_vlm_64.pth", torch.load), ("sft_vlm_64_lora.safetensors", load_file)):
        got, ref = load(tmp_path / name), load(lora_reference / name)
        assert got.keys() == ref.keys() and all(torch.allclose(got[k], ref[k], atol=1e-4) for k in ref), name


def test_ddp_does_not_broadcast_the_rope_buffers(tiny_vlm, monkeypatch):
    """The engine's DDP wrapper leaves buffers alone: the RoPE tables are the same on every rank.
    A 1-process gloo group stands in for the real one; the engine is told it has two ranks."""
    import torch.distributed as dist
    import trainer.engines
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setattr(trainer.engines, "world_size", lambda: 2)
        model = tiny_vlm.train()
        engine = trainer.engines.TorchEngine(model, list(model.parameters()), "cpu", "unused", learning_rate=1e-3,
                                             dtype="float32", grad_clip=1.0)
        assert isinstance(engine.ddp, torch.nn.parallel.DistributedDataParallel)
        assert any(n.endswith("rope_cos") for n, _ in model.named_buffers())
        assert engine.ddp.broadcast_buffers is False and not engine.ddp.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_buffer_sizes_follow_the_model_width(tiny_vlm, tmp_path, stage):
    """The shipped configs' "auto" (or missing) bucket sizes are filled from the LLM's width as HF
    Trainer fills them; a concrete value is kept."""
    from trainer.engines import deepspeed_config
    flags = dict(batch_size=2, accumulation_steps=1, grad_clip=1.0, dtype="bfloat16")
    hidden = tiny_vlm.config.dim
    zero = deepspeed_config(os.path.join(ROOT, f"ds_config/zero{stage}.json"), 1, hidden, **flags)["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden ** 2 == 4096
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == 3686 and zero["stage3_param_persistence_threshold"] == 640
    else:
        assert zero["allgather_bucket_size"] == 4096
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1000}}))
    zero = deepspeed_config(path, 1, hidden, **flags)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1000 and zero["stage3_prefetch_bucket_size"] == 3686
