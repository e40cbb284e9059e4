"""The trainer's pieces, imported directly: schedule, token weighting, step counting, resume state,
checkpoint policy, the tower kept apart from the trained module, and the entry point. No
subprocesses: the whole file runs in seconds."""
import contextlib
import copy
import dataclasses
import math
import os
import random

import numpy as np
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
import trainer.schedule
from builders import checkpointer, config, tiny_run
from conftest import ROOT, TINY_LLM, make_toy_data
from dataset.vlm_dataset import collate_batch
from dataset.sampler import ResumableBatchSampler
from model.checkpoint import llm_state_dict
from model.paths import RunFiles
from trainer.engines import TorchEngine


def test_cache_features_takes_0_1_or_a_folder(tower_dir, tmp_path, monkeypatch):
    from model.images import load_processor
    from model.model_vlm import load_vision_tower
    parser = trainer.config.build_parser("t")
    assert parser.parse_args([]).cache_features == "0" and parser.parse_args(["--cache_features"]).cache_features == "1"
    tower, processor = load_vision_tower(tower_dir), load_processor(tower_dir)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"
    forms = {"0": ["--cache_features", "0"], "1": ["--cache_features", "1"], "bare": ["--cache_features"],
             "folder": ["--cache_features", str(tmp_path / "mine")]}
    opened = {}
    for form, flags in forms.items():  # as the command line gives them
        defaults = {**vars(config()), "out_dir": str(out)}
        cfg = trainer.config.parse(trainer.config.build_parser("t", **defaults), flags)
        opened[form] = trainer.build.open_feature_cache(cfg, tower, processor, False)
    assert opened["0"] is None
    assert opened["1"].dir.startswith(str(out / "feature_cache")) and opened["bare"].dir == opened["1"].dir
    assert opened["folder"].dir.startswith(str(tmp_path / "mine"))
    assert not (tmp_path / "0").exists() and not (tmp_path / "1").exists()  # no folders named after the switch


# 1. The learning-rate schedule.

