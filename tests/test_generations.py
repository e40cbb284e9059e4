"""Both release generations in one model (../shared/specs/minimind3v-release.md): checkpoints written
here in exactly the 2026 release's key format (dense and MoE, LLM-only and VLM, fp16) load strictly,
give the logits of an independent implementation of the spec's formulas, and save back unchanged;
a SigLIP tower keeps all its tokens and feeds the MLP projector."""
import pytest
import torch
import torch.nn.functional as F

from model.checkpoint import infer_config_from_state_dict, llm_state_dict, load_weights
from model.files import CheckpointError
from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
from model.model_vlm import MiniMindVLM, VLMConfig, load_vision_tower

from builders import DIM, FFN, HEAD_DIM, HEADS, KV_HEADS, LAYERS, VOCAB, spec_2026_state_dict
from conftest import SIGLIP_PATCH, SIGLIP_SIZE, SIGLIP_WIDTH

IMG = 12  # <|image_pad|> in the 2026 tokenizer


def spec_projector(sd, features):
    """The spec's projector: LayerNorm, Linear, GELU (exact), Linear. [N, n, C] -> [N, n, D]."""
    W = {k: v.float() for k, v in sd.items()}
    x = F.layer_norm(features.float(), (features.shape[-1],), W["vision_proj.mlp.0.weight"],
                     W["vision_proj.mlp.0.bias"])
    x = F.gelu(F.linear(x, W["vision_proj.mlp.1.weight"], W["vision_proj.mlp.1.bias"]), approximate="none")
    return F.linear(x, W["vision_proj.mlp.3.weight"], W["vision_proj.mlp.3.bias"])


def spec_logits(sd, ids, image_embeddings=None):
    """The spec's forward pass, written out straight from its table, in fp32. ids [B, T] -> [B, T, V].
    image_embeddings [n, D] replace the embeddings of the image placeholders, in order."""
    W = {k: v.float() for k, v in sd.items()}
    B, T = ids.shape

    def rms(x, weight):
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))

    def rope(x):  # [B, H, T, hd], rotate-half: dimension i pairs with i + hd/2, theta 1e6
        half = x.shape[-1] // 2
        angles = torch.arange(T).float()[:, None] * 1e6 ** (-torch.arange(0, 2 * half, 2).float() / (2 * half))
        cos, sin = angles.cos().repeat(1, 2), angles.sin().repeat(1, 2)  # [T, hd]
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin

    def swiglu(x, p):
        return F.linear(F.silu(F.linear(x, W[p + "gate_proj.weight"])) * F.linear(x, W[p + "up_proj.weight"]),
                        W[p + "down_proj.weight"])

    h = W["model.embed_tokens.weight"][ids]  # [B, T, D]
    if image_embeddings is not None:
        h[ids == IMG] = image_embeddings
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        x = rms(h, W[p + "input_layernorm.weight"])
        q = F.linear(x, W[p + "self_attn.q_proj.weight"]).view(B, T, HEADS, HEAD_DIM)
        k = F.linear(x, W[p + "self_attn.k_proj.weight"]).view(B, T, KV_HEADS, HEAD_DIM)
        v = F.linear(x, W[p + "self_attn.v_proj.weight"]).view(B, T, KV_HEADS, HEAD_DIM).transpose(1, 2)
        q = rope(rms(q, W[p + "self_attn.q_norm.weight"]).transpose(1, 2))
        k = rope(rms(k, W[p + "self_attn.k_norm.weight"]).transpose(1, 2))
        rep = HEADS // KV_HEADS  # query head j uses key/value head j // rep
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + F.linear(att.transpose(1, 2).reshape(B, T, -1), W[p + "self_attn.o_proj.weight"])
        x = rms(h, W[p + "post_attention_layernorm.weight"])
        if p + "mlp.gate.weight" in W:  # top-1 of a softmax router, renormalised: weight 1 on one expert
            expert = F.linear(x, W[p + "mlp.gate.weight"]).softmax(-1).argmax(-1)  # [B, T]
            out = torch.stack([swiglu(x, f"{p}mlp.experts.{e}.") for e in range(4)], -1)  # [B, T, D, E]
            h = h + out.gather(-1, expert[..., None, None].expand(B, T, DIM, 1)).squeeze(-1)
        else:
            h = h + swiglu(x, p + "mlp.")
    return F.linear(rms(h, W["model.norm.weight"]), W["lm_head.weight"])


