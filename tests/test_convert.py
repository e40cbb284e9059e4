"""scripts/convert_model.py: .pth <-> transformers-format directory, loaded with AutoModelForCausalLM
(trust_remote_code) offline, with identical logits, and back to the same state dict."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from model.checkpoint import llm_state_dict

from builders import make_checkpoint
from conftest import ROOT

from convert_model import export_hf, main as convert_main  # noqa: E402


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from skimage import data
    path = str(tmp_path_factory.mktemp("photo") / "astronaut.png")
    Image.fromarray(data.astronaut()).save(path)
    return path


def inputs(tokenizer, processor, photo):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "<image>\nWhat is in the picture?"}],
                                         tokenize=False, add_generation_prompt=True)
    before, after = text.split("<image>")
    ids = tokenizer.encode(before, add_special_tokens=False) + [3] * 196
    ids += tokenizer.encode(after, add_special_tokens=False)
    pixels = processor(images=[Image.open(photo).convert("RGB")], return_tensors="pt")["pixel_values"]
    return torch.tensor([ids]), pixels


def load_hf(out, **kwargs):
    """fp32, so logits compare with our fp32 model exactly (without a dtype it is --dtype auto's)."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, **{"dtype": torch.float32, **kwargs})


@pytest.mark.parametrize("proj_bias", [False, True], ids=["ours", "released-style-bias"])
def test_round_trip_gives_identical_logits(tower_dir, tokenizer, processor, photo, tmp_path, proj_bias):
    pth = str(tmp_path / "w.pth")
    original = make_checkpoint(tower_dir, pth, proj_bias=proj_bias)
    out = export_hf(pth, str(tmp_path / f"hf-{proj_bias}"), os.path.join(ROOT, "model"), tower_dir)

    from transformers import AutoConfig
    config = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert config.auto_map == {"AutoConfig": "model_vlm.VLMConfig",
                               "AutoModelForCausalLM": "modeling_minimind_v.MiniMindVLMForCausalLM"}
    assert config.vision_model_path == tower_dir and config.proj_bias == proj_bias and config.image_token_id == 3
    from safetensors import safe_open
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "output.weight" not in keys and not any(k.startswith("vision_encoder.") for k in keys)
    assert ("vision_proj.vision_proj.0.bias" in keys) == proj_bias

    model = load_hf(out)
    assert model.output.weight is model.tok_embeddings.weight  # tied again on load
    # transformers did not re-initialise the CLIP tower (it is attached after loading)
    for a, b in zip(model.vision_encoder.state_dict().values(), original.vision_encoder.state_dict().values()):
        assert torch.equal(a, b)
    ids, pixels = inputs(tokenizer, processor, photo)
    with torch.no_grad():
        expected, got = original(ids, pixel_values=pixels).logits, model(ids, pixel_values=pixels).logits
    assert got.dtype == torch.float32 and (expected - got).abs().max() < 1e-5
    # generate() with pixel_values, and the chat() helper with the directory's own tokenizer/processor
    assert torch.equal(model.generate(ids, pixel_values=pixels, max_new_tokens=5),
                       original.generate(ids, pixel_values=pixels, max_new_tokens=5))
    answer = model.chat(Image.open(photo), "What is in the picture?", max_new_tokens=5)
    assert isinstance(answer, str)


def test_heads_wider_than_dim_over_n_heads_export_and_load_back_with_the_same_logits(tower_dir, tmp_path):
    pth = str(tmp_path / "w.pth")
    original = make_checkpoint(tower_dir, pth, generation="minimind3", head_dim=16)  # dim 64, 8 heads of 16
    model = load_hf(export_hf(pth, str(tmp_path / "hf"), os.path.join(ROOT, "model"), tower_dir))
    assert model.config.head_dim == 16 and model.rope_cos.shape[-1] == 16
    ids = torch.tensor([[5, 9, 30, 41, 7]])
    with torch.no_grad():
        assert (original(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_reverse_conversion_gives_the_original_state_dict(tower_dir, tmp_path):
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth, proj_bias=True, seed=3)
    out = str(tmp_path / "hf")
    convert_main(["--weight", pth, "--out", out, "--vision_model_path", tower_dir, "--tokenizer_path", "model"])
    back = str(tmp_path / "back.pth")
    convert_main(["--reverse", "--weight", out, "--out", back])
    convert_main(["--from_hf", out, "--out", str(tmp_path / "back2.pth")])
    sd, sd2 = torch.load(pth, weights_only=True), torch.load(back, weights_only=True)
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) and sd2[k].dtype == torch.float32 for k in sd)
    from model.record import read_record  # the .pth knows its tokenizer (the directory's) and its tower
    record = read_record(back)
    assert record["tokenizer"]["path"] == os.path.abspath(out) and record["vision_tower"]["path"] == os.path.abspath(tower_dir)
    assert sd2["output.weight"].data_ptr() == sd2["tok_embeddings.weight"].data_ptr()  # tied, like the release
    assert list(torch.load(str(tmp_path / "back2.pth"), weights_only=True)) == list(sd)


