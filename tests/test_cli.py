"""Command-line conventions every script shares."""
import argparse
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT


def test_on_off_flags_accept_the_bare_form_and_0_or_1():
    from model.inference import add_model_args
    from trainer import build_parser
    parser = build_parser("x")
    args = parser.parse_args(["--skip_bad_samples", "--use_wandb", "--group_by_length", "0", "--use_compile", "1"])
    assert (args.skip_bad_samples, args.use_wandb, args.group_by_length, args.use_compile) == (1, 1, 0, 1)
    assert parser.parse_args([]).skip_bad_samples == 0 and parser.parse_args([]).group_by_length == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--skip_bad_samples", "2"])
    inference = add_model_args(argparse.ArgumentParser())
    assert inference.parse_args(["--use_moe"]).use_moe == 1


@pytest.mark.parametrize("script", ["train_pretrain_vlm.py", "train_sft_vlm.py", "eval_vlm.py", "web_demo_vlm.py",
                                    "scripts/serve_openai_api.py", "scripts/convert_model.py",
                                    "scripts/convert_data.py", "dev/bench.py", "demo/make_demo_vision_tower.py",
                                    "demo/train_demo_tower.py", "demo/demo.py"])
@pytest.mark.slow
def test_no_script_has_an_on_off_flag_that_refuses_either_form(script):
    # store_true flags refuse "--flag 1"; int 0/1 flags without nargs="?" refuse the bare "--flag".
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, script), "--help"], cwd=ROOT, capture_output=True,
                               text=True, timeout=120, env={**os.environ, "COLUMNS": "200"}).stdout
    assert "usage:" in help_text
    usage = help_text.split("\n\n")[0]
    assert "{0,1}" not in help_text, "an int 0/1 flag that refuses the bare form"
    assert not re.findall(r"\[--[\w-]+\]", usage), "a store_true flag, which refuses '--flag 1'"


def test_every_picture_folder_and_file_the_readme_uses_is_in_the_repository():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    named = set(re.findall(r"\bimages/[\w./-]*\w", readme))
    assert "images/eval" in named
    assert [p for p in sorted(named) if not os.path.exists(os.path.join(ROOT, p))] == []


def test_loss_curves_go_under_out_by_default_and_in_the_readme_never_over_the_tracked_figure(tmp_path, monkeypatch):
    import plot_loss
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        commands = [line for line in f if "plot_loss.py" in line]
    assert commands and all(re.search(r"--out out/\S+\.png", c) for c in commands)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sft_vlm_64_log.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
    plot_loss.main(["--logs", "sft_vlm_64_log.jsonl"])
    assert (tmp_path / "out" / "loss_curves.png").is_file() and not (tmp_path / "images").exists()
