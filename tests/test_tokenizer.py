"""The committed tokenizer in model/: ids, the atomic image token, round-trips, ChatML."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: E402

MODEL_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model")


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


def test_vocab_and_special_ids(tok):
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 6400 and tok.vocab_size == 6400
    ids = {t: tok.convert_tokens_to_ids(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<|image_pad|>": 3}
    assert tok.bos_token is None
    assert (tok.eos_token, tok.eos_token_id) == ("<|im_end|>", 2)
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)
    assert (tok.unk_token, tok.unk_token_id) == ("<|endoftext|>", 0)


def test_image_pad_is_atomic(tok):
    assert tok("<|image_pad|>" * 196)["input_ids"] == [3] * 196
    ids = tok("Look:<|image_pad|>" + "<|image_pad|>" * 195 + "what is this?")["input_ids"]
    assert ids.count(3) == 196
    start = ids.index(3)
    assert ids[start:start + 196] == [3] * 196
    ids = tok("图片<|image_pad|>" * 2 + "\n描述")["input_ids"]
    assert ids.count(3) == 2


@pytest.mark.parametrize("text", [
    "A red circle at the top left. How many shapes are there?",
    "这是一个红色的圆形。今天天气很好，我们一起去公园散步吧！",
    "混合 mixed 文本 with emoji 🤖🎨 and ünïcödé — “quotes” 《书名》…",
    "def f(x):\n    return {'a': x ** 2}  # code\n\t\r\n  trailing spaces  ",
    "",
])
def test_round_trip(tok, text):
    assert tok.decode(tok(text)["input_ids"]) == text


def test_chinese_and_english_compress(tok):
    # common words should be single tokens, not byte soup
    assert len(tok("这是一个红色的圆形。")["input_ids"]) <= 9
    assert len(tok("A red circle at the top left of the image.")["input_ids"]) <= 12
    for word in ["一个", "我们", "图片", "颜色", "，", "。", " red", " circle", " shapes"]:
        assert len(tok(word)["input_ids"]) == 1, word


def test_no_special_tokens_added(tok):
    ids = tok("abc")["input_ids"]
    assert ids == tok.encode("abc", add_special_tokens=False)
    assert not set(ids) & {0, 1, 2, 3}
    assert tok.decode(ids) == "abc"


CONV = [
    {"role": "user", "content": "What is this?"},
    {"role": "assistant", "content": "A red circle."},
    {"role": "user", "content": "这是什么颜色？"},
    {"role": "assistant", "content": "红色。"},
]
EXPECTED = ("<|im_start|>user\nWhat is this?<|im_end|>\n"
            "<|im_start|>assistant\nA red circle.<|im_end|>\n"
            "<|im_start|>user\n这是什么颜色？<|im_end|>\n"
            "<|im_start|>assistant\n红色。<|im_end|>\n")


def test_chat_template(tok):
    assert tok.apply_chat_template(CONV, tokenize=False) == EXPECTED
    assert tok.apply_chat_template(CONV, tokenize=False, add_generation_prompt=True) == (
        EXPECTED + "<|im_start|>assistant\n")
    assert tok.apply_chat_template(CONV[:3], tokenize=False, add_generation_prompt=True) == (
        EXPECTED.rsplit("<|im_start|>assistant", 1)[0] + "<|im_start|>assistant\n")
    system = [{"role": "system", "content": "You are a helpful assistant."}]
    assert tok.apply_chat_template(system + CONV, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n" + EXPECTED)


def test_chat_template_tokenizes_specials_atomically(tok):
    text = tok.apply_chat_template(CONV[:1], tokenize=False, add_generation_prompt=True)
    ids = tok(text)["input_ids"]
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1
    assert tok.decode(ids) == text