def test_lr_warms_up_linearly_then_follows_a_cosine_down_to_a_tenth():
    lr, warmup = 1e-3, 0.1
    assert trainer.schedule.lr_at(0.0, lr, warmup) == pytest.approx(lr * 0.01)  # never exactly 0: the first step moves
    assert trainer.schedule.lr_at(0.05, lr, warmup) == pytest.approx(lr / 2)
    assert trainer.schedule.lr_at(warmup, lr, warmup) == pytest.approx(lr)
    assert trainer.schedule.lr_at(0.55, lr, warmup) == pytest.approx(lr * 0.55)  # half-way down the cosine
    assert trainer.schedule.lr_at(1.0, lr, warmup) == pytest.approx(lr / 10)
    assert trainer.schedule.lr_at(1.2, lr, warmup) == pytest.approx(lr / 10)  # past the end it stays at the floor
    after = [trainer.schedule.lr_at(warmup + i / 100 * (1 - warmup), lr, warmup) for i in range(101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_lr_with_a_decay_ratio_holds_at_the_peak_then_falls_to_a_tenth_over_that_last_fraction():
    lr, warmup, decay = 1e-3, 0.1, 0.2  # warmup-stable-decay
    assert trainer.schedule.lr_at(0.05, lr, warmup, decay) == pytest.approx(lr / 2)
    assert trainer.schedule.lr_at(0.5, lr, warmup, decay) == pytest.approx(lr)
    assert trainer.schedule.lr_at(0.8, lr, warmup, decay) == pytest.approx(lr)
    assert trainer.schedule.lr_at(0.9, lr, warmup, decay) == pytest.approx(lr * 0.55)
    assert trainer.schedule.lr_at(1.0, lr, warmup, decay) == pytest.approx(lr / 10)
    # decay 1 is the plain cosine from the end of the warmup
    assert trainer.schedule.lr_at(0.55, lr, warmup, 1.0) == trainer.schedule.lr_at(0.55, lr, warmup)


# 2. Token weighting: every supervised token of a step weighs the same, its micro-batches fetched lazily.

@pytest.mark.parametrize("use_moe", [0, 1])
def test_a_step_has_the_gradient_of_its_token_mean_though_its_micro_batches_come_one_by_one(
        tower_dir, tmp_path, use_moe):
    """The gradient the trainer steps with is that of the mean over all supervised tokens of the
    step, as a step computed it from all its micro-batches at once. (The MoE balance loss in a
    micro-batch's loss weighs in like its tokens: it was a plain mean over micro-batches before.)"""
    run = tiny_run(tower_dir, tmp_path, accumulation_steps=3, batch_size=2, grad_clip=0, use_moe=use_moe)
    micro_batches = list(next(trainer.schedule.optimizer_steps(run.loader, len(run.sampler), 3)))
    counts = [b["n_supervised"] for b in micro_batches]
    assert len(micro_batches) == 3 and len(set(counts)) > 1  # uneven: a per-micro-batch mean would differ
    reference = copy.deepcopy(run.model)
    for b in micro_batches:
        out = reference(input_ids=b["input_ids"], labels=b["labels"], image_features=run.encoder(b, "cpu"),
                        image_mask=b["image_mask"])
        (out.loss * b["n_supervised"] / sum(counts)).backward()
    stepped = []
    run.engine.optimizer.register_step_pre_hook(lambda *_: stepped.append(
        {n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None}))
    assert trainer.loop.train_step(run, 0, micro_batches, 0).applied
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert stepped[0].keys() == expected.keys()
    # Equal up to float rounding (summed in another order): relative to each gradient's size.
    assert all((stepped[0][n] - g).norm() <= 1e-5 * g.norm() for n, g in expected.items())


def test_a_steps_micro_batches_are_taken_from_the_loader_only_as_they_are_used(tower_dir, tmp_path, monkeypatch):
    run = tiny_run(tower_dir, tmp_path, accumulation_steps=3, batch_size=2)
    events = []

    def loader():
        for i, batch in enumerate(run.loader):
            events.append(f"fetch {i}")
            yield batch
    forward_backward = trainer.loop.forward_backward
    monkeypatch.setattr(trainer.loop, "forward_backward", lambda *args: events.append("use") or forward_backward(*args))
    steps = trainer.schedule.optimizer_steps(loader(), len(run.sampler), 3)
    assert trainer.loop.train_step(run, 0, next(steps), 0).applied
    assert events == ["fetch 0", "use", "fetch 1", "use", "fetch 2", "use"]  # not three fetches, then three uses


# 3. Step counting.

def test_micro_batches_group_into_steps_and_a_short_last_group_closes_one():
    batches = list(range(7))
    groups = lambda k: [list(g) for g in trainer.schedule.optimizer_steps(batches, len(batches), k)]  # noqa: E731
    assert groups(3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert groups(1) == [[b] for b in batches]
    assert groups(10) == [batches]
    assert [len(group) for group in trainer.schedule.optimizer_steps(batches, len(batches), 3)] == [3, 3, 1]


@pytest.mark.parametrize("n, batch, world, accumulation", [(13, 1, 2, 3), (12, 2, 2, 3), (12, 4, 1, 1), (5, 2, 3, 2)])
def test_total_steps_counts_the_groups_every_rank_steps_through(n, batch, world, accumulation):
    epochs = 3
    per_epoch = set()
    for rank in range(world):
        sampler = ResumableBatchSampler([1] * n, batch, rank=rank, world_size=world, accumulation_steps=accumulation)
        sampler.set_epoch(0)
        per_epoch.add(len(list(trainer.schedule.optimizer_steps(sampler, len(sampler), accumulation))))
    assert len(per_epoch) == 1  # every rank takes the same number of steps (no rank waits in a collective)
    total = trainer.schedule.total_steps(n, batch * world, accumulation, epochs)
    assert total == per_epoch.pop() * epochs == math.ceil(math.ceil(n / (batch * world)) / accumulation) * epochs


# 4. Resume state: RNG streams and the config survive a weights_only round trip.

def draws():
    return random.random(), np.random.rand(), torch.rand(1).item()


def test_rng_streams_round_trip_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gaussian in the python state
    torch.save({"rng": [trainer.distributed.rng_state()]}, tmp_path / "r.pth")
    expected = draws()
    trainer.distributed.seed_all(9)
    trainer.distributed.set_rng_state(torch.load(tmp_path / "r.pth", weights_only=True)["rng"], rank=0, world=1, seed=0)
    assert draws() == expected


def test_a_world_size_change_reseeds_each_rank_instead():
    saved = [trainer.distributed.rng_state(), trainer.distributed.rng_state()]  # by 2 processes
    trainer.distributed.set_rng_state(saved, rank=0, world=1, seed=100)
    resumed = draws()
    trainer.distributed.seed_all(100)
    assert resumed == draws()


def test_the_config_round_trips_through_a_resume_files_plain_args(tmp_path):
    cfg = config(deepspeed="ds_config/zero2.json", cache_features="auto", learning_rate=3e-4, max_seq_len=640)
    torch.save({"args": trainer.config.plain_args(cfg)}, tmp_path / "r.pth")
    assert trainer.config.TrainConfig(**torch.load(tmp_path / "r.pth", weights_only=True)["args"]) == cfg


# 5. Checkpoints: the periodic-vs-final policy, and save -> resume in one place.

def test_a_saved_checkpoint_resumes_weights_state_and_random_streams(tower_dir, tmp_path, capsys):
    from model.model_vlm import MiniMindVLM, VLMConfig
    cfg = config(out_dir=str(tmp_path), vision_model_path=tower_dir, **TINY_LLM)
    torch.manual_seed(0)
    saver = checkpointer(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), cfg, tmp_path)
    state = {"epoch": 1, "samples_seen": 4, "step": 5, "wandb_id": None}
    trainer.distributed.seed_all(7)
    saver.save(state, "stop")
    expected = draws()
    assert f"saved {tmp_path / 'unit_64.pth'} and {tmp_path / 'unit_64_resume.pth'}" in capsys.readouterr().out
    resume = torch.load(tmp_path / "unit_64_resume.pth", weights_only=True)
    assert trainer.config.TrainConfig(**resume["args"]) == cfg

    torch.manual_seed(1)  # other initial weights, other random streams: the resume restores both
    loader = checkpointer(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), cfg, tmp_path)
    assert loader.resume() == state
    assert draws() == expected
    saved, restored = torch.load(tmp_path / "unit_64.pth"), llm_state_dict(loader.engine.model)
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)


