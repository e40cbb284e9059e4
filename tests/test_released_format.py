"""Released MiniMind2-V weights (../shared/specs/minimind2v-checkpoint-format.md): a checkpoint with
the spec's keys and shapes, and a tokenizer like the released one ('@' = id 34 that never merges,
<unk>/<s>/</s> = 0/1/2, its chat template), go through load_model + VLMChat unchanged."""
import argparse
import json
import os

import pytest
import torch
import torch.nn.functional as F

from cli import add_model_args
from model.inference import VLMChat, load_model
from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import llm_state_dict

from builders import AT, SPEC_TEMPLATE, SYSTEM, write_released_tokenizer
from conftest import TINY_LLM

# The template shipped in the released tokenizer_config.json: it opens the assistant turn after
# every user turn by itself and ignores add_generation_prompt.
RELEASED_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{{ '<s>system\\n' + system_message + '</s>\\n' }}{% else %}{{ '<s>system\\n" + SYSTEM + "</s>\\n' }}"
    "{% endif %}{% for message in messages %}{% set content = message['content'] %}"
    "{% if message['role'] == 'user' %}{{ '<s>user\\n' + content + '</s>\\n<s>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '</s>' + '\\n' }}{% endif %}{% endfor %}")


def spec_keys(dim, n_layers, hidden, vocab, vision):
    kv = dim // 8 * 2  # 8 heads, 2 kv heads
    keys = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,), "output.weight": (vocab, dim),
            "vision_proj.vision_proj.0.weight": (dim, vision), "vision_proj.vision_proj.0.bias": (dim,)}
    for i in range(n_layers):
        keys.update({f"layers.{i}.attention.wq.weight": (dim, dim), f"layers.{i}.attention.wk.weight": (kv, dim),
                     f"layers.{i}.attention.wv.weight": (kv, dim), f"layers.{i}.attention.wo.weight": (dim, dim),
                     f"layers.{i}.attention_norm.weight": (dim,), f"layers.{i}.ffn_norm.weight": (dim,),
                     f"layers.{i}.feed_forward.w1.weight": (hidden, dim),
                     f"layers.{i}.feed_forward.w2.weight": (dim, hidden),
                     f"layers.{i}.feed_forward.w3.weight": (hidden, dim)})
    return keys


@pytest.fixture(scope="module")
def released(tower_dir, tmp_path_factory):
    """(checkpoint path, tokenizer dir, state dict) in the released format, tiny sizes."""
    root = tmp_path_factory.mktemp("released")
    tok_dir = write_released_tokenizer(str(root / "tokenizer"), SPEC_TEMPLATE)
    torch.manual_seed(1)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, proj_bias=True, image_token_id=AT, **TINY_LLM))
    torch.nn.init.normal_(model.vision_proj.vision_proj[0].bias, std=0.5)
    sd = llm_state_dict(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == spec_keys(64, 2, 192, 6400, 32)
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()  # one tensor, two names
    path = str(root / "sft_vlm_64.pth")
    torch.save(sd, path)
    return path, tok_dir, sd


def model_args(weight, tokenizer_path, tower_dir):
    args = add_model_args(argparse.ArgumentParser()).parse_args([])
    args.weight, args.tokenizer_path, args.vision_model_path = weight, tokenizer_path, tower_dir
    args.device, args.dtype = "cpu", "float32"
    return args


def test_the_tokenizer_is_like_the_released_one(released):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(released[1])
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.encode("@" * 196, add_special_tokens=False) == [AT] * 196
    assert tok.encode("x@@@y", add_special_tokens=False).count(AT) == 3  # never merges with neighbours
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                                   tokenize=False)
    assert text == f"<s>system\n{SYSTEM}</s>\n<s>user\nhi</s>\n<s>assistant\nyo</s>\n"


def test_load_model_and_chat_use_196_at_placeholders_per_image(released, tower_dir):
    path, tok_dir, sd = released
    model, tokenizer, processor = load_model(model_args(path, tok_dir, tower_dir))
    assert model.config.image_token_id == AT and model.config.proj_bias
    chat = VLMChat(model, tokenizer, processor)
    messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "And here?\n<image>"}]
    ids, _ = chat.encoder.encode_prompt(messages)
    runs = "".join("@" if i == AT else "." for i in ids).split(".")
    assert sorted(len(r) for r in runs if r) == [196, 196]  # two whole runs of 196, nothing else is '@'
    expected = (f"<s>system\n{SYSTEM}</s>\n<s>user\n{'@' * 196}\nWhat is in the picture?</s>\n<s>assistant\n"
                f"A cat.</s>\n<s>user\nAnd here?\n{'@' * 196}</s>\n<s>assistant\n")
    assert tokenizer.decode(ids) == expected


