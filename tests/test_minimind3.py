"""The 2026 minimind-3v release in every entry point: a checkpoint in its exact key format (fp16),
a SigLIP2-shaped tower (256 px, patch 32: 64 tokens), and a tokenizer whose chat template opens
an empty <think> block in the generation prompt, all built here."""
import argparse
import json
import os
import shutil

import pytest
import torch
from PIL import Image

from builders import spec_2026_state_dict
from conftest import ROOT, launch, make_toy_data, script_flags, write_image

SIGLIP_WIDTH, SIGLIP_SIZE, SIGLIP_PATCH = 32, 256, 32  # the release's geometry, a tiny width
N_TOKENS = (SIGLIP_SIZE // SIGLIP_PATCH) ** 2  # 64
THINK_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' + (message.get('reasoning_content') or '') + '\\n</think>\\n\\n'"
    " + message['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{%- if open_thinking is defined and open_thinking %}"
    "{{ '<|im_start|>assistant\\n<think>\\n' }}{%- else %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}")


@pytest.fixture(scope="module")
def siglip2_dir(tmp_path_factory):
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    path = str(tmp_path_factory.mktemp("siglip2"))
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=SIGLIP_SIZE, patch_size=SIGLIP_PATCH, hidden_size=SIGLIP_WIDTH,
                                         intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
                      ).save_pretrained(path)
    SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizer3_dir(tmp_path_factory):
    """Our tokenizer with the 2026 release's kind of chat template (the <think> block)."""
    path = tmp_path_factory.mktemp("tok3")
    shutil.copy(os.path.join(ROOT, "model", "tokenizer.json"), path)
    with open(os.path.join(ROOT, "model", "tokenizer_config.json")) as f:
        config = json.load(f)
    config["chat_template"] = THINK_TEMPLATE
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def vlm3_pth(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("w3") / "sft_vlm_128.pth")
    torch.save(spec_2026_state_dict(projector_width=SIGLIP_WIDTH), path)
    return path


def model_args(pth, tok, tower, *extra):
    from cli import add_model_args
    return add_model_args(argparse.ArgumentParser()).parse_args(
        ["--weight", pth, "--tokenizer_path", tok, "--vision_model_path", tower, "--device", "cpu", *extra])