def test_reverse_conversion_of_a_directory_whose_config_does_not_describe_its_weights_says_so(tower_dir, tmp_path):
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth)
    out = tmp_path / "hf"
    convert_main(["--weight", pth, "--out_dir", str(out), "--vision_model_path", tower_dir, "--tokenizer_path", "model"])
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layers": 3}))  # edited by hand: one layer too many
    with pytest.raises(SystemExit) as stop:
        convert_main(["--reverse", "--weight", str(out), "--out", str(tmp_path / "back.pth")])
    message = str(stop.value.code)  # one line, not a traceback, and no --n_layers: convert_model.py has none
    assert message.startswith(f"error: {out} does not match the model (its config.json does not describe its "
                              f"model.safetensors): the file has ") and "--n_layers" not in message


def drop_embedding(out):
    from safetensors.torch import load_file, save_file
    tensors = load_file(out / "model.safetensors")
    del tensors["tok_embeddings.weight"]
    save_file(tensors, out / "model.safetensors")


DAMAGED_DIRECTORIES = {  # a hand edit of an exported directory -> the file and what the one line says of it
    "tensor-missing": (drop_embedding, "model.safetensors has no tok_embeddings.weight, so no MiniMind weights"),
    "dim-not-a-number": (lambda out: edit_config(out, dim="abc"), "config.json: dim is 'abc', not a number >= 0"),
    "no-heads": (lambda out: edit_config(out, n_heads=0), "config.json does not describe a MiniMind-V model ("),
    "config-not-json": (lambda out: (out / "config.json").write_text('{"dim": '), "config.json is not a JSON config ("),
}


def edit_config(out, **fields):
    (out / "config.json").write_text(json.dumps({**json.loads((out / "config.json").read_text()), **fields}))


@pytest.mark.parametrize("case", DAMAGED_DIRECTORIES, ids=list(DAMAGED_DIRECTORIES))
def test_reverse_conversion_of_a_damaged_directory_is_one_line_naming_the_file(tower_dir, tmp_path, case):
    damage, message = DAMAGED_DIRECTORIES[case]
    pth, out = str(tmp_path / "w.pth"), tmp_path / "hf"
    make_checkpoint(tower_dir, pth)
    convert_main(["--weight", pth, "--out", str(out), "--vision_model_path", tower_dir, "--tokenizer_path", "model"])
    damage(out)
    with pytest.raises(SystemExit) as stop:
        convert_main(["--reverse", "--weight", str(out), "--out", str(tmp_path / "back.pth")])
    assert str(stop.value.code).startswith(f"error: {out}/{message}") and "\n" not in str(stop.value.code)
    assert str(stop.value.code).endswith(f"fix it, or export the directory again (scripts/convert_model.py "
                                         f"--weight X.pth --out {out})")
    assert not (tmp_path / "back.pth").exists()


def test_moe_checkpoint_converts(tower_dir, tmp_path):
    pth = str(tmp_path / "moe.pth")
    original = make_checkpoint(tower_dir, pth, use_moe=True)
    model = load_hf(export_hf(pth, str(tmp_path / "hf-moe"), os.path.join(ROOT, "model"), tower_dir))
    ids = torch.randint(10, 6000, (1, 20))
    with torch.no_grad():
        assert (original(ids).logits - model(ids).logits).abs().max() < 1e-5


