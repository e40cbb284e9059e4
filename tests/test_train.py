"""The real training scripts, end to end on toy data: checkpoints, resume, logs, errors."""
import pytest
import torch

from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import load_weights

from conftest import TINY_LLM, launch, read_log, script_flags as common

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses


def test_two_step_pretrain_then_sft_write_loadable_checkpoints(toy_data, tower_dir, tmp_path):
    out = tmp_path / "out"
    pretrain = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, out, from_weight="none", epochs=1,
                                                      batch_size=6, freeze_llm=0))
    launch("train_sft_vlm.py", common(toy_data, tower_dir, out, epochs=1, batch_size=6))
    from model.precision import describe, resolve_dtype
    assert describe(*resolve_dtype("auto", "cpu")) in pretrain.stdout.splitlines()  # the default, said once
    for name in ("pretrain_vlm_64", "sft_vlm_64"):
        model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
        load_weights(model, str(out / f"{name}.pth"))
        log = read_log(out / f"{name}_log.jsonl")
        assert [r["step"] for r in log] == [1, 2]
        assert {"epoch", "loss", "lr", "samples_per_s", "tokens_per_s", "eta_s"} <= set(log[0])
    sd = torch.load(out / "sft_vlm_64.pth")
    assert not any(k.startswith("vision_encoder") for k in sd) and all(v.dtype == torch.float32 for v in sd.values())


def test_pretrain_trains_only_the_projection_and_last_layer_by_default(toy_data, tower_dir, tmp_path):
    out = tmp_path / "out"
    launch("train_pretrain_vlm.py", common(toy_data, tower_dir, out, from_weight="none", epochs=1))
    torch.manual_seed(42)  # the scripts' default seed: the same random init
    init = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)).state_dict()
    trained = torch.load(out / "pretrain_vlm_64.pth")
    changed = {k for k, v in trained.items() if not torch.equal(v, init[k])}
    assert "vision_proj.vision_proj.0.weight" in changed
    assert changed - {"vision_proj.vision_proj.0.weight"} and all(k.startswith("layers.1.") for k in changed - {"vision_proj.vision_proj.0.weight"})


def test_resumed_run_reproduces_the_uninterrupted_losses_and_weights(toy_data, tower_dir, tmp_path):
    args = dict(from_weight="none", freeze_llm=0, seed=7)
    launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "a", **args))
    launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "b", stop_after_steps=4, **args))
    assert len(read_log(tmp_path / "b" / "pretrain_vlm_64_log.jsonl")) == 4  # stopped mid-epoch 1 (6 steps/epoch)
    resumed = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "b", from_resume=1, **args))
    assert "resumed from" in resumed.stdout
    full = read_log(tmp_path / "a" / "pretrain_vlm_64_log.jsonl")
    split = read_log(tmp_path / "b" / "pretrain_vlm_64_log.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, 13))
    for a, b in zip(full, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5) and b["lr"] == pytest.approx(a["lr"])
    wa, wb = torch.load(tmp_path / "a" / "pretrain_vlm_64.pth"), torch.load(tmp_path / "b" / "pretrain_vlm_64.pth")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_missing_start_weights_explain_how_to_get_them(toy_data, tower_dir, tmp_path):
    proc = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path), check=False)
    assert proc.returncode != 0 and "lm_64.pth not found" in proc.stderr and "--from_weight none" in proc.stderr
    proc = launch("train_sft_vlm.py", common(toy_data, tower_dir, tmp_path), check=False)
    assert proc.returncode != 0 and "Run train_pretrain_vlm.py first" in proc.stderr


def test_samples_too_long_are_announced_before_training_and_counted_after_each_epoch(tower_dir, tmp_path):
    from conftest import make_toy_data
    long_data, _ = make_toy_data(tmp_path, n=6, text_len=150)  # ~150 extra tokens per sample
    long_lines = open(long_data).read()
    data, images = make_toy_data(tmp_path, n=6)  # short ones, with the same image names
    with open(data, "a") as f:
        f.write(long_lines + "{broken\n")
    proc = launch("train_sft_vlm.py", common((data, images), tower_dir, tmp_path / "out", from_weight="none",
                                             max_seq_len=300, epochs=1, skip_bad_samples=1))
    assert "skipped 1 bad ones" in proc.stdout and ":13: not valid JSON" in proc.stdout
    warning = proc.stdout.find("warning: 50% of the samples (6 of 12) do not fit --max_seq_len 300")
    assert 0 <= warning < proc.stdout.find("epoch 1 step 1/")  # at the start, not only at the end
    assert "epoch 1: skipped 6 samples" in proc.stdout and "do not fit --max_seq_len 300" in proc.stdout


