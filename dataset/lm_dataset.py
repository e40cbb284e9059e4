"""The jsonl + image-folder data pipeline, in the released MiniMind-V format.

One sample per line:
    {"conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                       {"role": "assistant", "content": "A cat."}],
     "image": "a.jpg, b.jpg"}
Each `<image>` tag, in order, takes the next comma-separated image from `--images_path` and
becomes `image_token_count` placeholder tokens whose embeddings the model overwrites.
Only assistant content and its end-of-turn token are supervised.
"""
import json
import os
import re

import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_TAG = "<image>"


def resolve_image_token_id(tokenizer, image_token_id=-1):
    """-1 means: our tokenizer's <|image_pad|>, else '@' when it is one token (the released tokenizer)."""
    if image_token_id >= 0:
        return image_token_id
    vocab = tokenizer.get_vocab()
    if "<|image_pad|>" in vocab:
        return vocab["<|image_pad|>"]
    at = tokenizer.encode("@" * 4, add_special_tokens=False)
    if len(at) == 4 and len(set(at)) == 1:
        return at[0]
    raise ValueError("the tokenizer has no image placeholder token: pass --image_token_id")


class ChatEncoder:
    """Renders conversations with the tokenizer's chat template and tokenizes them with images
    expanded to placeholder runs, returning input ids and labels (-100 = not supervised)."""

    def __init__(self, tokenizer, image_token_id, image_token_count):
        self.tok, self.image_token_id, self.image_token_count = tokenizer, image_token_id, image_token_count
        probe = [{"role": "user", "content": "x"}]
        without = tokenizer.apply_chat_template(probe, tokenize=False)
        with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        self.assistant_header = with_prompt[len(without):]  # e.g. "<|im_start|>assistant\n"
        self.end_of_turn = tokenizer.eos_token  # "<|im_end|>" (ours) or "</s>" (released)
        if not self.assistant_header and self.end_of_turn:
            # The released MiniMind2 template opens an assistant turn after every user turn by itself
            # and ignores add_generation_prompt: read the header off a rendered answer instead.
            marker = "\x00ANSWER\x00"
            full = tokenizer.apply_chat_template(probe + [{"role": "assistant", "content": marker}], tokenize=False)
            before = full[:full.find(marker)]
            self.assistant_header = before[before.rfind(self.end_of_turn) + len(self.end_of_turn):].lstrip("\n")
        if not self.assistant_header or not self.end_of_turn:
            raise ValueError("tokenizer needs a chat template with a generation prompt and an eos_token")

    def render(self, messages, add_generation_prompt=False):
        return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def tokenize(self, text):
        """Text with <image> tags -> ids, each tag becoming image_token_count placeholder ids."""
        ids = []
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i:
                ids += [self.image_token_id] * self.image_token_count
            ids += self.tok.encode(piece, add_special_tokens=False)
        return ids

    def encode(self, messages):
        """-> (input_ids, labels). Assistant spans are found in the rendered *text* and tokenized as
        separate segments, so a label can never be shifted by a BPE merge across the boundary."""
        text = self.render(messages)
        ids, labels, pos = [], [], 0
        for m in re.finditer(re.escape(self.assistant_header), text):
            start = m.end()
            end = text.find(self.end_of_turn, start)
            end = len(text) if end < 0 else end + len(self.end_of_turn)
            prompt, answer = self.tokenize(text[pos:start]), self.tokenize(text[start:end])
            ids += prompt + answer
            labels += [-100] * len(prompt) + answer
            pos = end
        tail = self.tokenize(text[pos:])
        return ids + tail, labels + [-100] * len(tail)

    def encode_prompt(self, messages):
        """Ids of a conversation plus the assistant header, ready for generation."""
        return self.tokenize(self.render(messages, add_generation_prompt=True))


def parse_line(line):
    """One jsonl line -> (messages, image names). Raises ValueError saying what is wrong."""
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    conv = sample.get("conversations") if isinstance(sample, dict) else None
    if not isinstance(conv, list) or not conv:
        raise ValueError('empty or missing "conversations" list')
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant") \
                or not isinstance(turn.get("content"), str):
            raise ValueError(f'each turn needs "role" (system/user/assistant) and string "content", got {turn!r:.80}')
    if not any(t["role"] == "assistant" and t["content"].strip() for t in conv):
        raise ValueError("no non-empty assistant turn: nothing to learn from")
    images = [s.strip() for s in str(sample.get("image") or "").split(",") if s.strip()]
    n_tags = sum(t["content"].count(IMAGE_TAG) for t in conv)
    if n_tags != len(images):
        raise ValueError(f"{n_tags} {IMAGE_TAG} tags but {len(images)} images in \"image\"")
    return conv, images


