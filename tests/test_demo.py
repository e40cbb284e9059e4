"""The offline demo end to end at toy size, and the benchmark script's report shape.
(Accuracy is the demo's job to show, not a test's: a few steps learn nothing.)"""
import glob
import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # every test here runs the scripts in subprocesses


def test_tiny_demo_runs_every_stage_and_writes_the_results_file(tmp_path):
    # Uncompiled: compiling would take most of this test (test_trainer_units.py trains compiled).
    cmd = [sys.executable, "demo/demo.py", "--data_dir", tmp_path / "data", "--out_dir", tmp_path / "out",
           "--n_train", 24, "--n_test", 10, "--tower_steps", 3, "--tower_layers", 1, "--dim", 64, "--n_layers", 2,
           "--pretrain_epochs", 1, "--sft_epochs", 1, "--generation", "minimind2", "--batch_size", 8,
           "--num_workers", 0, "--log_interval", 1, "--samples", 3, "--use_compile", 0]
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for n in range(1, 7):
        assert f"=== [{n}/6]" in proc.stdout  # progress through every stage
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"accuracy", "blind_accuracy", "n", "per_type", "train_seconds", "total_seconds"} <= set(results)
    assert results["n"] == 10 and set(results["per_type"]) <= {"color", "shape", "position", "count", "exists"}
    assert 0 < results["train_seconds"] <= results["total_seconds"]
    assert len(results["answers"]) == 10 and {"question", "prediction", "reference", "correct"} <= set(
        results["answers"][0])
    assert proc.stdout.split("held-out answers:")[1].count("(reference ") == 3
    import torch
    weights = torch.load(tmp_path / "out" / "sft_vlm_64.pth", weights_only=True)
    assert not any("q_norm" in k for k in weights) and "tok_embeddings.weight" in weights  # --generation reached training
    tower = json.loads((tmp_path / "out" / "vision_tower" / "config.json").read_text())
    assert tower["num_hidden_layers"] == 1  # --tower_layers reached the tower

    # The README's commands on the demo's model work as written (at this test's paths and size).
    with open(f"{ROOT}/README.md") as f:
        commands = re.findall(r"python [^`\n]*(?:out|dataset)/demo[^`\n]*", f.read())
    assert len(commands) >= 3
    for command in commands:
        command = (command.split(" #")[0].replace("out/demo", str(tmp_path / "out"))
                   .replace("dataset/demo", str(tmp_path / "data")).replace("sft_vlm_256", "sft_vlm_64"))
        argv = [a for word in shlex.split(command)[1:] for a in (sorted(glob.glob(word)) if "*" in word else [word])]
        run = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, command + "\n" + run.stdout[-2000:] + run.stderr[-2000:]


def test_a_failing_step_ends_the_demo_with_one_line_naming_it_not_a_traceback_of_the_wrapper(tmp_path):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("")  # the data folder cannot be made here
    proc = subprocess.run([sys.executable, "demo/demo.py", "--data_dir", str(blocker / "data")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: demo/make_shapes_data.py failed (exit status 1)")
    assert "Traceback" not in proc.stderr and "cannot write the demo data to" in proc.stderr  # the step says why


def test_bench_reports_mfu_memory_and_decode_figures(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "dev/bench.py", "--quick", "--only", "llm,decode", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["matmul_peak_tflops"] > 0 and report["peak_rss_mb_bench_process"] > 0
    # the figures exist and are positive; how large they are depends on the machine, not on the code
    steps = report["llm_step"]
    assert len(steps) == 2 and all(r["mfu"] > 0 and r["tokens_per_s"] > 0 for r in steps.values())
    from model.precision import dtype_name, resolve_dtype
    assert report["dtype"] == dtype_name(resolve_dtype("auto", "cpu")[0])  # the peak's dtype
    assert set(report["decode"]) == {"batch 1", "batch 8", "batch 1, int8", "batch 8, int8"}
    assert all(r["ttft_s"] > 0 and r["decode_tokens_per_s"] > 0 for r in report["decode"].values())
    assert "MFU" in proc.stdout and "time to first token" in proc.stdout


def test_the_reference_comparison_reports_medians_and_ratios_and_refuses_a_folder_that_is_not_the_original(
        tmp_path):
    import reference
    table = reference.summarize({"pretrain": {"original": [198.0, 199.0, 187.0], "ours": [40.0, 41.0, 39.5]}})
    assert table["pretrain"]["original"]["median_s"] == 198.0 and table["pretrain"]["ours"]["median_s"] == 40.0
    assert table["pretrain"]["ours"]["x_original"] == pytest.approx(198.0 / 40.0)
    assert "| pretrain | ours | 40.0 s | 4.95x |" in reference.format_report(
        {"rounds": 3, "pretrain_images": 256, "sft_samples": 64, "train": table, "decode": {}})
    with pytest.raises(SystemExit, match=r"not a runnable copy of the original: no train_pretrain_vlm.py"):
        reference.check_reference(str(tmp_path), str(tmp_path / "python"))
