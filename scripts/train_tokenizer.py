"""
Train MiniMind-V's small byte-level BPE tokenizer (vocab 6400), fully offline.

Why our own: with 6400 tokens the embedding and LM head, a large share of a tiny
model's parameters, stay small. Why byte-level: any Unicode string (Chinese, emoji,
code) round-trips without an <unk>. Why this corpus: nothing may be downloaded at
run time, so the training text is built from what is installed: English from the
docstrings of Python's own stdlib (parsed with `ast`, nothing is imported), Chinese
from the word-frequency dictionary shipped inside the `jieba` package (the only
extra dependency: pip install jieba), plus short English/Chinese captions and Q&A
about colours, shapes and positions (the offline demo's vocabulary). Everything is
read in a fixed order, so two runs (same Python and jieba versions) give a
byte-identical tokenizer.json.

$ python scripts/train_tokenizer.py --out_dir model --vocab_size 6400
"""
import ast
import itertools
import json
import os
import sys
import sysconfig
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from cli import make_parser  # noqa: E402

# ids 0..3 follow from the order here; <|image_pad|> is the image placeholder that
# the vision projector's features replace, so it must stay one atomic token
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
# ChatML; no default system message, nothing added beyond the messages themselves
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def english_docstrings(max_chars):
    # stdlib docstrings: plenty of plain technical English, identical wherever the
    # same Python version is installed; tests and demos are skipped (lots of noise, little prose)
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "tests", "site-packages", "idlelib", "lib2to3", "turtledemo"}
    total = 0
    for path in sorted(root.rglob("*.py")):
        if skip & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    yield doc
                    total += len(doc)
                    if total >= max_chars:
                        return


def jieba_dict_path():
    # jieba is needed only here, for its bundled dictionary, so it is not a project requirement
    try:
        import jieba
    except ImportError:
        raise SystemExit("the Chinese training text comes from jieba's dictionary: pip install jieba")
    return os.path.join(os.path.dirname(jieba.__file__), "dict.txt")


def chinese_words(path, max_chars):
    # jieba's dict.txt is "word freq tag" per line (~350k words, counts from real text).
    # Each word is repeated ~sqrt(freq) times: common characters/words still dominate
    # the merges, but the long tail is not drowned out as it would be with raw counts
    with open(path, encoding="utf-8") as f:
        rows = [(int(freq), word) for word, freq, *_ in (line.split() for line in f)]
    rows.sort(key=lambda r: (-r[0], r[1]))  # most frequent first, so --max_chars cuts the rare tail
    total = 0
    for freq, word in rows:
        reps = max(1, round(freq ** 0.5))
        yield (word + "\n") * reps  # newline-separated: merges stay inside a word
        total += len(word) * reps
        if total >= max_chars:
            return


def captions():
    # the offline demo's images are coloured shapes; make sure its words are whole tokens
    colours = [("red", "红色"), ("green", "绿色"), ("blue", "蓝色"), ("yellow", "黄色"),
               ("purple", "紫色"), ("orange", "橙色"), ("black", "黑色"), ("white", "白色"),
               ("gray", "灰色"), ("pink", "粉色"), ("brown", "棕色")]
    shapes = [("circle", "圆形"), ("square", "正方形"), ("triangle", "三角形"),
              ("rectangle", "长方形"), ("star", "星形"), ("ellipse", "椭圆"), ("diamond", "菱形")]
    places = [("top left", "左上角"), ("top right", "右上角"), ("bottom left", "左下角"),
              ("bottom right", "右下角"), ("center", "中间"), ("top", "上方"),
              ("bottom", "下方"), ("left", "左侧"), ("right", "右侧")]
    for n, ((c, _), (s, _), (p, _)) in enumerate(itertools.product(colours, shapes, places)):
        yield (f"A {c} {s} at the {p}. There is a {c} {s} in the {p} of the image.\n"
               f"What colour is the {s}? The {s} is {c}. What color is it? It is {c}.\n"
               f"Where is the {c} {s}? It is at the {p}. What shape is at the {p}? A {s}.\n"
               f"How many shapes are there? There are {n % 5 + 1} shapes. Describe the image.\n")
    # Chinese has no spaces, so a repeated phrase would merge into one long token:
    # one sentence per colour/shape pair keeps the Chinese captions from eating the vocab
    for n, ((_, c), (_, s)) in enumerate(itertools.product(colours, shapes)):
        p = places[n % len(places)][1]
        yield f"这是一个{c}的{s}，在图片的{p}。{s}是什么颜色？是{c}！图中有{n % 5 + 1}个形状。\n"


def chinese_punctuation(reps=1000):
    # jieba's dictionary has no punctuation, yet "，" and "。" are among the most
    # common symbols in Chinese text; give them roughly the weight of a top word
    for mark in "，。、！？；：“”‘’（）《》【】…—·":
        yield (mark + "\n") * reps


def main():
    parser = make_parser(__doc__)
    parser.add_argument("--out_dir", default="model", help="where tokenizer.json and tokenizer_config.json go")
    parser.add_argument("--vocab_size", type=int, default=6400, help="total vocab size, special tokens included")
    parser.add_argument("--max_chars", type=int, default=4_000_000,
                        help="cap on characters taken from each of the English and the Chinese source")
    args = parser.parse_args()

    jieba_dict = jieba_dict_path()  # fail early, before any training work
    tokenizer = Tokenizer(models.BPE())
    # GPT-2 style byte-level pre-tokenization; no normalizer, so decode(encode(x)) == x
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # all 256 bytes, even unseen

    def corpus():
        for name, texts in [("english", english_docstrings(args.max_chars)), ("captions", captions()),
                            ("chinese", chinese_words(jieba_dict, args.max_chars)), ("punct", chinese_punctuation())]:
            chars = 0
            for text in texts:
                chars += len(text)
                yield text
            print(f"corpus: {name:9s} {chars:>10,} chars")

    print("building corpus and training BPE...")
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]

    # transformers side: no BOS, eos=<|im_end|>, pad/unk=<|endoftext|>, ChatML template.
    # Written by hand rather than via save_pretrained so the same files load in both
    # transformers 4.x and 5.x, and the template stays inside tokenizer_config.json
    os.makedirs(args.out_dir, exist_ok=True)
    tokenizer.save(os.path.join(args.out_dir, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "additional_special_tokens": ["<|im_start|>", "<|image_pad|>"],
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 32768, "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(args.out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
        f.write("\n")

    # reload the way training code will, and show how well both languages compress
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(args.out_dir)
    print(f"saved to {args.out_dir}: {type(hf).__name__}, vocab size {len(hf)}")
    for s in ["这是一个红色的圆形。", "今天天气很好，我们一起去公园散步吧。",
              "A red circle at the top left of the image.", "How many shapes are there?"]:
        n = len(hf(s)["input_ids"])
        print(f"{n:3d} tokens ({len(s) / n:.2f} chars/token): {s}")


if __name__ == "__main__":
    main()
