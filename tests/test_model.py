"""The MiniMind LLM: published sizes, checkpoint keys, KV cache and generation."""
import pytest
import torch

from model.model_minimind import KVCache, MiniMindConfig, MiniMindForCausalLM, apply_repetition_penalty, count_llm_params, sample_next_token

from conftest import TINY_LLM


def tiny_llm(**kw):
    torch.manual_seed(0)
    return MiniMindForCausalLM(MiniMindConfig(**{**TINY_LLM, "vocab_size": 300, **kw})).eval()


@pytest.mark.parametrize("dim,n_layers,expected", [(512, 8, 25_829_888), (768, 16, 104_030_976)])
def test_published_sizes_have_the_published_parameter_counts(dim, n_layers, expected):
    model = MiniMindForCausalLM(MiniMindConfig(dim=dim, n_layers=n_layers))
    assert count_llm_params(model) == expected


def test_state_dict_keys_and_shapes_equal_the_released_format():
    sd = MiniMindForCausalLM(MiniMindConfig(dim=512, n_layers=8)).state_dict()
    layer0 = {"attention.wq.weight": (512, 512), "attention.wk.weight": (128, 512),
              "attention.wv.weight": (128, 512), "attention.wo.weight": (512, 512),
              "attention_norm.weight": (512,), "ffn_norm.weight": (512,),
              "feed_forward.w1.weight": (1408, 512), "feed_forward.w2.weight": (512, 1408),
              "feed_forward.w3.weight": (1408, 512)}
    expected = {"tok_embeddings.weight": (6400, 512), "norm.weight": (512,), "output.weight": (6400, 512)}
    for i in range(8):
        expected.update({f"layers.{i}.{k}": v for k, v in layer0.items()})
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected
    assert sd["output.weight"].data_ptr() == sd["tok_embeddings.weight"].data_ptr()  # tied


def test_moe_keys_and_aux_loss():
    model = tiny_llm(use_moe=True).train()
    keys = {k for k in model.state_dict() if k.startswith("layers.0.feed_forward.")}
    assert "layers.0.feed_forward.gate.weight" in keys and "layers.0.feed_forward.experts.3.w2.weight" in keys
    assert "layers.0.feed_forward.shared_experts.w1.weight" in keys
    assert tuple(model.state_dict()["layers.0.feed_forward.gate.weight"].shape) == (4, 64)
    ids = torch.randint(0, 300, (2, 16))
    out = model(ids, labels=ids)
    assert out.aux_loss > 0 and torch.isfinite(out.loss)
    out.loss.backward()
    # every expert got a gradient (so DDP never sees an unused parameter)
    assert all(p.grad is not None for p in model.parameters())