def llm_from(sd):
    found = infer_config_from_state_dict(sd)
    model = MiniMindForCausalLM(MiniMindConfig(**found)).eval()
    load_weights(model, sd)
    return model, found


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_a_2026_checkpoint_loads_strictly_and_gives_the_spec_formulas_logits(moe, tmp_path):
    sd = spec_2026_state_dict(moe=moe)
    path = str(tmp_path / "llm_128.pth")
    torch.save(sd, path)
    found = infer_config_from_state_dict(torch.load(path, weights_only=True))
    assert found == {"generation": "minimind3", "dim": DIM, "vocab_size": VOCAB, "n_layers": LAYERS, "n_heads": HEADS,
                     "n_kv_heads": KV_HEADS, "head_dim": DIM // HEADS, "hidden_dim": FFN, "use_moe": moe,
                     **({"n_routed_experts": 4, "n_shared_experts": 0} if moe else {})}
    model = MiniMindForCausalLM(MiniMindConfig(**found)).eval()
    cfg = model.config
    assert (cfg.norm_eps, cfg.qk_norm, cfg.rope_theta, cfg.num_experts_per_tok, cfg.n_shared_experts) == \
           (1e-6, True, 1e6, 1, 0)
    load_weights(model, path)
    assert model.norm.weight.dtype == torch.float32  # the fp16 file, cast to the model's dtype
    assert model.output.weight is model.tok_embeddings.weight
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = model(ids).logits
    expected = spec_logits(sd, ids)
    assert (ours - expected).abs().max() < 1e-4
    # The same weights under our names but without the per-head RoPE permutation give other logits,
    # so the match above depends on the permutation.
    from model.checkpoint import name_2025
    unpermuted = MiniMindForCausalLM(MiniMindConfig(**found)).eval()
    unpermuted.load_state_dict({name_2025(k): v for k, v in sd.items()})
    with torch.no_grad():
        assert (unpermuted(ids).logits - expected).abs().max() > 1e-2


