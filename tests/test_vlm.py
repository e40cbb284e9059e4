"""MiniMind-V: where image features go, the frozen tower, and strict checkpoint loading."""
import re
import sys

import pytest
import torch

from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import infer_config_from_state_dict, llm_state_dict, load_weights

from conftest import TINY_LLM

IMG = 3  # <|image_pad|>


def batch_with_images(n_images_per_row, T=500):
    """Rows with 0, 1, 2 ... images: each image is a run of 196 placeholders among random tokens."""
    ids = torch.randint(10, 6000, (len(n_images_per_row), T))
    for row, k in enumerate(n_images_per_row):
        for j in range(k):
            start = 3 + j * 200
            ids[row, start:start + 196] = IMG
    return ids


def test_image_features_land_exactly_on_placeholders_in_order(tiny_vlm):
    ids = batch_with_images([0, 1, 2])  # 3 images in the batch, none in row 0
    pixels = torch.randn(3, 3, 224, 224)
    with torch.no_grad():
        h = tiny_vlm.embed(ids, pixel_values=pixels)
        text = tiny_vlm.tok_embeddings(ids)
        feats = tiny_vlm.vision_proj(tiny_vlm.encode_images(pixels))  # [3, 196, D]
    is_img = ids == IMG
    assert torch.equal(h[~is_img], text[~is_img])  # text untouched
    assert torch.equal(h[0], text[0])  # the image-free row is pure text
    assert torch.allclose(h[1, 3:199], feats[0])  # row 1's image is image 0
    assert torch.allclose(h[2, 3:199], feats[1]) and torch.allclose(h[2, 203:399], feats[2])


def test_precomputed_features_give_the_same_logits_as_pixels(tiny_vlm):
    ids = batch_with_images([1])
    pixels = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        a = tiny_vlm(ids, pixel_values=pixels).logits
        b = tiny_vlm(ids, image_features=tiny_vlm.encode_images(pixels)).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("rows,n_pixels", [([1], 2), ([2], 1), ([0], 1)])
def test_placeholder_count_must_match_the_images(tiny_vlm, rows, n_pixels):
    with pytest.raises(ValueError, match="placeholder"):
        tiny_vlm(batch_with_images(rows), pixel_values=torch.randn(n_pixels, 3, 224, 224))


def test_without_images_a_placeholder_id_is_text(tiny_vlm):
    """A typed '@' (the released tokenizer's placeholder) in a text-only prompt, or one the model
    generates after the prompt, embeds as the token it is."""
    ids = batch_with_images([1])
    with torch.no_grad():
        h = tiny_vlm.embed(ids)
    assert torch.equal(h, tiny_vlm.tok_embeddings(ids))


def test_a_model_that_generates_the_placeholder_keeps_generating(tiny_vlm):
    ids = batch_with_images([1], T=220)
    hook = tiny_vlm.output.register_forward_hook(  # every step's favourite token: the placeholder
        lambda module, inputs, logits: logits.index_add(-1, torch.tensor([IMG]), torch.full((*logits.shape[:-1], 1), 1e4)))
    try:
        new = list(tiny_vlm.generate_stream(ids, pixel_values=torch.randn(1, 3, 224, 224), max_new_tokens=5,
                                            eos_token_id=-1))
    finally:
        hook.remove()
    assert [int(t) for t in new] == [IMG] * 5


def test_a_row_whose_placeholders_are_not_whole_images_is_an_error(tiny_vlm):
    ids = batch_with_images([1, 1])
    ids[0, 3] = 11
    ids[1, 300] = IMG  # totals still 2 * 196, but row 0 has 195 and row 1 has 197
    with pytest.raises(ValueError, match=r"\[195, 197\] image placeholder tokens .* each image needs exactly 196"):
        tiny_vlm(ids, pixel_values=torch.randn(2, 3, 224, 224))


def test_the_tower_is_frozen_and_stays_in_eval_mode(tiny_vlm):
    tiny_vlm.train()
    assert not tiny_vlm.vision_encoder.training and tiny_vlm.layers[0].training
    assert not any(p.requires_grad for p in tiny_vlm.vision_encoder.parameters())
    ids = batch_with_images([1])
    out = tiny_vlm(ids, pixel_values=torch.randn(1, 3, 224, 224), labels=ids)
    out.loss.backward()
    assert tiny_vlm.vision_proj.vision_proj[0].weight.grad is not None
    assert all(p.grad is None for p in tiny_vlm.vision_encoder.parameters())


def test_a_batch_without_images_still_gives_the_projection_a_gradient(tiny_vlm):
    tiny_vlm.train()
    ids = torch.randint(10, 6000, (2, 20))
    tiny_vlm(ids, labels=ids).loss.backward()
    assert tiny_vlm.vision_proj.vision_proj[0].weight.grad is not None  # zero, but present: no DDP hang


def test_loads_a_full_clip_directory_and_a_vision_only_one(tmp_path):
    from make_demo_vision_tower import build_vision_tower
    for full in (False, True):
        path = str(tmp_path / f"full{full}")
        build_vision_tower(path, hidden_size=32, num_layers=1, num_heads=2, full_clip=full)
        model = MiniMindVLM(VLMConfig(vision_model_path=path, **TINY_LLM))
        assert model.encode_images(torch.randn(1, 3, 224, 224)).shape == (1, 196, 32)