def test_resuming_without_a_resume_file_says_so(tower_dir, tmp_path):
    from model.model_vlm import MiniMindVLM, VLMConfig
    cfg = config(out_dir=str(tmp_path), vision_model_path=tower_dir, **TINY_LLM)
    with pytest.raises(FileNotFoundError, match="--from_resume 1 but .*unit_64_resume.pth does not exist"):
        checkpointer(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), cfg, tmp_path).resume()


# 6. The vision tower runs outside the trained module, with the same result.

def test_build_model_keeps_the_frozen_tower_apart_and_its_features_match_the_models_own(tower_dir, tokenizer,
                                                                                          tiny_vlm):
    cfg = config(vision_model_path=tower_dir, freeze_llm=1, **TINY_LLM)
    model, tower = trainer.build.build_model(cfg, tokenizer, "cpu")
    assert model.vision_encoder is None and not any(k.startswith("vision_encoder.") for k in model.state_dict())
    assert not any(p.requires_grad for p in tower.parameters()) and not tower.training
    trainable = {".".join(n.split(".")[:2]) for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"layers.1", "vision_proj.vision_proj"}  # --freeze_llm 1: last layer + projection

    pixels = torch.randn(2, 3, 224, 224)
    encoder = trainer.build.ImageEncoder(tiny_vlm.vision_encoder, contextlib.nullcontext())
    features = encoder({"pixel_values": pixels}, "cpu")
    assert torch.equal(features, tiny_vlm.encode_images(pixels))  # [2, image_token_count, C]
    assert encoder({"pixel_values": torch.zeros(0, 3, 1, 1)}, "cpu") is None  # a batch without images