def test_the_projection_bias_is_loaded_and_used(released, tower_dir):
    path, tok_dir, sd = released
    model, _, _ = load_model(model_args(path, tok_dir, tower_dir))
    bias = sd["vision_proj.vision_proj.0.bias"]
    assert bias.abs().sum() > 0 and torch.equal(model.vision_proj.vision_proj[0].bias, bias)
    ids = torch.tensor([[1, 5] + [AT] * 196 + [2]])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        h = model.embed(ids, pixel_values=pixels)
        expected = F.linear(model.encode_images(pixels), sd["vision_proj.vision_proj.0.weight"], bias)
    assert torch.allclose(h[0, 2:198], expected[0], atol=1e-6)


def test_generation_stops_at_the_end_of_sentence_token(released, tower_dir, tmp_path):
    """A checkpoint whose every next token is </s> (id 2): one forward pass, empty answer."""
    path, tok_dir, sd = released
    sd = {k: v.clone() for k, v in sd.items()}
    for k in sd:
        if k.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
            sd[k].zero_()  # blocks add nothing: the last position's logits come from its own embedding
    emb = torch.randn_like(sd["tok_embeddings.weight"]) * 0.02
    emb[:, 0] = 1.0
    emb[2] = 0.0
    emb[2, 0] = 100.0  # </s> lines up with every other token's direction, far more strongly
    sd["tok_embeddings.weight"] = sd["output.weight"] = emb
    eos_path = str(tmp_path / "eos.pth")
    torch.save(sd, eos_path)
    model, tokenizer, processor = load_model(model_args(eos_path, tok_dir, tower_dir))
    chat = VLMChat(model, tokenizer, processor)
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    from PIL import Image
    answer = chat.answer([{"role": "user", "content": "<image>\nWhat is it?"}], [Image.new("RGB", (40, 30), "red")],
                         max_new_tokens=20)
    assert tokenizer.eos_token_id == 2 and answer == "" and len(calls) == 1


def test_missing_and_unexpected_keys_are_listed(released, tower_dir, tmp_path):
    path, tok_dir, sd = released
    bad = dict(sd)
    bad.pop("layers.1.attention.wq.weight")
    bad["vision_proj.vision_proj.1.weight"] = torch.zeros(64, 32)
    bad_path = str(tmp_path / "bad.pth")
    torch.save(bad, bad_path)
    with pytest.raises(RuntimeError, match=r"missing: \['layers.1.attention.wq.weight'\][\s\S]*"
                                           r"unexpected: \['vision_proj.vision_proj.1.weight'\]"):
        load_model(model_args(bad_path, tok_dir, tower_dir))


