"""--use_wandb under WANDB_MODE=offline: what the offline run files hold, and resuming the same run."""
import pytest
import glob
import json
import os
import struct

import torch

from conftest import flags, launch

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses

LOGGED = {"loss", "lr", "samples_per_s", "tokens_per_s", "epoch", "step", "eta_s"}


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file: a LevelDB-style log (7-byte file header
    ":W&B"..., then 32 KiB blocks of chunks with a 7-byte header: crc32, length, type 1 full /
    2 first / 3 middle / 4 last). wandb no longer ships a Python reader for it."""
    from wandb.proto import wandb_internal_pb2
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B"
    pos, record = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too small for a header: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            record = b""
        record += chunk
        if kind in (1, 4):
            r = wandb_internal_pb2.Record()
            r.ParseFromString(record)
            yield r


def items(update):
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in update}


def read_offline_run(run_dir):
    """-> (run id, config dict, list of history rows)."""
    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    run_id, config, history = None, {}, []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run_id = r.run.run_id
            config.update(items(r.run.config.update))
        elif kind == "config":
            config.update(items(r.config.update))
        elif kind == "history":
            history.append(items(r.history.item))
    return run_id, config, history


def test_offline_run_logs_metrics_and_config_and_a_resumed_run_continues_it(toy_data, tower_dir, tmp_path):
    wandb_dir = tmp_path / "wandb_dir"
    wandb_dir.mkdir()
    env = {"WANDB_MODE": "offline", "WANDB_DIR": str(wandb_dir), "WANDB_SILENT": "true"}
    args = flags(toy_data, tower_dir, tmp_path / "out", epochs=1, dtype="bfloat16") + ["--use_wandb"]  # 3 steps
    launch("train_pretrain_vlm.py", args + ["--stop_after_steps", 2], env=env)
    launch("train_pretrain_vlm.py", args + ["--from_resume", 1], env=env)

    runs = sorted(glob.glob(str(wandb_dir / "wandb" / "offline-run-*")))
    assert len(runs) == 2
    (first_id, config, first), (second_id, _, second) = map(read_offline_run, runs)
    assert first_id == second_id and runs[0].endswith(first_id) and runs[1].endswith(first_id)
    saved = torch.load(tmp_path / "out" / "pretrain_vlm_64_resume.pth", weights_only=False)
    assert saved["state"]["wandb_id"] == first_id
    assert [row["step"] for row in first] == [1, 2] and [row["step"] for row in second] == [3]
    assert all(LOGGED <= set(row) for row in first + second)
    assert config["learning_rate"] == 3e-3 and config["batch_size"] == 4 and config["use_wandb"] == 1
    assert {"data_path", "dim", "n_layers", "max_seq_len", "freeze_llm", "deepspeed"} <= set(config)