def test_a_model_from_scratch_takes_the_generation_asked_for_and_a_checkpoint_its_own(tower_dir, tokenizer,
                                                                                     tmp_path):
    from model.checkpoint import infer_config_from_state_dict
    model, _ = trainer.build.build_model(config(vision_model_path=tower_dir, **TINY_LLM), tokenizer, "cpu")
    assert model.config.generation == "minimind2" and not model.config.qk_norm  # the default
    cfg = config(vision_model_path=tower_dir, generation="minimind3", **TINY_LLM)
    model, _ = trainer.build.build_model(cfg, tokenizer, "cpu")
    assert model.config.qk_norm and model.config.n_kv_heads == 4
    found = infer_config_from_state_dict(model.state_dict())
    assert found["generation"] == "minimind3" and found["n_kv_heads"] == 4  # what a saved file says of itself
    path = tmp_path / "llm.pth"
    torch.save(trainer.build.build_model(config(vision_model_path=tower_dir, **TINY_LLM), tokenizer, "cpu")[0]
               .state_dict(), path)
    cfg = config(vision_model_path=tower_dir, generation="minimind3", from_weight=str(path), **TINY_LLM)
    with pytest.raises(ValueError, match=r"--generation minimind3: .*llm.pth is a minimind2 model; drop --generation"):
        trainer.build.build_model(cfg, tokenizer, "cpu")


def test_the_forward_with_trainer_encoded_features_gives_the_pixel_forward_loss(tiny_vlm):
    n = tiny_vlm.config.image_token_count
    ids = torch.tensor([[1] + [tiny_vlm.config.image_token_id] * n + [5, 6, 7]])
    pixels = torch.randn(1, 3, 224, 224)
    encoder = trainer.build.ImageEncoder(tiny_vlm.vision_encoder, contextlib.nullcontext())
    features = encoder({"pixel_values": pixels}, "cpu")
    with torch.no_grad():
        by_pixels = tiny_vlm(input_ids=ids, labels=ids, pixel_values=pixels).loss
        by_features = tiny_vlm(input_ids=ids, labels=ids, image_features=features).loss
    assert torch.equal(by_pixels, by_features)


def test_the_feature_cache_path_encodes_only_uncached_images(tower_dir, tmp_path, processor, tiny_vlm):
    from dataset.feature_cache import open_cache_for
    cache = open_cache_for(tiny_vlm.vision_encoder, processor, str(tmp_path))
    encoder = trainer.build.ImageEncoder(tiny_vlm.vision_encoder, contextlib.nullcontext(), cache)
    pixels = torch.randn(2, 3, 224, 224)
    cold = encoder({"pixel_values": pixels, "image_keys": ["a", "b"], "cached": [None, None]}, "cpu")
    warm = encoder({"pixel_values": torch.zeros(0, 3, 224, 224), "image_keys": ["a", "b"],
                    "cached": [cache.lookup("a"), cache.lookup("b")]}, "cpu")
    assert len(cache) == 2 and torch.equal(cold, warm)


def test_the_forward_with_the_collates_slots_and_positions_gives_the_mask_forward_loss(tiny_vlm):
    n = tiny_vlm.config.image_token_count
    ids = torch.tensor([1] + [tiny_vlm.config.image_token_id] * n + [5, 6, 7])
    item = {"input_ids": ids, "labels": ids, "image_mask": ids == tiny_vlm.config.image_token_id,
            "pixel_values": torch.randn(1, 3, 224, 224), "image_keys": [None], "cached": [None]}
    batch = collate_batch([item, {**item, "labels": torch.full_like(ids, -100)}], image_token_count=n)
    with torch.no_grad():
        by_mask = tiny_vlm(input_ids=batch["input_ids"], labels=batch["labels"], image_mask=batch["image_mask"],
                           pixel_values=torch.cat([item["pixel_values"]] * 2)).loss
        by_indices = tiny_vlm(input_ids=batch["input_ids"], labels=batch["labels"], supervised=batch["supervised"],
                              image_slots=batch["image_slots"], pixel_values=torch.cat([item["pixel_values"]] * 2)).loss
    assert torch.allclose(by_mask, by_indices)
    with pytest.raises(ValueError, match=f"^{2 * n} image slots for 1 images of {n} features each$"):
        tiny_vlm(input_ids=batch["input_ids"], image_slots=batch["image_slots"], pixel_values=item["pixel_values"])