def test_rope_uses_interleaved_pairs():
    from model.model_minimind import apply_rope, rope_cos_sin
    cos, sin = rope_cos_sin(4, 8, 1e6)
    x = torch.tensor([1.0, 0.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 8, 4)
    out = apply_rope(x, cos, sin)
    # dims (0, 1) form one complex number: rotating (1, 0) by angle t (the position, as pair 0's
    # frequency is 1) gives (cos t, sin t)
    t = torch.arange(8.0)
    assert torch.allclose(out[0, 0, :, 0], t.cos(), atol=1e-6) and torch.allclose(out[0, 0, :, 1], t.sin(), atol=1e-6)
    assert torch.all(out[0, 0, :, 2:] == 0)
    y = torch.tensor([0.0, 1.0, 0.0, 0.0]).view(1, 1, 1, 4).expand(1, 1, 8, 4)  # (0, 1) turns to (-sin t, cos t)
    out = apply_rope(y, cos, sin)
    assert torch.allclose(out[0, 0, :, 0], -t.sin(), atol=1e-6) and torch.allclose(out[0, 0, :, 1], t.cos(), atol=1e-6)


def test_kv_cache_decoding_equals_full_forward():
    model = tiny_llm()
    ids = torch.randint(3, 300, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache(2)
        step_logits = [model(ids[:, :6], past_key_values=cache, use_cache=True).logits]
        for t in range(6, 10):
            step_logits.append(model(ids[:, t:t + 1], past_key_values=cache, use_cache=True).logits)
    assert torch.allclose(torch.cat(step_logits, 1), full, atol=1e-5)


def test_preallocated_cache_grows_when_capacity_is_exceeded():
    model = tiny_llm()
    ids = torch.randint(3, 300, (1, 12))
    cache = KVCache(2, capacity=4)
    with torch.no_grad():
        a = model(ids[:, :3], past_key_values=cache, use_cache=True).logits
        b = model(ids[:, 3:], past_key_values=cache, use_cache=True).logits  # 9-token chunk after a cache
        full = model(ids).logits
    assert cache.pos == 12
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)


def test_greedy_generate_matches_argmax_of_full_forward_and_counts_new_tokens():
    model = tiny_llm()
    prompt = torch.randint(3, 300, (1, 7))
    out = model.generate(prompt, max_new_tokens=8, eos_token_id=-1)
    assert out.shape == (1, 15)
    with torch.no_grad():
        logits = model(out).logits
    assert torch.equal(logits[0, 6:-1].argmax(-1), out[0, 7:])


def test_left_padded_batch_generates_the_same_as_each_row_alone():
    model = tiny_llm()
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    out = model.generate(batch, attention_mask=mask, max_new_tokens=6, eos_token_id=-1)
    assert torch.equal(out[0, 9:], model.generate(a, max_new_tokens=6, eos_token_id=-1)[0, 9:])
    assert torch.equal(out[1, 9:], model.generate(b, max_new_tokens=6, eos_token_id=-1)[0, 5:])


def test_generation_stops_each_row_at_eos():
    model = tiny_llm()
    prompt = torch.randint(3, 300, (2, 5))
    free = model.generate(prompt, max_new_tokens=6, eos_token_id=-1)
    eos = int(free[0, 6])  # make row 0's second new token the EOS
    out = list(model.generate_stream(prompt, max_new_tokens=6, eos_token_id=eos))
    assert int(out[1][0]) == eos
    assert all(int(t[0]) == eos for t in out[1:])  # row 0 stays finished
    assert eos not in free[1, 5:].tolist()  # so row 1 runs on, token for token as without an EOS
    assert [int(t[1]) for t in out] == free[1, 5:].tolist()


def test_repetition_penalty_lowers_seen_tokens_even_with_negative_logits():
    logits = torch.tensor([[2.0, -2.0, 1.0, -3.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1]]), 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -3.0]]  # -2 becomes -4, not -1


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[5.0, 4.0, 0.0, -1.0, -2.0]]).repeat(200, 1)
    torch.manual_seed(0)
    assert set(sample_next_token(logits, 1.0, top_k=2).tolist()) <= {0, 1}
    assert set(sample_next_token(logits, 1.0, top_p=0.5).tolist()) == {0}
    assert set(sample_next_token(logits, 0.0).tolist()) == {0}


def test_streaming_yields_one_token_per_step():
    model = tiny_llm()
    steps = list(model.generate_stream(torch.randint(3, 300, (1, 4)), max_new_tokens=5, eos_token_id=-1))
    assert len(steps) == 5 and all(s.shape == (1,) for s in steps)


