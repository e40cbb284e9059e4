"""Conversations -> token ids, the one way for training, evaluation, serving and exported models.

A conversation is a list of {"role", "content"} turns rendered by the tokenizer's own chat
template. Each `<image>` tag in the text becomes `image_token_count` copies of the placeholder
token, whose embeddings the model overwrites with that image's features. This file needs only a
tokenizer (no torch), so an exported transformers directory carries it as it is.
"""
import re

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
