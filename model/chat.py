"""Conversations -> token ids, the one way for training, evaluation, serving and exported models.

A conversation is a list of {"role", "content"} turns rendered by the tokenizer's own chat
template. Each `<image>` tag in the text becomes `image_token_count` copies of the placeholder
token, whose embeddings the model overwrites with that image's features. A special token typed in
a turn ("<|image_pad|>", "<|im_end|>") is text: only the template makes control tokens, so a turn
can neither add image slots nor forge another turn. This file needs only a
tokenizer (no torch), so an exported transformers directory carries it as it is.
"""
import re

ESCAPE = "\ue000"  # a private-use character: in a rendered turn it marks what was typed there (ChatEncoder)
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"  # one per conversation; becomes one <image> per frame, each with its time


def video_prompt(timestamps):
    """The text a <video> tag becomes: a line per frame, in time order, with its time in seconds,
    so the model can tell order and pace ("Frame 2 at 1.5s: <image>")."""
    return "".join(f"Frame {k} at {t:.1f}s: {IMAGE_TAG}\n" for k, t in enumerate(timestamps, 1)).rstrip("\n")


def expand_video(messages, timestamps):
    """The conversation with its one <video> tag replaced by the frames' lines (video_prompt)."""
    n = sum(m["content"].count(VIDEO_TAG) for m in messages)
    if n != 1:
        raise ValueError(f"a conversation with a video needs exactly one {VIDEO_TAG} tag, found {n}")
    return [{**m, "content": m["content"].replace(VIDEO_TAG, video_prompt(timestamps))} for m in messages]


class Video:
    """A video's frames (PIL images) and their times in seconds, as a part of a user turn."""

    def __init__(self, frames, times):
        self.frames, self.times = list(frames), list(times)


def as_text(text):
    """What a user typed, as text: a typed <image> or <video> takes no image slot (it reads "[image]")."""
    return text.replace(IMAGE_TAG, "[image]").replace(VIDEO_TAG, "[video]")


def user_content(parts):
    """The one way a user's turn is built in eval, the web demo and the API: parts in order (str:
    typed text; a PIL image; a Video) -> (content with one <image> per picture and frame, the
    pictures in tag order). Parts are joined by newlines; a video is its frames' lines (video_prompt)."""
    pieces, images = [], []
    for part in parts:
        if isinstance(part, str):
            pieces.append(as_text(part))
        elif isinstance(part, Video):
            pieces.append(video_prompt(part.times))
            images += part.frames
        else:
            pieces.append(IMAGE_TAG)
            images.append(part)
    return "\n".join(p for p in pieces if p), images


def check_image_count(n, limit):
    """A conversation may show at most `limit` pictures: each takes a run of placeholder tokens."""
    if n > limit:
        raise ValueError(f"{n} images in the conversation (a video counts as its frames); at most {limit} "
                         "(each takes a run of placeholder tokens of the model's context)")