def test_the_collate_refuses_a_sample_whose_placeholders_do_not_fit_its_images():
    ids = torch.arange(10)
    item = {"input_ids": ids, "labels": ids, "image_mask": ids < 4, "pixel_values": torch.zeros(1, 3, 8, 8),
            "image_keys": [None], "cached": [None]}
    collate_batch([item], image_token_count=4)  # 4 slots, one image of 4: fits
    with pytest.raises(ValueError, match="a sample has 4 image placeholder tokens for 1 images: each image needs "
                                         "exactly 3"):
        collate_batch([item], image_token_count=3)


def test_a_non_finite_step_is_skipped_on_the_device_leaving_weights_and_optimizer_alone():
    model = torch.nn.Linear(3, 1)
    params = list(model.parameters())
    engine = TorchEngine(model, params, "cpu", "unused", learning_rate=1e-3, dtype="float32", grad_clip=1.0)
    for loss_ok, grad, applied in [(True, 1.0, True), (False, 1.0, False), (True, float("nan"), False)]:
        before = [p.detach().clone() for p in params]
        moments = [engine.optimizer.state[p]["exp_avg"].clone() for p in params] if engine.optimizer.state else None
        for p in params:
            p.grad = torch.full_like(p, grad)
        result = engine.step(1e-2, torch.tensor(loss_ok))
        assert torch.is_tensor(result) and bool(result) == applied  # a device flag: the caller reads it when it wants
        assert all(torch.equal(a, p) for a, p in zip(before, params)) != applied
        if not applied:
            assert all(torch.equal(m, engine.optimizer.state[p]["exp_avg"]) for m, p in zip(moments, params))
            assert all(engine.optimizer.state[p]["step"] == 1 for p in params)
        assert all(p.grad is None for p in params)


# 7. The entry point: one config object, and how a run ends.

def test_main_hands_train_a_config_and_turns_stops_into_exit_codes(monkeypatch):
    seen = []
    monkeypatch.setattr(trainer.loop, "train", seen.append)
    trainer.main.main(trainer.config.build_parser("test", epochs=2), ["--dim", "64", "--use_moe"])
    (cfg,) = seen
    assert isinstance(cfg, trainer.config.TrainConfig) and (cfg.dim, cfg.use_moe, cfg.epochs) == (64, 1, 2)
    with pytest.raises(dataclasses.FrozenInstanceError):  # read-only: nothing changes the flags mid-run
        cfg.dim = 32

    def stop(exit_code, message=None):
        def train(_cfg):
            raise trainer.errors.StopTraining(message, exit_code)
        return train

    monkeypatch.setattr(trainer.loop, "train", stop(130))
    with pytest.raises(SystemExit) as info:
        trainer.main.main(trainer.config.build_parser("test"), [])
    assert info.value.code == 130
    monkeypatch.setattr(trainer.loop, "train", stop(1, "3 consecutive non-finite steps"))
    with pytest.raises(SystemExit, match="^error: 3 consecutive non-finite steps$"):
        trainer.main.main(trainer.config.build_parser("test"), ["--debug"])  # not a traceback: a deliberate stop


def test_a_missing_start_weight_is_an_exception_naming_the_file_and_the_fix(tmp_path):
    cfg = config(out_dir=str(tmp_path), from_weight="pretrain_vlm", dim=64)
    with pytest.raises(FileNotFoundError, match=r"pretrain_vlm_64.pth not found\. Run train_pretrain_vlm.py first"):
        trainer.build.start_weights(cfg)