class VLMDataset(Dataset):
    """Samples from one jsonl file. Lines are validated up front, so a bad line fails (or, with
    skip_bad_samples, is dropped and counted) before training starts, naming file and line."""

    def __init__(self, jsonl_path, images_path, tokenizer, image_processor, image_token_id,
                 image_token_count=196, max_seq_len=640, skip_bad_samples=False, feature_cache=None):
        self.path, self.images_path, self.max_seq_len = jsonl_path, images_path, max_seq_len
        self.feature_cache = feature_cache  # a FeatureCache: return stored features instead of pixels
        self.processor, self.skip_bad_samples = image_processor, skip_bad_samples
        self.encoder = ChatEncoder(tokenizer, image_token_id, image_token_count)
        self.samples, self.bad = [], []  # samples: (line number, messages, image paths)
        if not os.path.isfile(jsonl_path):
            raise FileNotFoundError(f"data file {jsonl_path} not found (set --data_path)")
        with open(jsonl_path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    conv, images = parse_line(line)
                    paths = [os.path.join(images_path, name) for name in images]
                    for p in paths:
                        if not os.path.isfile(p):
                            raise ValueError(f"image {p} not found (check --images_path)")
                except ValueError as e:
                    self._bad(lineno, str(e))
                    continue
                self.samples.append((lineno, conv, paths))
        if not self.samples:
            raise ValueError(f"{jsonl_path}: no usable samples")
        # Cheap length estimate for length-grouped batching: ~1 token per 2 characters plus images.
        self.lengths = [sum(len(t["content"]) for t in conv) // 2 + len(paths) * image_token_count
                        for _, conv, paths in self.samples]

    def _bad(self, lineno, reason):
        where = f"{self.path}:{lineno}: {reason}"
        if not self.skip_bad_samples:
            raise ValueError(f"{where}. Fix the line, or pass --skip_bad_samples 1 to skip such samples.")
        self.bad.append(where)

    def __len__(self):
        return len(self.samples)

    def load_images(self, paths, lineno):
        try:
            images = [Image.open(p).convert("RGB") for p in paths]
        except OSError as e:
            raise ValueError(f"{self.path}:{lineno}: cannot read image: {e}") from None
        return self.processor(images=images, return_tensors="pt")["pixel_values"]  # [n, 3, 224, 224]

    def __getitem__(self, i):
        """A dict, or a dict with "skip" giving the reason when the sample cannot be used."""
        lineno, conv, paths = self.samples[i]
        ids, labels = self.encoder.encode(conv)
        if len(ids) > self.max_seq_len:
            cut = self.max_seq_len
            # Cutting must keep every placeholder run whole (else features misalign) and leave
            # something to predict; otherwise the sample is skipped, never silently mangled.
            if self.encoder.image_token_id in ids[cut:] or all(l == -100 for l in labels[1:cut]):
                return {"skip": f"{self.path}:{lineno}: {len(ids)} tokens do not fit --max_seq_len {cut}"}
            ids, labels = ids[:cut], labels[:cut]
        cached = [self.cached_features(p) for p in paths]
        to_load = [p for p, f in zip(paths, cached) if f is None]
        try:
            pixel_values = self.load_images(to_load, lineno) if to_load else torch.zeros(0, 3, 224, 224)
        except ValueError as e:
            if not self.skip_bad_samples:
                raise
            return {"skip": str(e)}
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "pixel_values": pixel_values,
                "image_paths": paths, "cached": cached}

    def cached_features(self, path):
        if self.feature_cache is None:
            return None
        features = self.feature_cache.lookup(path)
        if features is None:  # maybe the main process encoded it since this worker last looked
            self.feature_cache.refresh()
            features = self.feature_cache.lookup(path)
        return features


def collate_batch(items, pad_id=0, pad_to=0):
    """Pads to the longest sample of *this* batch (right padding), or to `pad_to` if that is longer
    (fixed shapes), and stacks every image of the batch in placeholder order. Skipped samples are
    dropped and counted; an all-skipped batch becomes one unsupervised pad token so every rank
    still runs a step (no DDP hang)."""
    skipped = [it["skip"] for it in items if "skip" in it]
    items = [it for it in items if "skip" not in it]
    if not items:
        items = [{"input_ids": torch.tensor([pad_id]), "labels": torch.tensor([-100]),
                  "pixel_values": torch.zeros(0, 3, 224, 224), "image_paths": [], "cached": []}]
    T = max(pad_to, *(len(it["input_ids"]) for it in items))
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = it["input_ids"], it["labels"], 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "pixel_values": torch.cat([it["pixel_values"] for it in items]),  # [M, 3, 224, 224], M <= N uncached
            "image_paths": [p for it in items for p in it["image_paths"]],  # N, all images in placeholder order
            "cached": [f for it in items for f in it["cached"]],  # N cached features or None
            "n_samples": sum(1 for it in items if (it["labels"] != -100).any()), "skipped": skipped}