def test_missing_vision_tower_is_a_clear_error_and_can_be_overridden(tower_dir, tmp_path, monkeypatch):
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth)
    out = export_hf(pth, str(tmp_path / "hf-notower"), os.path.join(ROOT, "model"), str(tmp_path / "no-clip"))
    with pytest.raises(FileNotFoundError, match="vision_model_path"):
        load_hf(out)
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, vision_model_path=tower_dir)
    assert model.vision_encoder is not None and model.config.vision_model_path == tower_dir
    # without a dtype: what --dtype auto picks on this CPU, for the LLM and the tower alike
    from model.precision import resolve_dtype
    assert {p.dtype for p in model.parameters()} == {resolve_dtype("auto", "cpu")[0]}
    # --copy_vision_tower: the tower travels inside the directory, found from any working directory
    out = str(tmp_path / "hf-with-tower")
    convert_main(["--weight", pth, "--out_dir", out, "--vision_model_path", tower_dir, "--copy_vision_tower",  # old name
                  "--tokenizer_path", "model"])
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vision_model_path"] == "vision_model"
    monkeypatch.chdir(tmp_path)
    assert load_hf(out).config.vision_model_path == os.path.join(out, "vision_model")


def test_llm_only_checkpoint_is_refused(tower_dir, tmp_path):
    pth = str(tmp_path / "llm.pth")
    model = make_checkpoint(tower_dir, pth)
    torch.save({k: v for k, v in llm_state_dict(model).items() if not k.startswith("vision_proj.")}, pth)
    with pytest.raises(SystemExit, match="LLM-only"):
        export_hf(pth, str(tmp_path / "hf"), os.path.join(ROOT, "model"), tower_dir)


@pytest.mark.slow
def test_directory_is_self_contained(tower_dir, photo, tmp_path):
    """Loaded from another working directory, with nothing of the repository importable."""
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth)
    out = export_hf(pth, str(tmp_path / "hf-alone"), os.path.join(ROOT, "model"), tower_dir)
    for name in ("model_minimind.py", "model_vlm.py", "modeling_minimind_v.py"):
        code = open(os.path.join(out, name)).read()
        assert "from dataset" not in code and "from model." not in code and "import model" not in code
    script = ("import sys; from transformers import AutoModelForCausalLM; from PIL import Image\n"
              f"m = AutoModelForCausalLM.from_pretrained({out!r}, trust_remote_code=True)\n"
              "assert 'model.model_vlm' not in sys.modules and 'dataset' not in sys.modules\n"
              f"print(repr(m.chat(Image.open({photo!r}), 'What is it?', max_new_tokens=3)))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]


def test_eval_path_load_1_gives_the_same_answers_as_the_pth(tower_dir, photo, tmp_path):
    """model/inference.py load_model given the exported directory (what eval_vlm.py and the web demo use):
    the path tells it from a .pth, no flag needed."""
    import argparse

    from cli import add_model_args
    from model.inference import VLMChat, load_model
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth, seed=5)
    out = export_hf(pth, str(tmp_path / "hf-eval"), os.path.join(ROOT, "model"), tower_dir)
    answers = []
    for weight in (pth, out):
        args = add_model_args(argparse.ArgumentParser()).parse_args(
            ["--weight", weight, "--vision_model_path", tower_dir, "--device", "cpu",
             "--dtype", "float32", "--tokenizer_path", "model"])
        chat = VLMChat(*load_model(args))
        conversations = [([{"role": "user", "content": "<image>\nWhat is it?"}], [Image.open(photo)]),
                         ([{"role": "user", "content": "Hello"}], [])]
        answers.append(chat.answer_batch(conversations, max_new_tokens=6))
    assert answers[0] == answers[1]
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["vision_model_path"] == tower_dir