def test_missing_vision_directory_says_where_to_get_clip_with_commands_that_write_where_it_looked(tmp_path,
                                                                                                  monkeypatch):
    import make_demo_vision_tower
    path = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError) as error:
        MiniMindVLM(VLMConfig(vision_model_path=path, **TINY_LLM))
    message = str(error.value)
    assert f"git clone https://huggingface.co/openai/clip-vit-base-patch16 {path}`" in message
    command = re.search(r"`python (demo/make_demo_vision_tower.py .*?)`", message).group(1).split()
    assert command == ["demo/make_demo_vision_tower.py", "--out_dir", path]
    monkeypatch.setattr(sys, "argv", command)
    make_demo_vision_tower.main()  # the stand-in, where the loader looks: the same call now works
    assert MiniMindVLM(VLMConfig(vision_model_path=path, **TINY_LLM)).vision_encoder is not None


def test_checkpoints_never_contain_the_tower_and_load_strictly(tiny_vlm, tower_dir, tmp_path):
    sd = llm_state_dict(tiny_vlm)
    assert not any(k.startswith("vision_encoder.") for k in sd) and "vision_proj.vision_proj.0.weight" in sd
    path = str(tmp_path / "w.pth")
    torch.save(sd, path)
    other = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    load_weights(other, path)
    assert torch.equal(other.layers[1].attention.wq.weight, tiny_vlm.layers[1].attention.wq.weight)
    bad = dict(sd)
    bad.pop("norm.weight")
    bad["extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match=r"missing: \['norm.weight'\][\s\S]*unexpected: \['extra.weight'\]"):
        load_weights(other, bad)


def test_an_llm_only_checkpoint_loads_into_the_vlm(tiny_vlm, tower_dir):
    llm_only = {k: v for k, v in llm_state_dict(tiny_vlm).items() if not k.startswith("vision_proj.")}
    other = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    load_weights(other, llm_only)
    assert torch.equal(other.norm.weight, tiny_vlm.norm.weight)


def test_a_released_style_checkpoint_with_projection_bias_is_detected_and_loads(tower_dir):
    biased = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, proj_bias=True, **TINY_LLM))
    sd = llm_state_dict(biased)
    found = infer_config_from_state_dict(sd)
    assert found == {"dim": 64, "vocab_size": 6400, "n_layers": 2, "use_moe": False, "proj_bias": True,
                     "generation": "minimind2", "n_kv_heads": 2, "hidden_dim": 192, "projector": "linear",
                     "vision_hidden_size": 32}
    with pytest.raises(RuntimeError, match="vision_proj.vision_proj.0.bias"):
        load_weights(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)), sd)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM, proj_bias=found["proj_bias"]))
    load_weights(model, sd)
    assert torch.equal(model.vision_proj.vision_proj[0].bias, biased.vision_proj.vision_proj[0].bias)


def test_tower_dtype_follows_the_model(tiny_vlm):
    tiny_vlm.to(torch.bfloat16)
    assert tiny_vlm.encode_images(torch.randn(1, 3, 224, 224)).dtype == torch.bfloat16
    assert {p.dtype for p in tiny_vlm.vision_encoder.parameters()} == {torch.bfloat16}


def test_int8_quantization_fuses_and_covers_the_llm_only_and_stays_close_to_full_precision(tiny_vlm):
    import copy
    from torch import nn
    from model.inference import quantize_int8
    ids = batch_with_images([1], T=260)
    pixels = torch.randn(1, 3, 224, 224)
    quantized = quantize_int8(copy.deepcopy(tiny_vlm))
    int8_linear = torch.ao.nn.quantized.dynamic.Linear
    ffn, attention = quantized.layers[0].feed_forward, quantized.layers[0].attention
    assert isinstance(ffn.fused_w13, int8_linear) and isinstance(attention.fused_qkv, int8_linear)
    assert isinstance(ffn.w2, int8_linear) and isinstance(quantized.output, int8_linear)
    assert type(quantized.vision_proj.vision_proj[0]) is nn.Linear  # runs once per image: full precision
    with torch.no_grad():
        full = tiny_vlm(ids, pixel_values=pixels).logits[0]  # [T, V]
        int8 = quantized(ids, pixel_values=pixels).logits[0]
    assert ((int8 - full).norm() / full.norm()).item() < 0.05
    assert (int8.argmax(-1) == full.argmax(-1)).float().mean().item() > 0.9
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(copy.deepcopy(tiny_vlm).to(torch.bfloat16))


def test_a_frozen_tower_runs_without_autograd_and_a_trainable_one_passes_gradients():
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    from model.model_vlm import tower_features
    tower = CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=32, patch_size=16))
    pixels = torch.randn(2, 3, 32, 32)
    tower.requires_grad_(False)
    assert not tower_features(tower, pixels).requires_grad  # frozen: no graph kept
    tower.requires_grad_(True)
    tokens = tower_features(tower, pixels)  # [2, 4, 32]
    assert tokens.shape == (2, 4, 32) and tokens.requires_grad
    tokens.sum().backward()
    assert tower.embeddings.patch_embedding.weight.grad is not None
    with torch.no_grad():
        assert not tower_features(tower, pixels).requires_grad


def test_decoding_checks_the_placeholders_of_the_prompt_once_not_every_token(tiny_vlm, monkeypatch):
    checks = []
    image_slots = tiny_vlm.image_slots
    monkeypatch.setattr(tiny_vlm, "image_slots", lambda *args: checks.append(args) or image_slots(*args))
    new = list(tiny_vlm.generate_stream(batch_with_images([1], T=220), pixel_values=torch.randn(1, 3, 224, 224),
                                        max_new_tokens=5, eos_token_id=-1))
    assert len(new) == 5 and len(checks) == 1  # the prefill's: a check per token would read the device each time