def test_kv_cache_decoding_of_a_2026_model_equals_its_full_forward():
    from model.model_minimind import KVCache
    model, _ = llm_from(spec_2026_state_dict())
    ids = torch.randint(0, VOCAB, (2, 12))
    cache = KVCache(LAYERS)
    with torch.no_grad():
        full = model(ids).logits
        steps = [model(ids[:, :7], past_key_values=cache, use_cache=True).logits]
        steps += [model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits for t in range(7, 12)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_save_then_load_gives_the_identical_2026_state_dict(moe, tmp_path):
    sd = spec_2026_state_dict(moe=moe)
    model, found = llm_from(sd)
    saved = llm_state_dict(model)
    assert sorted(saved) == sorted(sd)  # the spec's keys (in our module order: gate, down, up, as upstream's)
    assert all(torch.equal(saved[k], sd[k].float()) and saved[k].dtype == torch.float32 for k in sd)
    assert saved["lm_head.weight"].data_ptr() == saved["model.embed_tokens.weight"].data_ptr()
    path = str(tmp_path / "again.pth")
    torch.save(saved, path)
    again, _ = llm_from(torch.load(path, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    resaved = llm_state_dict(again)
    assert list(resaved) == list(saved) and all(torch.equal(resaved[k], saved[k]) for k in saved)


def test_a_missing_or_renamed_2026_key_is_an_error_listing_it():
    sd = spec_2026_state_dict()
    found = infer_config_from_state_dict(sd)
    model = MiniMindForCausalLM(MiniMindConfig(**found))
    bad = dict(sd)
    bad.pop("model.layers.1.self_attn.k_norm.weight")
    with pytest.raises(CheckpointError, match=r"missing: \['model.layers.1.self_attn.k_norm.weight'\]; "
                                              r"unexpected: \[\]"):
        load_weights(model, bad, "llm_768.pth")
    bad = dict(sd)
    bad["model.layers.0.mlp.upproj.weight"] = bad.pop("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"llm_768.pth[\s\S]*missing: \['model.layers.0.mlp.up_proj.weight'\]; "
                                              r"unexpected: \['model.layers.0.mlp.upproj.weight'\]"):
        load_weights(model, bad, "llm_768.pth")
    bad = dict(sd)
    bad["layers.0.attention.wq.weight"] = bad.pop("model.layers.0.self_attn.q_proj.weight")  # a 2025 name
    with pytest.raises(CheckpointError, match=r"unexpected: \['layers.0.attention.wq.weight'\]"):
        load_weights(model, bad)


def test_a_2026_checkpoint_into_a_2025_model_says_which_generation_each_is():
    model = MiniMindForCausalLM(MiniMindConfig(dim=DIM, n_layers=LAYERS))
    with pytest.raises(CheckpointError, match=r"file has generation minimind3[\s\S]*model generation minimind2"):
        load_weights(model, spec_2026_state_dict())


def test_a_2026_model_in_our_own_names_loads_too():
    """What scripts/convert_model.py --reverse and DeepSpeed's gathered weights write for a 2026
    model: our module names and RoPE layout, with QK-norm weights. It is recognised and loads."""
    model, found = llm_from(spec_2026_state_dict())
    ours = {k: v.clone() for k, v in model.state_dict().items()}
    assert infer_config_from_state_dict(ours) == found
    other = MiniMindForCausalLM(MiniMindConfig(**found))
    load_weights(other, ours)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in ours.items())


def test_the_2025_generation_is_saved_in_the_2025_format():
    model = MiniMindForCausalLM(MiniMindConfig(dim=64, n_layers=2, use_moe=True))
    sd = llm_state_dict(model)
    assert "tok_embeddings.weight" in sd and "layers.0.feed_forward.shared_experts.w1.weight" in sd
    assert not any(k.startswith("model.") or "q_norm" in k or "k_norm" in k for k in sd)
    assert infer_config_from_state_dict(sd)["generation"] == "minimind2"
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())  # our layout, unpermuted


def test_minimind3_moe_routes_top1_without_a_shared_expert_and_its_balance_loss_is_the_spec_formula():
    model, _ = llm_from(spec_2026_state_dict(moe=True))
    moe = model.layers[0].feed_forward
    assert moe.shared_experts is None
    seen = {}
    moe.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    model.train()
    model(torch.randint(0, VOCAB, (2, 16)))
    x = seen["x"].reshape(-1, DIM)
    scores = moe.gate(x).softmax(-1)  # [N, 4]
    top = scores.argmax(-1)
    load = F.one_hot(top, 4).float().mean(0)
    assert torch.allclose(moe.aux_loss, 4 * 5e-4 * (load * scores.mean(0)).sum(), rtol=1e-5)
    by_expert = torch.stack([moe.experts[int(e)](row) for row, e in zip(x, top)])
    assert torch.allclose(seen["out"].reshape(-1, DIM), by_expert, atol=1e-5)


def test_fused_projections_for_int8_keep_a_2026_model_and_its_moe_the_same():
    import copy

    from model.quantize import FusedFeedForward, FusedQKVAttention, fuse_projections
    model, _ = llm_from(spec_2026_state_dict(moe=True))
    fused = fuse_projections(copy.deepcopy(model))
    assert isinstance(fused.layers[0].attention, FusedQKVAttention)
    assert isinstance(fused.layers[0].feed_forward.experts[0], FusedFeedForward)
    ids = torch.randint(0, VOCAB, (1, 10))
    with torch.no_grad():
        assert (fused(ids).logits - model(ids).logits).abs().max() < 1e-4


# --- the vision side: a SigLIP tower and the MLP projector -------------------------------------------

def test_a_siglip_tower_gives_all_its_patch_tokens(siglip_dir):
    from transformers import SiglipVisionModel
    model = MiniMindVLM(VLMConfig(vision_model_path=siglip_dir, dim=64, n_layers=1))
    assert isinstance(model.vision_encoder, SiglipVisionModel)
    assert (model.config.image_token_count, model.config.vision_hidden_size) == ((SIGLIP_SIZE // SIGLIP_PATCH) ** 2,
                                                                                 SIGLIP_WIDTH)
    pixels = torch.randn(2, 3, SIGLIP_SIZE, SIGLIP_SIZE)
    with torch.no_grad():
        everything = model.vision_encoder(pixel_values=pixels).last_hidden_state
    assert everything.shape == (2, 16, SIGLIP_WIDTH) and torch.equal(model.encode_images(pixels), everything)
    saved = SiglipVisionModel.from_pretrained(siglip_dir).state_dict()  # the weights really were loaded
    assert all(torch.equal(model.vision_encoder.state_dict()[k], v) for k, v in saved.items())


def test_a_2026_vlm_checkpoint_loads_strictly_and_uses_the_mlp_projector(siglip_dir, tmp_path):
    sd = spec_2026_state_dict(projector_width=SIGLIP_WIDTH)
    path = str(tmp_path / "sft_vlm_128.pth")
    torch.save(sd, path)
    found = infer_config_from_state_dict(sd)
    assert (found["generation"], found["projector"], found["vision_hidden_size"]) == ("minimind3", "mlp", SIGLIP_WIDTH)
    model = MiniMindVLM(VLMConfig(**found, vision_model_path=siglip_dir, image_token_id=IMG)).eval()
    load_weights(model, path)
    n = model.config.image_token_count
    ids = torch.randint(40, VOCAB, (1, 30))
    ids[0, 5:5 + n] = IMG
    pixels = torch.randn(1, 3, SIGLIP_SIZE, SIGLIP_SIZE)
    with torch.no_grad():
        features = model.encode_images(pixels)  # [1, 16, 32]
        h = model.embed(ids, pixel_values=pixels)
        logits = model(ids, pixel_values=pixels).logits
    by_hand = spec_projector(sd, features)[0]  # [16, D]
    assert (h[0, 5:5 + n] - by_hand).abs().max() < 1e-5
    assert (logits - spec_logits(sd, ids, image_embeddings=by_hand)).abs().max() < 1e-4
    saved = llm_state_dict(model)
    assert sorted(saved) == sorted(sd) and all(torch.equal(saved[k], sd[k].float()) for k in sd)
    # An LLM-only 2026 checkpoint loads into the VLM too (its projector stays as initialised).
    load_weights(model, {k: v for k, v in sd.items() if not k.startswith("vision_proj.")})


def test_a_projector_made_for_another_tower_width_is_a_clear_error(siglip_dir):
    sd = spec_2026_state_dict(projector_width=768)  # the release's SigLIP2 tower is 768 wide
    model = MiniMindVLM(VLMConfig(**infer_config_from_state_dict(sd), vision_model_path=siglip_dir))
    with pytest.raises(CheckpointError, match=rf"sft_vlm_768.pth was trained with a vision tower of width 768 "
                                              rf"[\s\S]*gives {SIGLIP_WIDTH}-wide features"):
        load_weights(model, sd, "sft_vlm_768.pth")


def test_load_model_builds_a_2026_vlm_from_the_checkpoint_and_chats(siglip_dir, tmp_path):
    import argparse

    from PIL import Image

    from cli import add_model_args
    from model.inference import VLMChat, load_model
    path = str(tmp_path / "sft_vlm_128.pth")
    torch.save(spec_2026_state_dict(projector_width=SIGLIP_WIDTH), path)
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--weight", path, "--vision_model_path", siglip_dir, "--device", "cpu", "--dtype", "float32",
         "--tokenizer_path", "model"])
    model, tokenizer, processor = load_model(args)
    cfg = model.config
    assert (cfg.generation, cfg.projector, cfg.n_kv_heads, cfg.image_token_count) == ("minimind3", "mlp", 4, 16)
    chat = VLMChat(model, tokenizer, processor)
    ids, _ = chat.encoder.encode_prompt([{"role": "user", "content": "<image>\nWhat is it?"}])
    assert ids.count(cfg.image_token_id) == 16
    answer = chat.answer([{"role": "user", "content": "<image>\nWhat is it?"}], [Image.new("RGB", (80, 50), "red")],
                         max_new_tokens=3)
    assert isinstance(answer, str)


