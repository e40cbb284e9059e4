"""lmms-eval scores our models (lmms/minimind_lmms.py): a local task in MMStar's layout (a parquet of
images and four-way multiple-choice questions, scored by MMStar's own functions) run end to end
through `python -m lmms_eval --model minimind_v`, on a tiny model trained here. Its score equals
`eval_vlm.py --bench` on the same questions, answer for answer, and both generations load through it.
lmms-eval's openai_compatible model against our API server gives the same answers too.

lmms-eval lives in its own virtualenv, .venv-eval (bash scripts/setup_eval_env.sh; .ci/run makes it);
without it these tests are skipped."""
import io
import json
import os
import re
import subprocess
import sys

import pytest
import torch
from PIL import Image

from builders import spec_2026_state_dict
from conftest import ROOT, SIGLIP_WIDTH, TINY_LLM, script_flags

EVAL_PYTHON = os.environ.get("MINIMIND_EVAL_PYTHON", os.path.join(ROOT, ".venv-eval", "bin", "python"))
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not os.path.exists(EVAL_PYTHON), reason=f"no lmms-eval environment at {EVAL_PYTHON}: make it with "
                                            f"`bash scripts/setup_eval_env.sh` (.ci/run does)")]

COLORS = {"A": "red", "B": "green", "C": "blue", "D": "yellow"}
QUESTION = "What color is the image?\nOptions: " + ", ".join(f"{k}: {v}" for k, v in COLORS.items())
POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"  # the task's, as MMStar's
TASK_YAML = f"""task: minimind_mcq
dataset_path: parquet
dataset_kwargs:
  data_files:
    val: {{parquet}}
test_split: val
output_type: generate_until
doc_to_visual: !function utils.mmstar_doc_to_visual
doc_to_text: !function utils.mmstar_doc_to_text
doc_to_target: answer
process_results: !function utils.mmstar_process_results
metric_list:
  - metric: coarse perception
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
  - metric: average
    aggregation: !function utils.mmstar_aggregate_results
    higher_is_better: true
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {json.dumps(POST_PROMPT)}
"""
# The task is MMStar's scoring on our data: its prompt, its answer extraction, its average.
TASK_UTILS = "from lmms_eval.tasks.mmstar.utils import *  # noqa\n"


def questions(n, offset=0):
    """n questions: a square of one of the four colours (sizes vary, so no two images are alike)."""
    letters = sorted(COLORS)
    return [{"index": offset + i, "letter": letters[i % 4],
             "image": Image.new("RGB", (40 + 3 * (offset + i), 30 + 2 * (offset + i)), COLORS[letters[i % 4]])}
            for i in range(n)]