def test_the_think_template_prompts_and_supervises_as_the_release_does(tokenizer3_dir):
    from transformers import AutoTokenizer
    from model.chat import ChatEncoder
    tok = AutoTokenizer.from_pretrained(tokenizer3_dir)
    messages = [{"role": "user", "content": "<image>\nWhat colour?"}, {"role": "assistant", "content": "red"}]
    closed, opened = ChatEncoder(tok, 3, N_TOKENS), ChatEncoder(tok, 3, N_TOKENS, open_thinking=True)
    assert tok.decode(closed.encode_prompt(messages[:1])[0]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(opened.encode_prompt(messages[:1])[0]).endswith("<|im_start|>assistant\n<think>\n")
    ids, labels, _ = closed.encode(messages)
    assert tok.decode([t for t in labels if t != -100]) == "red<|im_end|>"  # not the think block
    assert ids.count(3) == N_TOKENS


def test_64_placeholders_per_image_with_0_1_and_2_images_per_sample(tmp_path, tokenizer3_dir, siglip2_dir, vlm3_pth):
    from transformers import AutoTokenizer
    from model.images import load_processor
    from dataset.vlm_dataset import VLMDataset, collate_batch
    from model.inference import load_model
    for name, colour in (("a.png", "red"), ("b.png", "blue")):
        write_image(tmp_path / name, colour, size=(300, 200))
    rows = [("no image here", ""), ("<image> one", "a.png"), ("<image> and <image>", "a.png, b.png")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"conversations": [
        {"role": "user", "content": q}, {"role": "assistant", "content": "ok"}], "image": im}) + "\n" for q, im in rows))
    model, _, _ = load_model(model_args(vlm3_pth, tokenizer3_dir, siglip2_dir, "--dtype", "float32"))
    assert model.config.image_token_count == N_TOKENS and model.config.projector == "mlp"
    ds = VLMDataset(str(tmp_path / "d.jsonl"), str(tmp_path), AutoTokenizer.from_pretrained(tokenizer3_dir),
                    load_processor(siglip2_dir), model.config.image_token_id, model.config.image_token_count)
    assert [int((ds[i]["input_ids"] == model.config.image_token_id).sum()) for i in range(3)] == [0, 64, 128]
    batch = collate_batch([ds[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, SIGLIP_SIZE, SIGLIP_SIZE)
    with torch.no_grad():
        out = model(batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"])
    assert torch.isfinite(out.loss)


def test_the_feature_cache_with_a_siglip_tower(tmp_path, siglip2_dir):
    from dataset.feature_cache import encode_with_cache, image_key, open_cache_for
    from model.images import load_processor, open_image, to_pixels
    from model.model_vlm import MiniMindVLM, VLMConfig
    write_image(tmp_path / "a.png", "red")
    model = MiniMindVLM(VLMConfig(vision_model_path=siglip2_dir, dim=64, n_layers=1, projector="mlp")).eval()
    processor = load_processor(siglip2_dir)
    cache = open_cache_for(model.vision_encoder, processor, str(tmp_path / "cache"))
    assert cache.row_shape == (N_TOKENS, SIGLIP_WIDTH)
    pixels = to_pixels(processor, [open_image(str(tmp_path / "a.png"))])
    key = image_key(str(tmp_path / "a.png"))
    cold = encode_with_cache(model, cache, pixels, [key], [None])
    assert torch.equal(cache.lookup(key), model.encode_images(pixels)[0].half()) and torch.equal(cold[0], cache.lookup(key))


def test_eval_web_demo_and_api_answer_with_a_2026_model_and_hide_the_reasoning(
        tmp_path, tokenizer3_dir, siglip2_dir, vlm3_pth, monkeypatch):
    from fastapi.testclient import TestClient

    import serve_openai_api as api
    import web_demo_vlm
    from eval_vlm import run_benchmark
    from model.inference import VLMChat, load_model
    write_image(tmp_path / "a.png", "red")
    (tmp_path / "bench.jsonl").write_text(json.dumps({"conversations": [
        {"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "red"}], "image": "a.png"}) + "\n")
    chat = VLMChat(*load_model(model_args(vlm3_pth, tokenizer3_dir, siglip2_dir)))
    summary, rows = run_benchmark(chat, str(tmp_path / "bench.jsonl"), str(tmp_path), max_new_tokens=3, progress=False)
    assert summary["n"] == 1 and isinstance(rows[0]["prediction"], str)  # eval_vlm.py --bench
    web_args = web_demo_vlm.parse_args(["--weight", vlm3_pth, "--tokenizer_path", tokenizer3_dir,
                                        "--vision_model_path", siglip2_dir, "--device", "cpu"])
    hub = web_demo_vlm.ModelHub(web_args)
    assert "dim 128" in web_demo_vlm.describe(hub.default, hub.get(hub.default))  # the web demo loads it

    # The API, with an open think block: reasoning goes to reasoning_content, never into the content.
    thinking = VLMChat(*load_model(model_args(vlm3_pth, tokenizer3_dir, siglip2_dir)), open_thinking=True)
    def steps(prompts, pixels, *args, stats, **kw):  # the server's batch of one
        yield from ([piece] for piece in ["It looks", " warm.</thi", "nk>\n\nRed", "."])
        stats[0].update(tokens=5, finish_reason="stop")
    monkeypatch.setattr(thinking, "stream_batch", steps)
    assert thinking.encoder.prompt_options == {"open_thinking": True}
    app_args = api.parse_args(["--weight", vlm3_pth, "--open_thinking"])
    client = TestClient(api.create_app(api.Batcher(thinking), app_args, "minimind-3v"))
    message = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Colour?"}]}
                          ).json()["choices"][0]["message"]
    assert message["content"] == "Red." and message["reasoning_content"] == "It looks warm."
    events = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Colour?"}],
                                                       "stream": True}).text
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in events.splitlines()
              if line.startswith("data: {") and '"delta"' in line]
    assert "".join(d.get("content", "") for d in deltas) == "Red."
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "It looks warm."


def test_export_to_transformers_and_back_keeps_logits_and_the_2026_keys(tmp_path, tokenizer3_dir, siglip2_dir,
                                                                        vlm3_pth):
    from transformers import AutoModelForCausalLM
    from convert_model import export_hf, import_hf
    from model.images import load_processor, to_pixels
    from model.inference import load_model
    ours, _, _ = load_model(model_args(vlm3_pth, tokenizer3_dir, siglip2_dir, "--dtype", "float32"))
    out = export_hf(vlm3_pth, str(tmp_path / "hf"), tokenizer3_dir, siglip2_dir)
    theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32).eval()
    ids = torch.randint(40, 6000, (1, 80))
    ids[0, 4:4 + N_TOKENS] = ours.config.image_token_id
    pixels = to_pixels(load_processor(siglip2_dir), [Image.new("RGB", (300, 240), "green")])
    with torch.no_grad():
        a, b = ours(ids, pixel_values=pixels).logits, theirs(input_ids=ids, pixel_values=pixels).logits
    assert (a - b).abs().max() < 1e-5
    back = torch.load(import_hf(out, str(tmp_path / "back.pth")), weights_only=True)
    original = torch.load(vlm3_pth, weights_only=True)
    assert sorted(back) == sorted(original)  # the 2026 release's key names
    assert all(torch.allclose(back[k], original[k].float(), atol=1e-3) for k in original)


def test_an_export_written_without_its_siglip_tower_takes_the_towers_placeholder_count_when_given_it(
        tmp_path, tokenizer3_dir, siglip2_dir, vlm3_pth):
    from transformers import AutoModelForCausalLM
    from convert_model import export_hf
    out = export_hf(vlm3_pth, str(tmp_path / "hf-notower"), tokenizer3_dir, str(tmp_path / "no-tower"))
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, vision_model_path=siglip2_dir,
                                                 dtype=torch.float32)
    assert model.config.image_token_count == N_TOKENS  # not the default 196 its config.json kept
    ids = torch.randint(40, 6000, (1, 80))
    ids[0, 4:4 + N_TOKENS] = model.config.image_token_id
    pixels = torch.randn(1, 3, 256, 256)
    assert torch.isfinite(model(input_ids=ids, pixel_values=pixels).logits).all()


@pytest.mark.slow
def test_pretrain_then_sft_of_a_2026_model_through_the_real_scripts(tmp_path, tokenizer3_dir, siglip2_dir):
    """From the 2026 release's LLM-only file: pretrain a fresh MLP projector (LLM frozen), then SFT
    the projector with the first and last layers (--freeze_llm 3); both save the 2026 key format."""
    out = tmp_path / "out"
    out.mkdir()
    llm = {k: v for k, v in spec_2026_state_dict().items()}
    torch.save(llm, out / "llm_128.pth")
    data = make_toy_data(tmp_path / "data", n=6)
    common = dict(dim=128, n_layers=2, epochs=1, tokenizer_path=tokenizer3_dir, vision_model_path=siglip2_dir,
                  max_seq_len=200)
    launch("train_pretrain_vlm.py", script_flags(data, siglip2_dir, out, from_weight="llm", projector="mlp",
                                                 freeze_llm=2, **common))
    pre = torch.load(out / "pretrain_vlm_128.pth", weights_only=True)
    assert "model.embed_tokens.weight" in pre and "vision_proj.mlp.1.weight" in pre and not any(
        k.startswith("layers.") for k in pre)
    assert all(torch.equal(pre[k], llm[k].float()) for k in llm)  # --freeze_llm 2: the LLM is untouched
    launch("train_sft_vlm.py", script_flags(data, siglip2_dir, out, from_weight="pretrain_vlm", freeze_llm=3,
                                            learning_rate=1e-2, **common))
    sft = torch.load(out / "sft_vlm_128.pth", weights_only=True)
    assert sorted(sft) == sorted(pre)
    changed = {k.split(".")[2] for k in llm if k.startswith("model.layers.") and not torch.equal(sft[k], pre[k])}
    assert changed == {"0", "1"} and torch.equal(sft["model.norm.weight"], pre["model.norm.weight"])
    assert torch.equal(sft["model.embed_tokens.weight"], pre["model.embed_tokens.weight"])
    assert not torch.equal(sft["vision_proj.mlp.1.weight"], pre["vision_proj.mlp.1.weight"])


def test_freeze_llm_3_trains_the_projector_and_the_first_and_last_layers_only():
    from model.model_vlm import MiniMindVLM, VLMConfig
    from trainer.build import set_trainable
    model = MiniMindVLM(VLMConfig(dim=64, n_layers=4), load_tower=False)
    set_trainable(model, 3)
    trainable = {n.split(".")[1] if n.startswith("layers.") else n.split(".")[0]
                 for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"0", "3", "vision_proj"}
