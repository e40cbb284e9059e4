"""Command-line conventions every script shares."""
import argparse
import os
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT


def test_on_off_flags_accept_the_bare_form_and_0_or_1():
    from cli import add_model_args
    from trainer.config import build_parser
    parser = build_parser("x")
    args = parser.parse_args(["--skip_bad_samples", "--use_wandb", "--group_by_length", "0", "--use_compile", "1"])
    assert (args.skip_bad_samples, args.use_wandb, args.group_by_length, args.use_compile) == (1, 1, 0, 1)
    assert parser.parse_args([]).skip_bad_samples == 0 and parser.parse_args([]).group_by_length == 1
    with pytest.raises(SystemExit):
        parser.parse_args(["--skip_bad_samples", "2"])
    inference = add_model_args(argparse.ArgumentParser())
    assert inference.parse_args(["--use_moe"]).use_moe == 1


# Every script a user runs, and the argument groups its --help shows ("options" alone: a script with
# a handful of flags).
GROUPS = {
    "train_pretrain_vlm.py": {"data", "model", "training", "LoRA", "output", "distributed"},
    "train_sft_vlm.py": {"data", "model", "training", "LoRA", "output", "distributed"},
    "eval_vlm.py": {"model", "decoding", "folder and chat modes", "benchmark (--bench)"},
    "web_demo_vlm.py": {"model", "model list", "serving", "limits", "decoding"},
    "scripts/serve_openai_api.py": {"model", "serving", "limits", "decoding"},
    "scripts/convert_model.py": {"what to convert", "export (.pth -> directory)"},
    "scripts/cache_features.py": {"data", "the tower, as training runs it", "output"},
    "scripts/convert_data.py": set(),
    "scripts/inspect_data.py": set(),
    "scripts/merge_lora.py": set(),
    "scripts/plot_loss.py": set(),
    "scripts/train_tokenizer.py": set(),
    "demo/demo.py": {"data", "model", "training", "output"},
    "demo/make_shapes_data.py": set(),
    "demo/make_demo_vision_tower.py": set(),
    "demo/train_demo_tower.py": {"data and output", "the tower", "training"},
}
HEAVY = ("torch", "transformers", "gradio", "matplotlib", "deepspeed")

# Runs a script as `python SCRIPT --help` does, then names the heavy libraries it loaded on the way.
HELP_PROBE = """
import os, runpy, sys
script = sys.argv[1]
sys.path[0] = os.path.dirname(os.path.abspath(script))
sys.argv = [script, "--help"]
try:
    runpy.run_path(script, run_name="__main__")
except SystemExit:
    pass
print("LOADED:", *sorted(m for m in {heavy!r} if m in sys.modules))
""".format(heavy=HEAVY)


def run_help(script):
    """-> (the --help text, the heavy libraries loaded while printing it)."""
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    text, _, loaded = proc.stdout.rpartition("LOADED:")
    assert "usage:" in text, proc.stderr
    return text, loaded.split()


@pytest.fixture(scope="module")
def helps():
    return {script: run_help(script) for script in GROUPS}


def help_sections(text):
    """--help text -> {group title: {option strings: help text}} ("options" holds the ungrouped)."""
    sections, group, option = {}, None, None
    start = min(i for i in (text.find("\noptions:\n"), text.find("\npositional arguments:\n")) if i >= 0)
    for line in text[start:].splitlines():  # after the usage and the description
        if re.match(r"^\S.*:$", line):
            group, option = line[:-1], None
            sections[group] = {}
        elif group and re.match(r"^  -", line):
            flags, _, rest = line.strip().partition("  ")
            option = tuple(re.findall(r"--?[\w-]+", flags.split(" ", 1)[0] if "," not in flags else flags))
            sections[group][option] = rest.strip()
        elif option and line.startswith("   "):
            sections[group][option] += " " + line.strip()
        else:
            option = None
    return sections


@pytest.mark.parametrize("script", GROUPS)
def test_help_groups_the_flags_and_shows_every_default_without_loading_torch(helps, script):
    text, loaded = helps[script]
    sections = help_sections(text)
    assert set(sections) - {"options", "positional arguments"} == GROUPS[script]
    options = {flags: help for group in sections.values() for flags, help in group.items() if flags != ("-h", "--help")}
    assert options
    unsaid = [flags for flags, help in options.items()
              if flags[0].startswith("-") and "default:" not in help and "(required)" not in help]
    assert unsaid == [], f"{script}: options whose help does not say their default"
    # --help answers at once: torch, transformers and gradio load only after the flags are parsed.
    assert loaded == [], f"{script} --help loaded {loaded}"


@pytest.mark.parametrize("script", [*GROUPS, pytest.param("dev/bench.py", marks=pytest.mark.slow)])
def test_no_script_has_an_on_off_flag_that_refuses_either_form(helps, script):
    # store_true flags refuse "--flag 1"; int 0/1 flags without nargs="?" refuse the bare "--flag".
    help_text = helps[script][0] if script in helps else run_help(script)[0]
    usage = help_text.split("\n\n")[0]
    assert "{0,1}" not in help_text, "an int 0/1 flag that refuses the bare form"
    assert not re.findall(r"\[--[\w-]+\]", usage), "a store_true flag, which refuses '--flag 1'"


def test_old_spellings_of_renamed_flags_still_work_but_are_not_listed(helps):
    import convert_model
    import serve_openai_api
    assert serve_openai_api.parse_args(["--max_tokens", "7"]).max_new_tokens == 7  # eval's and the web demo's name
    assert serve_openai_api.parse_args([]).max_new_tokens == 512
    assert convert_model.build_parser().parse_args(["--out_dir", "hf"]).out == "hf"  # a destination: --out
    assert "--max_tokens" not in helps["scripts/serve_openai_api.py"][0]
    assert "--out_dir" not in helps["scripts/convert_model.py"][0]


def readme_commands():
    """(script, [flags]) of every command the README shows: its ```bash blocks and `inline` commands.
    bash demo/demo.sh passes its flags to demo/demo.py."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    lines = [line for block in re.findall(r"```bash\n(.*?)```", readme, re.S)
             for line in block.replace("\\\n", " ").splitlines()]
    lines += re.findall(r"`((?:python|bash|torchrun|deepspeed) [^`]+)`", readme)
    for line in lines:
        for command in re.split(r"&&|;|\|", re.split(r"\s#", line)[0]):
            words = shlex.split(command)
            for i, word in enumerate(words):
                script = "demo/demo.py" if word == "demo/demo.sh" else word
                if script in GROUPS:
                    yield script, [flag for w in words[i + 1:] for flag in re.findall(r"^\[?(--[\w-]+)", w)]
                    break


def test_the_readme_names_only_flags_the_scripts_accept(helps):
    commands = list(readme_commands())
    assert {script for script, _ in commands} >= {"train_pretrain_vlm.py", "eval_vlm.py", "web_demo_vlm.py",
                                                  "scripts/serve_openai_api.py", "scripts/convert_model.py"}
    unknown = []
    for script, flags in commands:
        accepted = {flag for group in help_sections(helps[script][0]).values() for option in group for flag in option}
        unknown += [f"{script} {flag}" for flag in flags if flag not in accepted]
    assert unknown == []


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