def test_forward_and_generation_print_no_transformers_deprecation(monkeypatch):
    """Nothing of transformers' lands between a prompt and its answer (the old name of the output's
    cache field made it log a deprecation line on every run)."""
    import transformers.utils.generic as hf_generic
    said = []
    monkeypatch.setattr(hf_generic.logger, "warning_once", lambda *args, **kwargs: said.append(args))
    model = tiny_llm()
    ids = torch.randint(3, 300, (1, 6))
    model.generate(ids, max_new_tokens=3)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert said == []


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_a_static_kv_cache_gives_the_dynamic_caches_greedy_tokens_with_fixed_shapes(generation):
    """StaticKVCache (for CUDA graphs): whole fixed-size buffers every step, the same tokens, alone and
    in a left-padded batch, with a repetition penalty too."""
    from model.model_minimind import StaticKVCache
    model = tiny_llm(generation=generation)
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    for ids, kw in ((a, {}), (batch, {"attention_mask": mask}), (batch, {"attention_mask": mask,
                                                                        "repetition_penalty": 1.3})):
        dynamic = model.generate(ids, max_new_tokens=12, eos_token_id=-1, **kw)
        assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=-1, static_cache=True, **kw), dynamic)
    shapes = []
    update = StaticKVCache.update

    def spy(self, layer, k, v):
        out = update(self, layer, k, v)
        shapes.append(out[0].shape)
        return out
    StaticKVCache.update = spy
    try:
        model.generate(batch, attention_mask=mask, max_new_tokens=5, eos_token_id=-1, static_cache=True)
    finally:
        StaticKVCache.update = update
    assert set(shapes) == {(2, model.config.n_kv_heads, 9 + 5, model.config.dim // model.config.n_heads)}
    cache = StaticKVCache(len(model.layers), capacity=4)
    with pytest.raises(ValueError, match="holds 4 tokens"):
        model(a, past_key_values=cache, use_cache=True)


def test_rows_that_are_done_or_no_longer_wanted_leave_the_batch_and_the_others_run_on_unchanged():
    model = tiny_llm()
    a, b, c = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5)), torch.randint(3, 300, (1, 7))
    batch = torch.zeros(3, 9, dtype=torch.long)
    batch[0], batch[1, 4:], batch[2, 2:] = a[0], b[0], c[0]
    mask = (torch.arange(9) >= torch.tensor([[0], [4], [2]])).long()
    free = model.generate(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=-1)[:, 9:]
    # row 2 ends at its token j: the first one rows 0 and 1 never produce
    j = next(j for j, t in enumerate(free[2].tolist()) if t not in free[0].tolist() + free[1].tolist())
    eos = int(free[2, j])
    sizes = []
    forward = model.forward
    model.forward = lambda ids, **kw: sizes.append(ids.shape[0]) or forward(ids, **kw)
    steps = []
    try:  # row 0 is no longer wanted after 3 tokens
        for tok in model.generate_stream(batch, attention_mask=mask, max_new_tokens=8, eos_token_id=eos,
                                         wanted=lambda: [len(steps) < 3, True, True]):
            steps.append(tok)
    finally:
        del model.forward
    out = torch.stack(steps, 1)
    # the prefill, then the rows left after each step: row 0 while wanted, row 2 until its EOS
    assert sizes == [3] + [1 + (s < 2) + (s < j) for s in range(7)]
    assert out[0, :3].tolist() == free[0, :3].tolist() and set(out[0, 3:].tolist()) == {eos}
    assert out[1].tolist() == free[1].tolist()  # row 1 runs on, token for token
    assert out[2, :j + 1].tolist() == free[2, :j + 1].tolist() and set(out[2, j:].tolist()) == {eos}


@pytest.mark.parametrize("generation", ["minimind2", "minimind3"])
def test_compiled_decode_steps_give_the_eager_tokens_from_one_graph(generation):
    """CompiledDecoder (--compile_decode): decode steps compile with fullgraph into one graph that every
    later step, position and prompt length of the same batch size and bucket reuses (what a CUDA graph
    needs), and the greedy tokens are those of the eager model, alone and left-padded in a batch."""
    from torch._dynamo.testing import CompileCounter
    from model.compiled_decode import CompiledDecoder
    torch._dynamo.reset()
    model = tiny_llm(generation=generation)
    counter = CompileCounter()
    decoder = CompiledDecoder(model, bucket=64, backend=counter)
    a, b = torch.randint(3, 300, (1, 9)), torch.randint(3, 300, (1, 5))
    batch = torch.zeros(2, 9, dtype=torch.long)
    batch[0], batch[1, 4:] = a[0], b[0]
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    for ids, kw in ((a, {}), (b, {}), (batch, {"attention_mask": mask}),
                    (batch, {"attention_mask": mask, "repetition_penalty": 1.3})):
        eager = model.generate(ids, max_new_tokens=12, eos_token_id=-1, **kw)
        assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=-1, decoder=decoder, **kw), eager)
    assert counter.frame_count == 2  # batch 1 and batch 2: 44 decode steps, 4 calls, 2 prompt lengths
    from model.quantize import quantize_int8
    with pytest.raises(ValueError, match="does not compile int8 weights"):
        CompiledDecoder(quantize_int8(tiny_llm(generation=generation)))
    short = tiny_llm(generation=generation, max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len=16"):
        short.generate(a, max_new_tokens=12, eos_token_id=-1, decoder=CompiledDecoder(short, backend=counter))


def test_compiled_decode_takes_more_batch_sizes_than_dynamos_default_limit_of_graphs():
    """An API server batches 1 to --max_batch rows: a graph each, past dynamo's default of 8 per
    function (which, under fullgraph, is an error, not a fallback)."""
    from torch._dynamo.testing import CompileCounter
    from model.compiled_decode import CompiledDecoder
    torch._dynamo.reset()
    model, counter = tiny_llm(), CompileCounter()
    decoder = CompiledDecoder(model, backend=counter)
    for rows in range(1, 11):
        ids = torch.randint(3, 300, (rows, 5))
        assert torch.equal(model.generate(ids, max_new_tokens=3, eos_token_id=-1, decoder=decoder),
                           model.generate(ids, max_new_tokens=3, eos_token_id=-1))
    assert counter.frame_count == 10