def check_room(n_prompt, max_new_tokens, limit):
    """The prompt and the answer must fit the model's context of `limit` tokens."""
    if n_prompt + max_new_tokens > limit:
        raise ValueError(f"the prompt has {n_prompt} tokens; with {max_new_tokens} new tokens that exceeds the "
                         f"model's limit of {limit}")


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

    def __init__(self, tokenizer, image_token_id, image_token_count, open_thinking=False):
        self.tok, self.image_token_id, self.image_token_count = tokenizer, image_token_id, image_token_count
        # The 2026 release's template opens its generation prompt with an empty <think></think>
        # block; open_thinking=True asks it to leave the block open, so the model reasons first.
        # Templates without the variable ignore it.
        self.prompt_options = {"open_thinking": True} if open_thinking else {}
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
        # The strings the tokenizer reads as control tokens. In a turn they are escaped before the
        # template renders it (ESCAPE, their index, ";"), so in the rendered text each one is the
        # template's own; the escapes become the typed text again when tokenized.
        self.specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special},
                               key=len, reverse=True)
        self._typed = re.compile("|".join(map(re.escape, [ESCAPE] + self.specials)))
        self._code = {ESCAPE: ESCAPE + ";", **{t: f"{ESCAPE}{k};" for k, t in enumerate(self.specials)}}
        self._control = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None

    def render(self, messages, add_generation_prompt=False, **options):
        """The template's text of the conversation, with the turns' own special tokens escaped."""
        escaped = [{k: self._typed.sub(lambda m: self._code[m[0]], v) if k != "role" and isinstance(v, str) else v
                    for k, v in m.items()} for m in messages]
        return self.tok.apply_chat_template(escaped, tokenize=False, add_generation_prompt=add_generation_prompt,
                                            **options)

    def _text_ids(self, text):
        """Rendered text -> ids: the template's special tokens are control tokens, the rest (the
        escapes turned back into what was typed) is tokenized as text."""
        ids = []
        for i, piece in enumerate(self._control.split(text) if self._control else [text]):
            if i % 2:
                ids.append(self.tok.convert_tokens_to_ids(piece))
            elif piece:
                typed = re.sub(ESCAPE + r"(\d*);", lambda m: self.specials[int(m[1])] if m[1] else ESCAPE, piece)
                ids += self.tok.encode(typed, add_special_tokens=False, split_special_tokens=True)
        return ids

    def tokenize(self, text):
        """Rendered text with <image> tags -> (ids, is_image): each tag becomes image_token_count
        placeholder ids, marked True in is_image. Only those are image slots: the same id typed in
        the text (the released tokenizer's '@') stays text."""
        ids, is_image = [], []
        for i, piece in enumerate(text.split(IMAGE_TAG)):
            if i:
                ids += [self.image_token_id] * self.image_token_count
                is_image += [True] * self.image_token_count
            text_ids = self._text_ids(piece)
            ids += text_ids
            is_image += [False] * len(text_ids)
        return ids, is_image

    def encode(self, messages):
        """-> (input_ids, labels, is_image). Assistant spans are found in the rendered *text* and
        tokenized as separate segments, so a label can never be shifted by a BPE merge across the
        boundary. Image slots are never supervised; a header typed in a turn is no span."""
        text = self.render(messages)
        ids, labels, is_image, pos = [], [], [], 0
        for m in re.finditer(re.escape(self.assistant_header), text):
            start = m.end()
            end = text.find(self.end_of_turn, start)
            end = len(text) if end < 0 else end + len(self.end_of_turn)
            prompt, prompt_image = self.tokenize(text[pos:start])
            answer, answer_image = self.tokenize(text[start:end])
            ids += prompt + answer
            labels += [-100] * len(prompt) + [-100 if img else t for t, img in zip(answer, answer_image)]
            is_image += prompt_image + answer_image
            pos = end
        tail, tail_image = self.tokenize(text[pos:])
        return ids + tail, labels + [-100] * len(tail), is_image + tail_image

    def encode_prompt(self, messages):
        """(ids, is_image) of a conversation plus the assistant header, ready for decoding."""
        return self.tokenize(self.render(messages, add_generation_prompt=True, **self.prompt_options))


THINK_END = "</think>"


class ReasoningSplitter:
    """Streamed answer pieces -> ("reasoning" | "content", text) pieces. With an open think block,
    everything before </think> is the model's reasoning, shown apart from the answer (or not at
    all); with a closed one (the prompt already ends the block), everything is content."""

    def __init__(self, open_thinking):
        self.thinking, self.held = open_thinking, ""

    def feed(self, piece):
        if not self.thinking:
            return [("content", piece)] if piece else []
        text = self.held + piece
        end = text.find(THINK_END)
        if end < 0:  # hold back what could be the start of a </think> split across pieces
            keep = next((k for k in range(len(THINK_END) - 1, 0, -1) if text.endswith(THINK_END[:k])), 0)
            self.held = text[len(text) - keep:] if keep else ""
            out = text[:len(text) - keep]
            return [("reasoning", out.removeprefix("<think>"))] if out else []
        self.thinking, self.held = False, ""
        reasoning, rest = text[:end], text[end + len(THINK_END):].lstrip("\n")
        return [p for p in (("reasoning", reasoning), ("content", rest)) if p[1]]

    def flush(self):
        """What is left when decoding ends (a think block never closed counts as reasoning)."""
        held, self.held = self.held, ""
        return [("reasoning" if self.thinking else "content", held)] if held else []


def split_reasoning(text, open_thinking):
    """A whole answer -> (reasoning, answer)."""
    splitter = ReasoningSplitter(open_thinking)
    parts = splitter.feed(text) + splitter.flush()
    return ("".join(t for k, t in parts if k == "reasoning").strip(),
            "".join(t for k, t in parts if k == "content"))
