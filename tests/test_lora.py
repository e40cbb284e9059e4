"""LoRA fine-tuning (peft): what trains, what is saved, and that an adapter applied to its base
weights gives the same model as its merge, for both model generations."""
import pytest
import torch

from conftest import TINY_LLM, launch, read_log, script_flags
from model.checkpoint import llm_state_dict, load_weights
from model.lora import (LORA_LAYERS, LoraSettings, adapter_state_dict, add_lora, load_adapter, merge_lora, plain_key,
                        save_adapter)
from model.model_vlm import MiniMindVLM, VLMConfig

GENERATIONS = ["minimind2", "minimind3"]


def tiny(tower_dir, generation="minimind2", seed=0, **kw):
    torch.manual_seed(seed)
    return MiniMindVLM(VLMConfig(vision_model_path=tower_dir, generation=generation, **TINY_LLM, **kw)).eval()


def with_trained_adapters(model, rank=4, targets=LORA_LAYERS):
    """Adapters as if trained: lora_B is zero at creation (a no-op adapter), so give it values."""
    add_lora(model, LoraSettings(rank, 2.0 * rank, 0.0, tuple(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.05)
    return model


def logits(model, tower_dir, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 6400, (2, 210), generator=g)
    ids[:, 4:4 + model.config.image_token_count] = model.config.image_token_id
    with torch.no_grad():
        return model(ids, pixel_values=torch.randn(2, 3, 224, 224, generator=g)).logits


# 1. Settings and the wrapped layers.

def test_adapters_wrap_every_attention_and_ffn_projection_of_the_llm_only(tower_dir):
    model = add_lora(tiny(tower_dir), LoraSettings.from_flags(4, None, 0.0, "wq,wk,wv,wo,w1,w2,w3"))
    wrapped = {n for n, m in model.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    assert wrapped == {f"layers.{i}.{part}" for i in range(2) for part in
                       ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                        "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert model.lora_settings.alpha == 8.0  # default: twice the rank
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)


def test_targets_can_be_narrowed_and_unknown_ones_are_refused(tower_dir):
    model = add_lora(tiny(tower_dir), LoraSettings.from_flags(2, 4, 0.0, "wq,wv"))
    assert {n.rsplit(".", 1)[1] for n, m in model.named_modules() if hasattr(m, "base_layer")} == {"wq", "wv"}
    with pytest.raises(ValueError, match="unknown: q_proj"):
        LoraSettings.from_flags(2, None, 0.0, "wq,q_proj")


# 2. Merged and unmerged are the same model.

@pytest.mark.parametrize("generation", GENERATIONS)
def test_merged_weights_give_the_unmerged_logits(tower_dir, generation):
    model = with_trained_adapters(tiny(tower_dir, generation))
    unmerged = logits(model, tower_dir)
    base = tiny(tower_dir, generation, seed=5)
    load_weights(base, llm_state_dict(model))  # the .pth a LoRA run writes: adapters folded in
    assert torch.allclose(logits(base, tower_dir), unmerged, atol=1e-5)
    assert torch.allclose(logits(merge_lora(model), tower_dir), unmerged, atol=1e-5)
    assert not any(hasattr(m, "base_layer") for m in model.modules())


@pytest.mark.parametrize("generation", GENERATIONS)
def test_an_adapter_file_applied_to_its_base_gives_the_trained_model(tower_dir, generation, tmp_path):
    trained = with_trained_adapters(tiny(tower_dir, generation))
    base_sd = {plain_key(k): v for k, v in trained.state_dict().items() if ".lora_" not in k}  # the base weights
    path = str(tmp_path / "a_64_lora.safetensors")
    save_adapter(adapter_state_dict(trained), trained.lora_settings, trained.config, path)
    fresh = tiny(tower_dir, generation, seed=9)
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, path)
    assert torch.allclose(logits(fresh, tower_dir), logits(trained, tower_dir), atol=1e-6)


def test_an_adapter_for_another_model_size_is_refused_with_both_shapes(tower_dir, tmp_path):
    trained = with_trained_adapters(tiny(tower_dir))
    path = str(tmp_path / "a_64_lora.safetensors")
    save_adapter(adapter_state_dict(trained), trained.lora_settings, trained.config, path)
    other = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, dim=64, n_layers=3))
    with pytest.raises(ValueError, match="'n_layers': 2.*'n_layers': 3"):
        load_adapter(other, path)
    not_adapter = tmp_path / "x.safetensors"
    not_adapter.write_bytes(b"junk")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        load_adapter(tiny(tower_dir), str(not_adapter))