def test_a_tokenizer_other_than_the_start_weights_record_names_is_refused_with_the_fixes_training_has(
        tower_dir, tmp_path):
    import shutil
    from model.model_vlm import VLMConfig
    from model.record import RecordError, make_record, write_record
    out = tmp_path / "out"
    out.mkdir()
    (out / "pretrain_vlm_64.pth").write_bytes(b"")  # the record is read first: the weights are not opened
    write_record(make_record(VLMConfig(**TINY_LLM), "model", tower_dir), str(out / "pretrain_vlm_64.pth"))
    other = tmp_path / "tokenizer"
    shutil.copytree(os.path.join(ROOT, "model"), other, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    with open(other / "tokenizer_config.json", "a") as f:
        f.write("\n")  # other bytes: another tokenizer as far as the record can tell
    cfg = config(out_dir=str(out), from_weight="pretrain_vlm", tokenizer_path=str(other), **TINY_LLM)
    with pytest.raises(RecordError) as error:
        trainer.loop.train(cfg)
    assert str(error.value).endswith(f"but --tokenizer_path {other} holds another one; pass the recorded one (or drop "
                                     f"--tokenizer_path)")  # no --ignore_record: the train scripts have no such flag


def test_the_toy_data_loads_through_the_trainers_own_data_pieces(tower_dir, tokenizer, processor, tmp_path):
    data_path, images = make_toy_data(tmp_path, n=6)
    cfg = config(data_path=data_path, images_path=images, batch_size=2, num_workers=0, accumulation_steps=2)
    from model.model_vlm import VLMConfig
    vlm_config = VLMConfig(vision_model_path=tower_dir, image_token_id=3, **TINY_LLM)
    dataset = trainer.build.open_dataset(cfg, tokenizer, processor, vlm_config, None, is_main=False)
    sampler, loader = trainer.build.build_loader(cfg, dataset, tokenizer.pad_token_id or 0,
                                                 trainer.distributed.Cluster())
    sampler.set_epoch(0)
    steps = list(trainer.schedule.optimizer_steps(loader, len(sampler), cfg.accumulation_steps))
    assert [len(s) for s in steps] == [2, 1]  # 3 batches of 2: one full step, one short
    assert sum(b["n_samples"] for s in steps for b in s) == 6


# 8. Data that would train on nothing stops before the first step; data that loses much says so then.

def open_toy_dataset(tmp_path, tower_dir, tokenizer, processor, n_long, n_short, max_seq_len, is_main=True):
    from model.model_vlm import VLMConfig
    lines = ""
    for n, text_len in ((n_long, 150), (n_short, 1)):  # ~150 extra tokens, or 1; both name images 0.png...
        if n:
            path, images = make_toy_data(tmp_path, n=n, text_len=text_len)
            lines += open(path).read()
    data = tmp_path / "data.jsonl"
    data.write_text(lines)
    cfg = config(data_path=str(data), images_path=images, max_seq_len=max_seq_len)
    vlm_config = VLMConfig(vision_model_path=tower_dir, image_token_id=3, **TINY_LLM)
    return trainer.build.open_dataset(cfg, tokenizer, processor, vlm_config, None, is_main=is_main)


def test_data_of_which_no_sample_fits_max_seq_len_is_an_error_naming_the_file_and_the_flag(tower_dir, tokenizer,
                                                                                          processor, tmp_path):
    with pytest.raises(ValueError) as error:
        open_toy_dataset(tmp_path, tower_dir, tokenizer, processor, n_long=4, n_short=0, max_seq_len=100)
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'data.jsonl'}: no sample fits --max_seq_len 100: all 4 would be cut")
    assert "Raise --max_seq_len: " in message and "\n" not in message


def test_data_without_an_answer_to_learn_is_an_error_even_when_bad_samples_are_skipped(tower_dir, tokenizer,
                                                                                      processor, tmp_path):
    from model.model_vlm import VLMConfig
    data = tmp_path / "data.jsonl"
    data.write_text('{"conversations": [{"role": "user", "content": "hi"}]}\n' * 3)
    cfg = config(data_path=str(data), skip_bad_samples=1)
    with pytest.raises(ValueError, match=rf"^{data}: no usable samples: all 3 are bad, e.g. {data}:1: no non-empty "
                                         "assistant turn"):
        trainer.build.open_dataset(cfg, tokenizer, processor, VLMConfig(vision_model_path=tower_dir, image_token_id=3,
                                                                        **TINY_LLM), None, is_main=False)