def test_the_exported_chat_builds_the_conversation_as_eval_and_the_api_do(tower_dir, photo, tmp_path):
    """model.chat() of plain transformers and VLMChat (eval_vlm.py, the web demo, the API) turn a
    question and an image into the same prompt (model.chat.user_content) and the same greedy answer:
    an <image> typed in the question is text in both, never an image slot."""
    from model.chat import user_content
    from model.images import open_image, to_pixels
    from model.inference import InferenceConfig, VLMChat, load_model
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth, seed=7)
    out = export_hf(pth, str(tmp_path / "hf-chat"), os.path.join(ROOT, "model"), tower_dir)
    exported = load_hf(out)
    chat = VLMChat(*load_model(InferenceConfig(weight=pth, vision_model_path=tower_dir, tokenizer_path="model",
                                               dtype="float32", device="cpu")))
    question = "What does <image> stand for here?"
    for image, n_slots in ((None, 0), (photo, 196)):
        content, images = user_content(([open_image(image)] if image else []) + [question])
        messages = [{"role": "user", "content": content}]
        turns, pictures = exported.conversation(image, question)
        assert turns == messages and "[image] stand for" in content and len(pictures) == len(images)
        tokenizer, processor = exported._chat_tools(None, None)
        ids, is_image = exported.encode_chat(turns, tokenizer)
        assert (ids, is_image) == chat.encoder.encode_prompt(messages) and sum(is_image) == n_slots
        with torch.no_grad():  # the same pixels on the same slots
            got = exported(torch.tensor([ids]), image_mask=torch.tensor([is_image]),
                           pixel_values=to_pixels(processor, pictures) if pictures else None).logits
            expected = chat.model(torch.tensor([ids]), image_mask=torch.tensor([is_image]),
                                  pixel_values=chat.pixels(images)).logits
        assert (got - expected).abs().max() < 1e-5
        answer = exported.chat(image, question, max_new_tokens=6)
        assert answer == chat.answer(messages, images, max_new_tokens=6)
    red = Image.new("RGB", (32, 32), "red")  # a turn's parts, in order: the picture where it is given
    turns, pictures = exported.conversation(None, [{"role": "user", "content": ["Compare", red, "with <image>."]}])
    assert turns == [{"role": "user", "content": "Compare\n<image>\nwith [image]."}] and len(pictures) == 1
    with pytest.raises(ValueError, match="exceeds the model's limit"):
        exported.chat(photo, question, max_new_tokens=exported.config.max_seq_len)


def test_our_entry_points_load_an_exported_directory_without_running_its_code(tower_dir, tmp_path):
    """eval_vlm.py, the web demo and the API load a directory through load_model: the modelling files in
    it are for plain transformers, and a line planted in them must not run."""
    from model.inference import InferenceConfig, load_model
    pth, marker = str(tmp_path / "w.pth"), tmp_path / "MARKER"
    original = make_checkpoint(tower_dir, pth, seed=3)
    out = export_hf(pth, str(tmp_path / "hf-planted"), os.path.join(ROOT, "model"), tower_dir)
    for name in os.listdir(out):
        if name.endswith(".py"):
            with open(os.path.join(out, name), "a") as f:
                f.write(f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    model, _, _ = load_model(InferenceConfig(weight=out, vision_model_path=tower_dir, dtype="float32", device="cpu"))
    assert not marker.exists()
    ids = torch.randint(10, 6000, (1, 20))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, original(ids).logits)


def test_an_exported_directory_with_nan_weights_is_refused_naming_its_safetensors(tower_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from model.files import CheckpointError
    from model.inference import InferenceConfig, load_model
    pth = str(tmp_path / "w.pth")
    make_checkpoint(tower_dir, pth)
    out = export_hf(pth, str(tmp_path / "hf-nan"), os.path.join(ROOT, "model"), tower_dir)
    tensors = load_file(os.path.join(out, "model.safetensors"))
    tensors["tok_embeddings.weight"][0, 0] = float("inf")
    save_file(tensors, os.path.join(out, "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"^{out}/model.safetensors holds NaN or inf values in "
                                              rf"\['output.weight', 'tok_embeddings.weight'\]: it is damaged"):  # tied: one tensor
        load_model(InferenceConfig(weight=out, vision_model_path=tower_dir, dtype="float32", device="cpu"))


def test_the_exported_entry_point_is_repository_code_encoding_chats_as_training_does(tokenizer, tower_dir):
    from model.chat import ChatEncoder
    from model.modeling_minimind_v import MiniMindVLMForCausalLM
    from model.model_vlm import VLMConfig
    model = MiniMindVLMForCausalLM(VLMConfig(vision_model_path=tower_dir, dim=64, n_layers=2, image_token_id=3))
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}]
    assert model.encode_chat(messages, tokenizer) == ChatEncoder(tokenizer, 3, 196).encode_prompt(messages)