def png(image):
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_task(folder, rows):
    """The lmms-eval task: a yaml, its utils.py, and val.parquet with MMStar's columns; the image
    column is a datasets Image (bytes + path), as the hub's parquet files store it."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    os.makedirs(folder, exist_ok=True)
    features = {"index": {"dtype": "int64", "_type": "Value"}, "question": {"dtype": "string", "_type": "Value"},
                "image": {"_type": "Image"}, "answer": {"dtype": "string", "_type": "Value"},
                "category": {"dtype": "string", "_type": "Value"}, "l2_category": {"dtype": "string", "_type": "Value"}}
    table = pa.table({"index": [r["index"] for r in rows], "question": [QUESTION] * len(rows),
                      "image": [{"bytes": png(r["image"]), "path": f"{r['index']}.png"} for r in rows],
                      "answer": [r["letter"] for r in rows], "category": ["coarse perception"] * len(rows),
                      "l2_category": ["image scene and topic"] * len(rows)})
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(table, os.path.join(folder, "val.parquet"))
    with open(os.path.join(folder, "minimind_mcq.yaml"), "w") as f:
        f.write(TASK_YAML.format(parquet=os.path.join(folder, "val.parquet")))
    with open(os.path.join(folder, "utils.py"), "w") as f:
        f.write(TASK_UTILS)
    return folder


def write_sft(root, rows):
    """The same questions in our SFT format (jsonl + images), for training and eval_vlm.py --bench."""
    os.makedirs(root / "images", exist_ok=True)
    lines = []
    for r in rows:
        r["image"].save(root / "images" / f"{r['index']}.png")
        conv = [{"role": "user", "content": f"<image>\n{QUESTION}{POST_PROMPT}"},
                {"role": "assistant", "content": r["letter"]}]
        lines.append(json.dumps({"conversations": conv, "image": f"{r['index']}.png"}))
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return str(root / "data.jsonl"), str(root / "images")


def run(*args, python=sys.executable, env=None):
    proc = subprocess.run([python, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})})
    assert proc.returncode == 0, f"{args[:3]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def lmms_eval(model_args, task_dir, out_dir, batch_size=8, model="minimind_v", *extra):
    """python -m lmms_eval on the local task -> (its average score, {doc index: the model's answer})."""
    args = ",".join(f"{k}={v}" for k, v in model_args.items())
    proc = run("-m", "lmms_eval", "--model", model, "--model_args", args, "--tasks", "minimind_mcq", *extra,
               "--include_path", task_dir, "--batch_size", batch_size, "--log_samples", "--output_path", out_dir,
               python=EVAL_PYTHON, env={"HF_DATASETS_CACHE": os.path.join(task_dir, "cache")})  # not the user's
    found = {os.path.join(d, f) for d, _, fs in os.walk(out_dir) for f in fs}
    results = [f for f in found if f.endswith("_results.json")]
    samples = [f for f in found if re.search(r"samples_minimind_mcq.*\.jsonl$", f)]
    # lmms-eval exits with 0 even when the evaluation failed: the files tell
    assert len(results) == 1 and len(samples) == 1, proc.stdout[-5000:]
    with open(results[0]) as f:
        score = json.load(f)["results"]["minimind_mcq"]["average,none"]
    with open(samples[0]) as f:
        answers = {s["average"]["question_id"]: s["filtered_resps"] for s in map(json.loads, f)}
    return score, answers


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tower_dir):
    """A tiny VLM trained here to answer the colour questions with a letter, and the held-out questions
    as an lmms-eval task and as SFT data."""
    root = tmp_path_factory.mktemp("lmms")
    train = write_sft(root / "train", questions(32))
    held_out = questions(12, offset=32)
    run("train_sft_vlm.py", *script_flags(train, tower_dir, str(root / "out"), from_weight="none", freeze_llm=0,
                                          epochs=12, batch_size=4, learning_rate=3e-3, dtype="float32", seed=0))
    return {"weight": str(root / "out" / "sft_vlm_64.pth"), "task": write_task(str(root / "task"), held_out),
            "bench": write_sft(root / "bench", held_out), "train": train, "root": root}


@pytest.fixture(scope="module")
def direct(trained):
    """lmms-eval with our model on the local task, run once: (score, {doc index: answer}), which the
    other paths (an API server, a transformers directory) must give too."""
    return lmms_eval({"weight": trained["weight"], "dtype": "float32", "device": "cpu"}, trained["task"],
                     trained["root"] / "lmms_out")


def bench(trained, out, *flags):
    """eval_vlm.py --bench on the task's questions -> (accuracy, {doc index: the model's answer})."""
    proc = run("eval_vlm.py", *flags, "--dtype", "float32", "--device", "cpu", "--bench", trained["bench"][0],
               "--images_path", trained["bench"][1], "--batch_size", 8, "--out", out)
    rows = json.loads(out.read_text())["rows"]
    accuracy = float(re.search(r"accuracy=(\S+)", proc.stdout.splitlines()[-1]).group(1))
    return accuracy, {int(r["image"].split(".")[0]): r["prediction"] for r in rows}


def test_the_local_task_scores_as_eval_vlm_bench_answer_for_answer(trained, direct):
    score, answers = direct
    accuracy, expected = bench(trained, trained["root"] / "bench.json", "--weight", trained["weight"])
    assert answers == expected  # the same prompt, pixels and greedy answer through both paths
    assert set(answers.values()) <= set(COLORS) | {""}, answers  # letters only, so both scorers read them alike
    assert round(score, 3) == accuracy
    assert score >= 0.5, answers  # trained, it beats chance (0.25) by far


def test_a_lora_adapter_applies_as_in_eval_vlm(trained, tower_dir, tmp_path):
    run("train_sft_vlm.py", *script_flags(trained["train"], tower_dir, str(tmp_path), from_weight=trained["weight"], freeze_llm=2,
                                          lora_rank=4, epochs=1, batch_size=4, learning_rate=3e-3, dtype="float32",
                                          save_weight="lora_mcq"))
    adapter = tmp_path / "lora_mcq_64_lora.safetensors"
    score, answers = lmms_eval({"weight": trained["weight"], "lora": adapter, "dtype": "float32"}, trained["task"],
                               tmp_path / "lmms_out")
    assert (score, answers) == bench(trained, tmp_path / "bench.json", "--weight", trained["weight"], "--lora", adapter)


def test_an_unknown_model_arg_is_refused_by_name(trained, tmp_path):
    proc = run("-m", "lmms_eval", "--model", "minimind_v", "--model_args", f"weight={trained['weight']},wieght=x",
               "--tasks", "minimind_mcq", "--include_path", trained["task"], "--output_path", tmp_path,
               python=EVAL_PYTHON)
    assert "unknown model_args ['wieght']" in proc.stdout + proc.stderr and not os.listdir(tmp_path)


def test_openai_compatible_against_our_api_server_answers_the_same(trained, direct, tmp_path):
    """The other path: lmms-eval's own OpenAI client, many requests at once, against
    scripts/serve_openai_api.py, which batches them."""
    from conftest import api_server
    with api_server(["--weight", trained["weight"], "--dtype", "float32", "--device", "cpu", "--max_batch", 8],
                    tmp_path / "server.log") as (base, _, _):
        got = lmms_eval({"model_version": "sft_vlm_64", "base_url": f"{base}/v1", "api_key": "unused", "timeout": 300,
                         "num_concurrent": 8, "httpx_trust_env": False}, trained["task"], tmp_path / "out", 8,
                        "openai_compatible", "--gen_kwargs", "max_new_tokens=16")
    assert got == direct


def test_a_transformers_directory_scores_the_same(trained, direct, tmp_path):
    """scripts/convert_model.py's directory, with its own tokenizer and tower: the same answers."""
    hf_dir = tmp_path / "hf"
    run("scripts/convert_model.py", "--weight", trained["weight"], "--out", hf_dir)
    assert lmms_eval({"weight": hf_dir, "dtype": "float32", "device": "cpu"}, trained["task"], tmp_path / "b") == direct


def test_both_generations_stand_ins_load_and_answer(tower_dir, siglip_dir, tmp_path):
    """MiniMind2-V's format (a .pth of the 2025 model, CLIP tower) and minimind-3v's (the 2026 spec's
    keys, SigLIP tower and MLP projector), random weights: each scores, near chance."""
    from model.checkpoint import llm_state_dict
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    old = tmp_path / "sft_vlm_64.pth"
    torch.save(llm_state_dict(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))), old)
    new = tmp_path / "sft_vlm_128.pth"
    torch.save(spec_2026_state_dict(projector_width=SIGLIP_WIDTH), new)
    task = write_task(str(tmp_path / "task"), questions(8))
    for weight, tower in [(old, tower_dir), (new, siglip_dir)]:
        score, answers = lmms_eval({"weight": weight, "vision_model_path": tower, "tokenizer_path": "model",
                                    "dtype": "float32"}, task, tmp_path / f"out_{weight.stem}", batch_size=4)
        assert 0 <= score <= 1 and len(answers) == 8 and all(isinstance(a, str) for a in answers.values())