def test_data_that_would_lose_more_than_a_few_percent_to_max_seq_len_says_so_before_training(
        tower_dir, tokenizer, processor, tmp_path, capsys):
    dataset = open_toy_dataset(tmp_path, tower_dir, tokenizer, processor, n_long=3, n_short=9, max_seq_len=300)
    out = capsys.readouterr().out
    assert "warning: 25% of the samples (3 of 12) do not fit --max_seq_len 300 and will be skipped" in out
    assert f"--max_seq_len {max(dataset.check_lengths().lengths)} keeps them all whole" in out  # and what to pass
    open_toy_dataset(tmp_path / "fits", tower_dir, tokenizer, processor, n_long=0, n_short=12, max_seq_len=300)
    assert "warning" not in capsys.readouterr().out


# 9. The rate and the ETA leave out the run's first step, which compiles (--use_compile 1) and starts up.

class Clock:
    """A stand-in for time.time that moves only when the test says: nothing depends on this machine's speed."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_the_first_step_is_left_out_of_the_rate_and_the_eta():
    clock = Clock()
    meter = trainer.logs.Meter(clock)
    step = trainer.loop.Step(loss=2.0, lr=1e-3, applied=True, stop=False, samples=4, tokens=400)
    clock.now += 60  # the first step compiles for a minute
    meter.add(step, done=4)
    clock.now += 1  # then a step a second
    meter.add(step, done=8)
    clock.now += 1
    meter.add(step, done=12)
    record = meter.report(1e-3, done=12, total=40)
    assert record["loss"] == 2.0  # the first step's loss counts: only its time is not representative
    assert record["samples_per_s"] == 4.0 and record["tokens_per_s"] == 400.0  # 8 samples in 2 s, not 12 in 62
    assert record["eta_s"] == 7.0  # 28 samples left at 4 a second (counting the compile, it would be 2.4 minutes)


def test_a_log_line_right_after_the_first_step_has_no_rate_or_eta_yet(tmp_path, capsys):
    clock = Clock()
    meter = trainer.logs.Meter(clock)
    clock.now += 60
    meter.add(trainer.loop.Step(loss=2.0, lr=1e-3, applied=True, stop=False, samples=4, tokens=400), done=4)
    record = meter.report(1e-3, done=4, total=40)
    assert record["loss"] == 2.0 and record["samples_per_s"] is record["tokens_per_s"] is record["eta_s"] is None
    logger = trainer.logs.Logger(config(), str(tmp_path / "log.jsonl"), None, enabled=True)
    logger.log({"epoch": 1, "step": 1, "total_steps": 10, **record})
    assert "step 1/10 loss 2.0000 lr 1.00e-03 first step of the run, not timed" in capsys.readouterr().out


def test_a_compiled_run_says_it_is_compiling_before_its_first_step(tower_dir, tmp_path, monkeypatch, capsys):
    from model.model_vlm import MiniMindVLM
    monkeypatch.setattr(MiniMindVLM, "compile_for_training", lambda self: None)  # what it says, not the minute
    data_path, images = make_toy_data(tmp_path, n=4)
    cfg = config(data_path=data_path, images_path=images, out_dir=str(tmp_path / "out"), vision_model_path=tower_dir,
                 tokenizer_path="model", num_workers=0, log_interval=1, use_compile=1, **TINY_LLM)
    trainer.loop.train_epochs(trainer.build.build_run(cfg, trainer.distributed.Cluster()))
    out = capsys.readouterr().out
    assert 0 <= out.find("compiling the model in the first step (about a minute, once") < out.find("step 1/2")
    assert "step 1/2 loss" in out and "first step of the run, not timed" in out.split("step 2/2")[0]
    assert "samples/s" in out.split("step 2/2")[1] and "eta 00:00:00" in out.split("step 2/2")[1]


def test_a_runs_files_are_named_from_one_stem_and_found_from_any_of_them(tmp_path):
    files = RunFiles.of(str(tmp_path), "sft_vlm", 512, use_moe=True)
    stem = str(tmp_path / "sft_vlm_512_moe")
    assert (files.weights, files.record, files.resume, files.ds_resume, files.log, files.adapter) == (
        stem + ".pth", stem + ".json", stem + "_resume.pth", stem + "_ds_resume", stem + "_log.jsonl",
        stem + "_lora.safetensors")
    assert RunFiles.from_file(files.adapter, "adapter").weights == files.weights  # what merge_lora looks up
    assert RunFiles.from_file(files.log, "log").stem == stem  # the wandb run's name