def adapter_file(tower_dir, path, settings=None, edit=None, **metadata):
    """A trained adapter of tiny(tower_dir) written to `path`; `edit(tensors)` changes its tensors and
    `metadata` its metadata entries (None: drop the entry) as a damaged or planted file would."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    trained = with_trained_adapters(tiny(tower_dir))
    save_adapter(adapter_state_dict(trained), settings or trained.lora_settings, trained.config, str(path))
    with safe_open(str(path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    if edit:
        edit(tensors)
    meta = {k: v for k, v in {**meta, **metadata}.items() if v is not None}
    save_file(tensors, str(path), metadata=meta)
    return str(path)


def first_lora_b(tensors):
    return tensors[next(k for k in sorted(tensors) if ".lora_B." in k)]


NON_FINITE_ADAPTERS = {
    "nan-lora-b": (dict(edit=lambda t: first_lora_b(t).fill_(float("nan"))),
                   "holds NaN or inf values in ['layers.0.attention.wk.lora_B.weight']: it is damaged"),
    "alpha-nan": (dict(alpha="nan"), "its metadata's alpha nan or dropout 0.0 is out of range"),
}


@pytest.mark.parametrize("case", NON_FINITE_ADAPTERS, ids=list(NON_FINITE_ADAPTERS))
def test_merge_refuses_an_adapter_with_nan_weights_naming_it_and_writes_nothing(tower_dir, tmp_path, case):
    import merge_lora
    kw, message = NON_FINITE_ADAPTERS[case]
    adapter = adapter_file(tower_dir, tmp_path / "sft_64_lora.safetensors", **kw)
    base, out = tmp_path / "base_64.pth", tmp_path / "merged_64.pth"
    torch.save(llm_state_dict(tiny(tower_dir)), base)
    with pytest.raises(SystemExit) as stop:
        merge_lora.main(["--weight", str(base), "--lora", adapter, "--out", str(out)])
    assert str(stop.value.code).startswith(f"error: --lora {adapter}") and message in str(stop.value.code)
    assert "\n" not in str(stop.value.code) and not out.exists()


def test_merge_refuses_an_adapter_whose_merge_overflows_to_inf_and_writes_nothing(tower_dir, tmp_path):
    import merge_lora
    adapter = adapter_file(tower_dir, tmp_path / "sft_64_lora.safetensors", alpha="1e300")  # finite, its merge not
    base, out = tmp_path / "base_64.pth", tmp_path / "merged_64.pth"
    torch.save(llm_state_dict(tiny(tower_dir)), base)
    with pytest.raises(SystemExit, match=f"^error: --lora {adapter} merged into {base} gives NaN or inf in "
                                         rf"\['layers.0.attention.wk.weight', .*: {out} not written"):
        merge_lora.main(["--weight", str(base), "--lora", adapter, "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("case", NON_FINITE_ADAPTERS, ids=list(NON_FINITE_ADAPTERS))
def test_eval_refuses_an_adapter_with_nan_weights_naming_it(tower_dir, tmp_path, case):
    from model.inference import InferenceConfig, load_model
    kw, message = NON_FINITE_ADAPTERS[case]
    adapter = adapter_file(tower_dir, tmp_path / "sft_64_lora.safetensors", **kw)
    torch.save(llm_state_dict(tiny(tower_dir)), tmp_path / "base_64.pth")
    with pytest.raises(ValueError, match=f"^--lora {adapter}") as refused:
        load_model(InferenceConfig(weight=str(tmp_path / "base_64.pth"), lora=adapter, vision_model_path=tower_dir,
                                   tokenizer_path="model", dtype="float32", device="cpu"))
    assert message in str(refused.value)


BAD_METADATA = {  # metadata entries as a damaged or hand-made file has them -> what the error says
    "no-rank": (dict(rank=None), "its metadata has no rank: it was not written by train_*_vlm.py --lora_rank"),
    "rank-not-a-number": (dict(rank="four"), "its metadata's rank 'four', alpha '8.0' or dropout '0.0' is not a number"),
    "model-not-json": (dict(model="{dim: 64"), "its metadata's model '{dim: 64' is not a JSON object"),
    "unknown-target": (dict(targets="wq,q_proj"), "its metadata's targets 'wq,q_proj' are not a comma list of "
                                                  "wq,wk,wv,wo,w1,w2,w3 (unknown: q_proj)"),
    "rank-its-tensors-lack": (dict(rank="4000000"), "its metadata says rank 4000000, but it holds a lora_A of shape "
                                                    "[4, 64] and a lora_B of shape [16, 4]: the file is damaged"),
}


@pytest.mark.parametrize("case", BAD_METADATA, ids=list(BAD_METADATA))
def test_adapter_metadata_errors_name_the_file_before_any_layer_is_built(tower_dir, tmp_path, case, monkeypatch):
    import model.lora as lora
    metadata, message = BAD_METADATA[case]
    adapter = adapter_file(tower_dir, tmp_path / "a_64_lora.safetensors", **metadata)
    monkeypatch.setattr(lora, "add_lora", lambda *a: pytest.fail("adapters built for a file that was not checked"))
    with pytest.raises(ValueError) as refused:
        load_adapter(tiny(tower_dir), adapter)
    assert str(refused.value).startswith(f"--lora {adapter}: {message}")


def test_an_adapter_lacking_some_of_its_layers_is_refused_instead_of_leaving_them_random(tower_dir, tmp_path):
    adapter = adapter_file(tower_dir, tmp_path / "a_64_lora.safetensors",
                           edit=lambda t: [t.pop(f"layers.1.attention.wq.lora_{x}.weight") for x in "AB"])
    with pytest.raises(ValueError, match=rf"^--lora {adapter} lacks 2 of the adapters its targets need, e.g. "
                                         rf"\['layers.1.attention.wq.lora_A.weight', "):
        load_adapter(tiny(tower_dir), adapter)


def test_merging_onto_base_weights_for_another_tower_names_the_fix_merge_lora_has(tower_dir, tmp_path):
    import merge_lora
    from model.record import make_record, write_record
    trained = with_trained_adapters(tiny(tower_dir))  # for the test tower's 32-wide features
    trained.vision_proj.requires_grad_(True)  # as training leaves it: the adapter file brings the projector
    adapter = str(tmp_path / "sft_64_lora.safetensors")
    save_adapter(adapter_state_dict(trained), trained.lora_settings, trained.config, adapter)
    other = tmp_path / "other_64.pth"  # the same LLM shape, its projector for CLIP's 768-wide features
    torch.save(llm_state_dict(MiniMindVLM(VLMConfig(**TINY_LLM), load_tower=False)), other)
    flags = ["--weight", str(other), "--lora", adapter, "--out", str(tmp_path / "merged_64.pth")]
    with pytest.raises(SystemExit) as stop:
        merge_lora.main(flags)
    message = str(stop.value.code)
    assert message.startswith(f"error: --lora {adapter} does not fit --weight {other}: ")
    assert "[64, 32] in the adapter, [64, 768] in the weights" in message
    assert "--vision_model_path" not in message  # merge_lora.py has no such flag: the fix is other --weight
    # When the run that wrote the adapter left its record, the message names the weights it started from.
    write_record(make_record(trained.config, "model", tower_dir, trained_from=str(tmp_path / "pretrain_64.pth")),
                 str(tmp_path / "sft_64.pth"))
    with pytest.raises(SystemExit, match=f"e.g. {tmp_path / 'pretrain_64.pth'}, which its training run started"):
        merge_lora.main(flags)


# 3. Through the real scripts.

def sft_flags(data, tower_dir, out, **extra):
    defaults = dict(from_weight="pretrain_vlm", learning_rate=3e-3, dtype="float32", seed=7, lora_rank=4)
    return script_flags(data, tower_dir, str(out), **{**defaults, **extra})


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, tower_dir):
    """A tiny pretrain_vlm_64.pth to fine-tune, and the toy data."""
    from conftest import make_toy_data
    root = tmp_path_factory.mktemp("lora")
    data = make_toy_data(root)
    launch("train_pretrain_vlm.py", script_flags(data, tower_dir, str(root / "out"), from_weight="none",
                                                freeze_llm=0, epochs=1, dtype="float32"))
    return data, root / "out"


@pytest.mark.slow
def test_lora_sft_trains_only_the_adapters_and_the_projector(pretrained, tower_dir):
    data, out = pretrained
    proc = launch("train_sft_vlm.py", sft_flags(data, tower_dir, out))
    assert "LoRA rank 4" in proc.stdout and "sft_vlm_64_lora.safetensors" in proc.stdout
    from safetensors.torch import load_file
    adapter = load_file(out / "sft_vlm_64_lora.safetensors")
    n_layers, n_wrapped = 2, 7
    assert {k for k in adapter if ".lora_" in k} == {
        f"layers.{i}.{m}.lora_{ab}.weight" for i in range(n_layers) for ab in "AB"
        for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}
    assert {k for k in adapter if ".lora_" not in k} == {"vision_proj.vision_proj.0.weight"}
    assert len(adapter) == 2 * n_layers * n_wrapped + 1
    base, merged = torch.load(out / "pretrain_vlm_64.pth"), torch.load(out / "sft_vlm_64.pth")
    changed = {k for k in base if not torch.equal(base[k], merged[k])}
    assert "vision_proj.vision_proj.0.weight" in changed
    assert changed - {"vision_proj.vision_proj.0.weight"} == {
        f"layers.{i}.{m}.weight" for i in range(n_layers)
        for m in ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                  "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")}  # embeddings and norms untouched
    log = read_log(out / "sft_vlm_64_log.jsonl")
    assert log[-1]["loss"] < log[0]["loss"]


@pytest.mark.slow
def test_lora_with_freeze_llm_1_also_trains_the_last_layer_in_full(pretrained, tower_dir, tmp_path):
    data, out = pretrained
    launch("train_sft_vlm.py", sft_flags(data, tower_dir, out, freeze_llm=1, save_weight="lora_f1", epochs=1))
    from safetensors.torch import load_file
    adapter = load_file(out / "lora_f1_64_lora.safetensors")
    assert {"layers.1.attention_norm.weight", "layers.1.attention.wq.weight"} <= set(adapter)
    assert not any(k.startswith("layers.0.") and ".lora_" not in k for k in adapter)


@pytest.mark.slow
def test_lora_resume_with_accumulation_reproduces_the_uninterrupted_run(pretrained, tower_dir, tmp_path):
    data, out = pretrained
    base = out / "pretrain_vlm_64.pth"
    args = dict(from_weight=str(base), accumulation_steps=2, batch_size=1, epochs=2)
    launch("train_sft_vlm.py", sft_flags(data, tower_dir, tmp_path / "a", **args))
    launch("train_sft_vlm.py", sft_flags(data, tower_dir, tmp_path / "b", stop_after_steps=5, **args))
    resumed = launch("train_sft_vlm.py", sft_flags(data, tower_dir, tmp_path / "b", from_resume=1, **args))
    assert "resumed from" in resumed.stdout
    full, split = read_log(tmp_path / "a" / "sft_vlm_64_log.jsonl"), read_log(tmp_path / "b" / "sft_vlm_64_log.jsonl")
    assert [r["step"] for r in split] == [r["step"] for r in full] == list(range(1, 13))
    for a, b in zip(full, split):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4, abs=1e-5)
    wrong = launch("train_sft_vlm.py", sft_flags(data, tower_dir, tmp_path / "b", from_resume=1, lora_rank=8,
                                                **args), check=False)
    assert wrong.returncode == 1 and "other LoRA adapters" in wrong.stderr and "Traceback" not in wrong.stderr


@pytest.mark.slow
def test_merge_script_and_eval_lora_flag_agree_with_the_trained_pth(pretrained, tower_dir, tmp_path):
    data, out = pretrained
    launch("train_sft_vlm.py", sft_flags(data, tower_dir, out, save_weight="lora_m", epochs=1))
    import eval_vlm
    import merge_lora
    merged = tmp_path / "merged_64.pth"
    merge_lora.main(["--weight", str(out / "pretrain_vlm_64.pth"), "--lora", str(out / "lora_m_64_lora.safetensors"),
                     "--out", str(merged)])
    trained, again = torch.load(out / "lora_m_64.pth"), torch.load(merged)
    assert trained.keys() == again.keys() and all(torch.allclose(trained[k], again[k], atol=1e-6) for k in trained)

    from model.inference import InferenceConfig, load_model
    cfg = dict(vision_model_path=tower_dir, dtype="float32", dim=64, n_layers=2)
    unmerged, _, _ = load_model(InferenceConfig(weight=str(out / "pretrain_vlm_64.pth"),
                                                lora=str(out / "lora_m_64_lora.safetensors"), **cfg))
    plain, _, _ = load_model(InferenceConfig(weight=str(merged), **cfg))
    assert torch.allclose(logits(unmerged, tower_dir), logits(plain, tower_dir), atol=1e-5)

    eval_vlm.main(["--weight", str(out / "pretrain_vlm_64.pth"), "--lora", str(out / "lora_m_64_lora.safetensors"),
                   "--vision_model_path", tower_dir, "--dim", "64", "--n_layers", "2", "--bench", data[0],
                   "--images_path", data[1], "--limit", "4"])  # an error would end it with SystemExit


def test_the_web_demo_offers_the_weight_with_its_adapter_and_loads_it_unmerged(tower_dir, tmp_path):
    import web_demo_vlm
    trained = with_trained_adapters(tiny(tower_dir))
    base = tiny(tower_dir)
    out = tmp_path / "out"
    out.mkdir()
    torch.save(llm_state_dict(base), out / "base_64.pth")
    adapter = str(tmp_path / "mine_64_lora.safetensors")
    save_adapter(adapter_state_dict(trained), trained.lora_settings, trained.config, adapter)
    args = web_demo_vlm.parse_args(["--weight", "base", "--dim", "64", "--n_layers", "2", "--out_dir", str(out),
                                    "--vision_model_path", tower_dir, "--lora", adapter, "--tokenizer_path", "model"])
    hub = web_demo_vlm.ModelHub(args)
    assert list(hub.choices) == ["base_64.pth + mine_64_lora.safetensors", "base_64.pth"]
    with_adapter, plain = (hub.get(label).model for label in hub.choices)
    assert any(hasattr(m, "lora_A") for m in with_adapter.modules())
    assert not any(hasattr(m, "lora_A") for m in plain.modules())
