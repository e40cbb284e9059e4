"""A checkpoint knows what it is: the record beside every .pth we write names its tokenizer and
tower (with a hash of their files), its shape and its origin, and every entry point reads it."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from builders import AT, SPEC_TEMPLATE, write_released_tokenizer
from conftest import ROOT, TINY_LLM, api_server, script_flags
from model.checkpoint import llm_state_dict
from model.model_vlm import MiniMindVLM, VLMConfig
from model.record import RecordError, make_record, read_record, record_path, resolve_folders, write_record

pytestmark = pytest.mark.slow  # trains through the real script, then eval from another folder


def run(script, *args, cwd=ROOT, check=True):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert not check or proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tower_dir):
    """A tiny pretrain through the real script: (its .pth, the tower it used)."""
    from conftest import make_toy_data
    root = tmp_path_factory.mktemp("trained")
    data = make_toy_data(root, n=4)
    run("train_pretrain_vlm.py", *script_flags(data, tower_dir, root / "out", from_weight="none", epochs=1,
                                                batch_size=4, dtype="float32"))
    return str(root / "out" / "pretrain_vlm_64.pth"), tower_dir


def test_training_writes_a_record_beside_the_weights(trained):
    pth, tower_dir = trained
    record = read_record(pth)
    assert record_path(pth).endswith("pretrain_vlm_64.json") and not any(
        name.endswith(".tmp") for name in os.listdir(os.path.dirname(pth)))
    assert record["tokenizer"]["path"] == os.path.join(ROOT, "model") and record["tokenizer"]["sha256"]
    assert record["vision_tower"]["path"] == os.path.abspath(tower_dir) and record["vision_tower"]["sha256"]
    assert record["model"] == {"generation": "minimind2", "dim": 64, "n_layers": 2, "n_heads": 8, "n_kv_heads": 2,
                               "head_dim": 8, "use_moe": False,
                               "projector": "linear", "vocab_size": 6400, "image_token_id": 3,
                               "image_token_count": 196}
    assert record["trained_from"] is None and record["data"].endswith("data.jsonl")


def test_the_weights_alone_answer_through_eval_from_another_folder(trained, tmp_path):
    pth, _ = trained
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    proc = run("eval_vlm.py", "--weight", pth, "--image", tmp_path / "red.png", "--prompt", "What colour?",
               "--max_new_tokens", 3, cwd=tmp_path)  # no --tokenizer_path, --vision_model_path, --dim
    assert proc.stdout.strip()


def test_the_web_demo_answers_with_the_weights_alone_from_another_folder(trained, tmp_path, monkeypatch):
    import web_demo_vlm
    pth, tower_dir = trained
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 48), "red").save(tmp_path / "red.png")
    args = web_demo_vlm.parse_args(["--weight", pth, "--device", "cpu"])
    hub = web_demo_vlm.ModelHub(args)
    label = next(iter(hub.choices))
    assert hub.get(label).model.config.n_layers == 2
    assert os.path.samefile(hub.get(label).model.config.vision_model_path, tower_dir)
    state = web_demo_vlm.new_session(label)
    *_, (display, _, state) = web_demo_vlm.respond(
        args, hub, {"text": "What colour?", "files": [str(tmp_path / "red.png")]}, state, 0.0, 1.0, 3)
    assert state["messages"][-1]["role"] == "assistant" and not display[-1]["content"].startswith("⚠️")


def test_the_api_answers_with_the_weights_alone_from_another_folder(trained, tmp_path):
    pth, _ = trained
    png = io.BytesIO()
    Image.new("RGB", (64, 48), "red").save(png, "PNG")
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with api_server(["--weight", pth, "--device", "cpu"], tmp_path / "server.log", cwd=tmp_path) as (_, http, _):
        reply = http.post("/v1/chat/completions", json={"max_tokens": 3, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What colour?"}]}]})
    assert reply.status_code == 200, reply.text
    assert reply.json()["choices"][0]["message"]["role"] == "assistant"


def test_another_tokenizer_or_tower_than_the_recorded_one_is_refused_naming_both(trained, tmp_path, tower_dir):
    from model.inference import InferenceConfig, load_model
    pth, _ = trained
    other_tok = write_released_tokenizer(str(tmp_path / "released_tok"), SPEC_TEMPLATE)
    with pytest.raises(RecordError, match=rf"trained with the tokenizer at {ROOT}/model, but --tokenizer_path "
                                          rf"{other_tok} holds another one"):
        load_model(InferenceConfig(weight=pth, tokenizer_path=other_tok))
    other_tower = tmp_path / "tower"
    shutil.copytree(tower_dir, other_tower)
    with open(other_tower / "preprocessor_config.json") as f:
        processor = json.load(f)
    processor["image_mean"] = [0.5, 0.5, 0.5]  # other pixels: another tower as far as the model knows
    (other_tower / "preprocessor_config.json").write_text(json.dumps(processor))
    with pytest.raises(RecordError, match=r"trained with the vision tower at .* but --vision_model_path"):
        load_model(InferenceConfig(weight=pth, vision_model_path=str(other_tower)))
    model, _, _ = load_model(InferenceConfig(weight=pth, vision_model_path=str(other_tower), ignore_record=1))
    assert model.config.vision_model_path == str(other_tower)


def test_a_released_checkpoint_needs_its_tokenizer_named_and_then_trains(tower_dir, tmp_path):
    root = tmp_path
    tok_dir = write_released_tokenizer(str(root / "released_tok"), SPEC_TEMPLATE)
    torch.manual_seed(1)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, proj_bias=True, image_token_id=AT, **TINY_LLM))
    torch.save(llm_state_dict(model), root / "released_64.pth")  # no record, as downloaded
    from conftest import make_toy_data
    data = make_toy_data(root, n=4)
    flags = script_flags(data, tower_dir, root / "out", from_weight=root / "released_64.pth", epochs=1, batch_size=4)
    refused = run("train_sft_vlm.py", *flags, check=False)
    assert refused.returncode == 1 and refused.stderr.strip().count("\n") == 0
    assert "released_64.pth has no record" in refused.stderr and "--tokenizer_path" in refused.stderr
    run("train_sft_vlm.py", *flags, "--tokenizer_path", tok_dir)
    record = read_record(str(root / "out" / "sft_vlm_64.pth"))
    assert record["tokenizer"]["path"] == tok_dir and record["model"]["image_token_id"] == AT
    assert record["trained_from"] == str(root / "released_64.pth")
    from model.inference import InferenceConfig, load_model
    with pytest.raises(RecordError, match="--tokenizer_path"):
        load_model(InferenceConfig(weight=str(root / "released_64.pth"), vision_model_path=tower_dir))


def test_a_record_is_written_whole_and_a_broken_one_is_named(tmp_path, tower_dir):
    config = VLMConfig(vision_model_path=tower_dir, **TINY_LLM)
    pth = str(tmp_path / "w.pth")
    write_record(make_record(config, "model", tower_dir), pth)
    assert os.listdir(tmp_path) == ["w.json"]
    with open(record_path(pth), "w") as f:
        f.write('{"format": "minimind-v checkpoint rec')
    with pytest.raises(RecordError, match=r"w.json is not a checkpoint record"):
        resolve_folders(pth, None, None, tower_dir)