def test_released_checkpoint_exports_to_transformers_format_and_back(released, tower_dir, tmp_path):
    """convert_model.py with the released tokenizer: '@' recorded as the placeholder, the bias kept,
    the same answer through --load 1, and the reverse conversion gives the released keys back."""
    from convert_model import export_hf, import_hf
    path, tok_dir, sd = released
    out = export_hf(path, str(tmp_path / "released-hf"), tok_dir, tower_dir)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["image_token_id"] == AT and cfg["proj_bias"] and cfg["auto_map"]
    messages = [{"role": "user", "content": "<image>\nWhat is in the picture?"}]
    from PIL import Image
    image = [Image.new("RGB", (64, 48), "blue")]
    answers = []
    for weight in (path, out):  # a .pth, then a directory: the path tells which
        model, tokenizer, processor = load_model(model_args(weight, tok_dir, tower_dir))
        chat = VLMChat(model, tokenizer, processor)
        answers.append((chat.encoder.encode_prompt(messages), chat.answer(messages, image, max_new_tokens=8)))
    assert answers[0] == answers[1]
    back = import_hf(out, str(tmp_path / "back.pth"))
    sd2 = torch.load(back, weights_only=True)
    assert list(sd2) == list(sd) and all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_the_exact_released_chat_template(released, tower_dir, tmp_path):
    path, _, _ = released
    tok_dir = write_released_tokenizer(str(tmp_path / "tok"), RELEASED_TEMPLATE)
    model, tokenizer, processor = load_model(model_args(path, tok_dir, tower_dir))
    chat = VLMChat(model, tokenizer, processor)
    ids, _ = chat.encoder.encode_prompt([{"role": "user", "content": "<image>\nhi"}])
    assert tokenizer.decode(ids) == f"<s>system\n{SYSTEM}</s>\n<s>user\n{'@' * 196}\nhi</s>\n<s>assistant\n"
    ids, labels, _ = chat.encoder.encode([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert tokenizer.decode([i for i, l in zip(ids, labels) if l != -100]) == "yo</s>"


def test_a_typed_at_sign_is_text_beside_an_image_in_serving_and_training(released, tower_dir, tmp_path):
    """With the released tokenizer the image placeholder is '@': only the slots the encoder made for
    an image are image slots; an e-mail address in the same turn is text, answered and trained on."""
    from PIL import Image
    from transformers import AutoTokenizer
    from dataset.vlm_dataset import VLMDataset, collate_batch
    from model.images import load_processor
    path, tok_dir, _ = released
    model, tokenizer, processor = load_model(model_args(path, tok_dir, tower_dir))
    chat = VLMChat(model, tokenizer, processor)
    messages = [{"role": "user", "content": "<image>\nMail it to user@example.com @ noon"}]
    ids, is_image = chat.encoder.encode_prompt(messages)
    assert ids.count(AT) > 196 and sum(is_image) == 196
    red = Image.new("RGB", (64, 64), "red")
    assert isinstance(chat.answer(messages, [red], max_new_tokens=3), str)
    assert len(chat.answer_batch([(messages, [red]), ([{"role": "user", "content": "<image>\nhi"}], [red])],
                                 max_new_tokens=2)) == 2
    red.save(tmp_path / "red.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "red.png", "conversations": [
        messages[0], {"role": "assistant", "content": "Sent to user@example.com."}]}) + "\n")
    dataset = VLMDataset(str(tmp_path / "d.jsonl"), str(tmp_path), AutoTokenizer.from_pretrained(tok_dir),
                         load_processor(tower_dir), AT, 196)
    batch = collate_batch([dataset[0]])
    assert int(batch["image_mask"].sum()) == 196 and int((batch["input_ids"] == AT).sum()) > 196
    model.train()
    loss = model(batch["input_ids"], labels=batch["labels"], pixel_values=batch["pixel_values"],
                 image_mask=batch["image_mask"]).loss
    assert torch.isfinite(loss)


def test_a_model_that_emits_the_at_placeholder_keeps_generating(released, tower_dir):
    """A generated '@' is text: decoding never counts placeholders again, so a model pushed to emit
    nothing but '@' answers with it, alone and in a batch, with and without an image."""
    from PIL import Image
    path, tok_dir, _ = released
    model, tokenizer, processor = load_model(model_args(path, tok_dir, tower_dir))

    def favour_at(module, inputs, logits):  # [B, T, V]
        logits[..., AT] += 1e4
        return logits
    hook = model.output.register_forward_hook(favour_at)
    try:
        chat = VLMChat(model, tokenizer, processor)
        red = Image.new("RGB", (64, 64), "red")
        ask = [{"role": "user", "content": "<image>\nMail user@example.com"}]
        assert chat.answer(ask, [red], max_new_tokens=6) == "@" * 6
        assert chat.answer([{"role": "user", "content": "hi"}], max_new_tokens=6) == "@" * 6
        assert chat.answer_batch([(ask, [red]), ([{"role": "user", "content": "hi @"}], [])],
                                 max_new_tokens=4) == ["@" * 4] * 2
    finally:
        hook.remove()


def test_a_typed_image_pad_token_in_our_tokenizer_is_text(tiny_vlm, tokenizer):
    from model.chat import ChatEncoder
    encoder = ChatEncoder(tokenizer, 3, 196)
    ids, is_image = encoder.encode_prompt([{"role": "user", "content": "<image>\nwhat is <|image_pad|>?"}])
    assert ids.count(3) == 196 == sum(is_image)  # the typed one is its characters, not the placeholder
    with torch.no_grad():
        out = tiny_vlm(torch.tensor([ids]), pixel_values=torch.randn(1, 3, 224, 224),
                       image_mask=torch.tensor([is_image]))
    assert torch.isfinite(out.logits).all()