@pytest.mark.parametrize("layout, shape", [
    (dict(n_heads=4, n_kv_heads=2), (4, 2, 16, 32)),  # fewer, wider heads (as `demo.sh --n_heads 4`)
    (dict(n_heads=8, n_kv_heads=4, head_dim=16), (8, 4, 16, 64)),  # wider than dim / n_heads (`--head_dim`)
])
def test_a_2026_model_trained_with_wider_heads_is_recorded_and_read_back_from_its_weights_alone(
        tower_dir, tmp_path, layout, shape):
    """--n_heads/--n_kv_heads/--head_dim: QK-norm weights are one head wide, so the weights say the
    layout, and the loader builds the same model from them."""
    import argparse

    from builders import tiny_run
    from cli import add_model_args
    from model.inference import load_model
    from model.record import make_record
    run = tiny_run(tower_dir, tmp_path, generation="minimind3", **layout)
    cfg, attention = run.model.config, run.model.layers[0].attention
    assert (cfg.n_heads, cfg.n_kv_heads, attention.head_dim, attention.wk.out_features) == shape
    assert run.model.rope_cos.shape[-1] == shape[2]  # RoPE turns the head's own width
    record = make_record(cfg, "model", tower_dir)["model"]
    assert (record["n_heads"], record["n_kv_heads"], record["head_dim"]) == shape[:3]
    path = str(tmp_path / "pretrain_vlm_64.pth")
    torch.save(llm_state_dict(run.model), path)  # in the 2026 release's layout: RoPE rows permuted per head
    found = infer_config_from_state_dict(torch.load(path, weights_only=True))
    assert (found["n_heads"], found["n_kv_heads"], found["head_dim"]) == shape[:3]
    args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--weight", path, "--vision_model_path", tower_dir, "--device", "cpu", "--dtype", "float32",
         "--tokenizer_path", "model", "--dim", "64", "--n_layers", "2"])
    model = load_model(args)[0]
    ids = torch.tensor([[5, 9, 30, 41]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, run.model.eval()(ids).logits)
    # Into a model of the release's 8 heads, the error says both layouts, not only the keys.
    with pytest.raises(CheckpointError, match=rf"the file has generation minimind3, dim 64, 2 layers, .*{shape[0]} "
                                              rf"heads of 16 \({shape[1]} key/value\); the model generation "
                                              r"minimind3, .*8 heads of 8 \(4 key/value\)"):
        load_weights(MiniMindVLM(VLMConfig(generation="minimind3", dim=64, n_layers=2, vision_model_path=tower_dir)),
                     path)


def test_a_2025_model_keeps_eight_heads_because_its_files_could_not_say_another_count(tower_dir, tmp_path):
    from builders import tiny_run
    for layout in (dict(n_heads=4), dict(head_dim=16)):
        with pytest.raises(ValueError, match="a minimind2 model keeps the releases' 8 heads of dim / 8 .* use "
                                             "generation minimind3"):
            tiny_run(tower_dir, tmp_path, **layout)  # the trainer's flags
        with pytest.raises(ValueError, match=r"n_heads \d+ of width 16: a minimind2 model keeps"):
            MiniMindConfig(generation="minimind2", dim=64, **layout)  # a library user's config, refused alike
        with pytest.raises(ValueError, match="a minimind3 model keeps"):  # QK-norm turned off: no layout in the file
            MiniMindConfig(generation="minimind3", dim=64, qk_norm=False, **layout)
    assert MiniMindConfig(generation="minimind2", dim=64, n_heads=8, head_dim=8).head_dim == 8  # the release layout
    for layout in (dict(n_heads=0), dict(head_dim=0)):  # not read as "the default"
        with pytest.raises(ValueError, match="each must be 1 or more"):
            MiniMindConfig(generation="minimind3", dim=64, **layout)
    with pytest.raises(ValueError, match=r"n_heads must divide dim \(or head_dim be given\), and n_kv_heads n_heads"):
        MiniMindConfig(generation="minimind3", dim=64, n_heads=4, n_kv_heads=3)


def test_a_full_clip_directory_loads_without_a_report_of_its_text_tower(tmp_path, caplog):
    from make_demo_vision_tower import build_vision_tower
    from transformers import CLIPVisionModel
    from transformers.utils import logging
    path = str(tmp_path / "clip")
    build_vision_tower(path, hidden_size=32, num_layers=1, num_heads=2, full_clip=True, verbose=False)

    def logged(load):  # what transformers logs at its default verbosity (warning) while `load` runs
        before = logging.get_verbosity()
        logging.set_verbosity_warning()
        caplog.clear()
        try:
            return load(), caplog.text
        finally:
            logging.set_verbosity(before)

    tower, quiet = logged(lambda: load_vision_tower(path))
    plain, noisy = logged(lambda: CLIPVisionModel.from_pretrained(path))  # transformers' own report
    assert "LOAD REPORT" in noisy and "text_model" in noisy
    assert "LOAD REPORT" not in quiet and "text_model" not in quiet
    assert isinstance(tower, CLIPVisionModel)
    loaded, plain = tower.state_dict(), plain.state_dict()
    assert loaded.keys() == plain.keys() and all(torch.equal(loaded[k], plain[k]) for k in plain)
    # Anything else wrong with the vision half is still reported: here, a vision weight gone.
    from safetensors.torch import load_file, save_file
    weights = load_file(f"{path}/model.safetensors")
    save_file({k: v for k, v in weights.items() if "post_layernorm" not in k}, f"{path}/model.safetensors")
    _, report = logged(lambda: load_vision_tower(path))
    assert "missing_keys" in report and "post_layernorm" in report and "text_model" not in report