def test_data_of_which_no_sample_fits_stops_before_the_first_step_with_one_line(tower_dir, tmp_path):
    from conftest import make_toy_data
    data = make_toy_data(tmp_path, n=6, text_len=150)
    proc = launch("train_sft_vlm.py", common(data, tower_dir, tmp_path / "out", from_weight="none",
                                             max_seq_len=100, epochs=1), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert last.startswith(f"error: {data[0]}: no sample fits --max_seq_len 100") and "Raise --max_seq_len" in last
    assert "step 1/" not in proc.stdout and not list((tmp_path / "out").glob("*.pth"))  # nothing trained or saved


def test_feature_cache_gives_the_same_run_cold_and_warm(toy_data, tower_dir, tmp_path):
    args = dict(from_weight="none", epochs=1, cache_features=tmp_path / "cache", num_workers=2)
    cold = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "a", **args))
    warm = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "b", **args))
    assert ": 0 images cached" in cold.stdout and ": 12 images cached" in warm.stdout
    losses = [[r["loss"] for r in read_log(tmp_path / d / "pretrain_vlm_64_log.jsonl")] for d in "ab"]
    assert losses[0] == losses[1]


def test_cache_features_script_prebuilds_what_training_reads(toy_data, tower_dir, tmp_path, capsys):
    import cache_features
    cache = tmp_path / "cache"
    data_path, images = toy_data
    build = ["--data_path", data_path, "--images_path", images, "--cache_dir", str(cache), "--vision_model_path",
             tower_dir, "--num_workers", "0"]
    cache_features.main(build)  # the script's entry, in this process: an error would end it with SystemExit
    first = capsys.readouterr().out
    assert "0 already cached" in first and "12 to encode" in first and "MB on disk" in first
    cache_features.main(build)
    again = capsys.readouterr().out
    assert "12 already cached" in again and "0 to encode" in again
    files = sorted(p.name for p in cache.rglob("*"))
    train = launch("train_pretrain_vlm.py", common(toy_data, tower_dir, tmp_path / "out", from_weight="none",
                                                  epochs=1, cache_features=cache))
    assert ": 12 images cached" in train.stdout  # same tower identity, dtype and keys as the trainer's
    assert sorted(p.name for p in cache.rglob("*")) == files  # training had nothing left to encode


def test_cache_features_script_names_the_line_of_an_unreadable_image(tower_dir, tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    line = '{"conversations": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "a"}], ' \
           '"image": "bad.png"}\n'
    (tmp_path / "d.jsonl").write_text(line)
    proc = launch("scripts/cache_features.py", ["--data_path", tmp_path / "d.jsonl", "--images_path", tmp_path,
                                                 "--cache_dir", tmp_path / "cache", "--vision_model_path", tower_dir,
                                                 "--num_workers", 0], check=False)
    assert proc.returncode == 1 and "d.jsonl:1: cannot read image" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_features_script_names_the_line_of_a_damaged_index(toy_data, tower_dir, tmp_path):
    import cache_features
    data_path, images = toy_data
    flags = ["--data_path", data_path, "--images_path", images, "--cache_dir", str(tmp_path / "cache"),
             "--vision_model_path", tower_dir, "--num_workers", "0"]
    cache_features.main(flags)  # a cache to damage, built in this process
    (index,) = (tmp_path / "cache").rglob("*.idx")
    with open(index, "a") as f:
        f.write("not json\n")
    proc = launch("scripts/cache_features.py", flags, check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == (f"error: {index}:13: not JSON, not a line of a feature-cache index: delete the "
                                   f"folder {index.parent}, and the features are encoded and cached again")
