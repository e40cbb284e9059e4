"""Streaming an answer's text: incremental detokenization (model/inference.py IncrementalDecoder)."""
from model.inference import IncrementalDecoder

TEXT = "图片里是一只红色的猫🐱，它在睡觉😴。 Then English, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and more 中文！"


def stream(tokenizer, ids):
    decoder = IncrementalDecoder(tokenizer)
    return [decoder.add(i) for i in ids]


def test_streamed_pieces_join_to_exactly_the_full_decode_and_are_whole_characters(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    pieces = stream(tokenizer, ids)
    assert len(ids) > len(TEXT) // 2  # many characters span several byte-level tokens
    assert "" in pieces  # ... so some tokens show nothing until their character is whole
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == TEXT
    assert not any("\ufffd" in p for p in pieces)


def test_an_unfinished_last_character_is_held_back(tokenizer):
    ids = tokenizer.encode("好🐱", add_special_tokens=False)
    cut = next(n for n in range(1, len(ids)) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    assert "\ufffd" not in "".join(stream(tokenizer, ids[:cut]))


def test_special_tokens_add_no_text(tokenizer):
    ids = tokenizer.encode("你好", add_special_tokens=False)
    assert "".join(stream(tokenizer, [tokenizer.eos_token_id, *ids, tokenizer.eos_token_id])) == "你好"


def test_each_token_decodes_a_short_window_not_the_whole_answer(tokenizer, monkeypatch):
    ids = tokenizer.encode(TEXT * 40, add_special_tokens=False)  # thousands of tokens
    decoded = []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    assert "".join(stream(tokenizer, ids)) == TEXT * 40
    assert max(decoded) < 20  # re-decoding the answer so far would reach len(ids)
