"""Loading a trained model for inference and talking to it: shared by eval_vlm.py, the web demo
and the API server, so they take the same flags and build prompts the same way as training."""
import dataclasses
import logging
import os

import torch

from .images import load_processor, to_pixels, to_rgb
from .chat import IMAGE_TAG, ChatEncoder, resolve_image_token_id, split_reasoning
from .model_vlm import DEFAULT_VISION_MODEL, MiniMindVLM, VLMConfig
from .checkpoint import (check_state_dict, check_vocab, infer_config_from_state_dict, load_weights, read_checkpoint,
                         refuse_non_finite, weight_path)
from .paths import load_tokenizer
from .precision import describe, resolve_device, resolve_dtype
from .record import resolve_folders
from .lora import adapter_projector, load_adapter, merge_lora
from .quantize import quantize_int8

log = logging.getLogger(__name__)  # notes for the user: stderr, as plain lines (logging's last-resort handler)


@dataclasses.dataclass(frozen=True)
class InferenceConfig:
    """What loading a model for inference needs (cli.add_model_args defines the flags); the scripts
    build it from their flags with from_args."""
    weight: str = "sft_vlm"
    out_dir: str = "out"
    dim: int = 512
    n_layers: int = 8
    use_moe: int = 0
    vision_model_path: str | None = None  # None: the record's, else DEFAULT_VISION_MODEL
    tokenizer_path: str | None = None  # None: the record's (a .pth without one needs it given)
    ignore_record: int = 0
    image_token_id: int = -1
    device: str = "auto"  # see resolve_device
    dtype: str = "auto"
    open_thinking: int = 0
    quantize: str = "none"
    lora: str | None = None

    @classmethod
    def from_args(cls, args):
        if getattr(args, "load", None) is not None:
            log.warning("note: --load is no longer needed (and will go): a directory given to --weight is read as "
                        "transformers format, a file as a .pth")
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def resolve_weight_path(args):
    return weight_path(args.out_dir, args.weight, args.dim, args.use_moe)


def missing_weights(path):
    """The error for weights that are not there, as every script that loads a model words it."""
    return FileNotFoundError(f"weights {path} not found. Train them (see README) or pass --weight PATH.pth")


def is_hf_dir(weight):
    """A transformers-format directory (scripts/convert_model.py) rather than a .pth or a name."""
    return os.path.isdir(weight)


def load_model(args):
    """An InferenceConfig -> (model in eval mode on its device, tokenizer, image processor).
    Raises FileNotFoundError or CheckpointError with a message naming the file and the fix."""
    if is_hf_dir(args.weight):
        model, tokenizer = load_hf_dir(args)  # a directory written by scripts/convert_model.py
        vision_path = model.config.vision_model_path  # the tower it attached
    else:
        path = resolve_weight_path(args)
        if not os.path.isfile(path):
            raise missing_weights(path)
        sd = check_state_dict(read_checkpoint(path), path)  # weights_only; not model weights: says so, with its path
        tokenizer_path, vision_path, _ = resolve_folders(path, args.tokenizer_path, args.vision_model_path,
                                                         DEFAULT_VISION_MODEL, args.ignore_record)
        tokenizer = load_tokenizer(tokenizer_path)
        found = infer_config_from_state_dict({**sd, **adapter_projector(args.lora)}, path)
        check_vocab(tokenizer, tokenizer_path, found["vocab_size"], path)
        for key in ("dim", "n_layers", "use_moe"):  # a flag set to something else than its default and the file
            flag = getattr(args, key)
            if int(flag) != int(found[key]) and flag != getattr(InferenceConfig, key):
                log.warning(f"note: {path} has {key}={int(found[key])} (flag said {flag}); using the checkpoint's")
        # Generation, sizes and projector as the file says; the tower (its width is checked against the
        # projector's on load) decides the image token count.
        config = VLMConfig(**found, vision_model_path=vision_path,
                           image_token_id=resolve_image_token_id(tokenizer, args.image_token_id))
        model = MiniMindVLM(config)
        load_weights(model, sd, path)
    if args.lora:
        load_adapter(model, args.lora)
    processor = load_processor(vision_path)
    device = resolve_device(args.device)
    dtype, why = resolve_dtype(args.dtype, device)
    log.warning(describe(dtype, why))  # a note for the user, like the others here
    model = model.to(device, dtype).eval()
    if args.quantize == "int8":
        model = quantize_int8(merge_lora(model))  # int8 layers replace plain Linears: fold the adapters in first
    return model, tokenizer, processor


class VLMChat:
    """Messages with <image> tags + PIL images -> answers, streamed or batched."""

    def __init__(self, model, tokenizer, processor, open_thinking=False, static_cache=False, compile_decode=False):
        self.model, self.tokenizer, self.processor = model, tokenizer, processor
        self.open_thinking = open_thinking  # the model writes its reasoning first; answers leave it out
        self.static_cache = bool(static_cache)  # fixed-shape KV buffers (StaticKVCache): the same answers
        self.decoder = None  # with compile_decode: the decode steps as one compiled graph, the same answers
        if compile_decode:
            from .compiled_decode import CompiledDecoder
            self.decoder = CompiledDecoder(model)
        self.encoder = ChatEncoder(tokenizer, model.config.image_token_id, model.config.image_token_count,
                                   open_thinking)
        self.device = next(model.parameters()).device

    def pixels(self, images):
        """PIL images (from model.images.open_image, as in training) -> [N, 3, H, W] on the model's device."""
        if not images:
            return None
        return to_pixels(self.processor, [to_rgb(im) for im in images]).to(self.device)

    def check(self, messages, images):
        n_tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if n_tags != len(images):
            raise ValueError(f"{n_tags} {IMAGE_TAG} tags in the conversation but {len(images)} images")

    def stream(self, messages, images=(), **kw):
        """Yields the answer text piece by piece (complete UTF-8 characters only)."""
        self.check(messages, images)
        yield from self.stream_ids(self.encoder.encode_prompt(messages), images, **kw)

    def stream_ids(self, prompt, images=(), max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                   repetition_penalty=1.0, stats=None):
        """The answer to an encoded prompt (ids, is_image), piece by piece. `stats`, if given, is a
        dict that gets the number of new tokens ("tokens") and why decoding ended
        ("finish_reason": "stop" at the end-of-turn token, "length" at max_new_tokens), as an
        OpenAI response reports them."""
        stats = {} if stats is None else stats
        for pieces in self.stream_batch([prompt], self.pixels(images), max_new_tokens, temperature, top_p, top_k,
                                        repetition_penalty, stats=[stats]):
            if pieces[0]:
                yield pieces[0]
        stats["finish_reason"] = stats["finish_reason"] or "length"

    def left_pad(self, prompts):
        """Encoded prompts [(ids, is_image)] -> (ids [B, T], attention mask or None, image mask), left-padded.
        Prompts of one length get no mask, so a batch of one runs exactly as an unbatched prompt."""
        T = max(len(p) for p, _ in prompts)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (T - len(p)) + p for p, _ in prompts], device=self.device)  # [B, T]
        mask = None
        if any(len(p) < T for p, _ in prompts):
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p, _ in prompts], device=self.device)
        image_mask = torch.tensor([[False] * (T - len(p)) + s for p, s in prompts], device=self.device)
        return ids, mask, image_mask

    def stream_batch(self, prompts, pixel_values=None, max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0,
                     repetition_penalty=1.0, stats=None, wanted=None):
        """Encoded prompts generated together, one left-padded batch: yields, once per step, each row's new
        text ("" when none yet: only complete UTF-8 characters are given). pixel_values: the images of all
        rows, in row order. max_new_tokens: one limit, or one per row. stats: one dict per row, as
        stream_ids fills it; a row's "finish_reason" is None until it has ended ("stop" or "length"),
        and the steps go on until every row has. wanted: a callable -> B bools, the rows the caller still
        reads (a row that has ended, or that it no longer wants, leaves the batch and costs no more)."""
        B = len(prompts)
        limits = [max_new_tokens] * B if isinstance(max_new_tokens, int) else list(max_new_tokens)
        stats = [{} for _ in prompts] if stats is None else stats
        for s in stats:
            s.update(tokens=0, finish_reason=None)
        ids, mask, image_mask = self.left_pad(prompts)
        eos = self.tokenizer.eos_token_id
        texts = [IncrementalDecoder(self.tokenizer) for _ in prompts]

        def still_wanted():  # the rows not ended, of those the caller wants
            return [not s["finish_reason"] and w for s, w in zip(stats, wanted() if wanted else [True] * B)]
        for tok in self.model.generate_stream(ids, attention_mask=mask, pixel_values=pixel_values,
                                              image_mask=image_mask, max_new_tokens=max(limits),
                                              temperature=temperature, top_p=top_p, top_k=top_k,
                                              repetition_penalty=repetition_penalty, eos_token_id=eos,
                                              static_cache=self.static_cache, wanted=still_wanted,
                                              decoder=self.decoder):
            pieces = [""] * B
            for r, t in enumerate(tok.tolist()):
                if stats[r]["finish_reason"]:
                    continue
                if t == eos:
                    stats[r]["finish_reason"] = "stop"
                    continue
                pieces[r] = texts[r].add(t)
                stats[r]["tokens"] = len(texts[r].ids)
                if len(texts[r].ids) >= limits[r]:
                    stats[r]["finish_reason"] = "length"
            yield pieces
            if all(s["finish_reason"] for s in stats):
                return

    def answer(self, messages, images=(), **kw):
        """The answer, without the reasoning of an open think block."""
        return split_reasoning("".join(self.stream(messages, images, **kw)), self.open_thinking)[1]

    def answer_batch(self, conversations, max_new_tokens=64, **kw):
        """Greedy-by-default answers for many (messages, images) pairs in one left-padded batch."""
        prompts = []
        for messages, images in conversations:
            self.check(messages, images)
            prompts.append(self.encoder.encode_prompt(messages))
        ids, mask, image_mask = self.left_pad(prompts)
        T = ids.shape[1]
        all_images = [im for _, images in conversations for im in images]
        out = self.model.generate(ids, attention_mask=mask, image_mask=image_mask, pixel_values=self.pixels(all_images),
                                  max_new_tokens=max_new_tokens, eos_token_id=self.tokenizer.eos_token_id,
                                  static_cache=self.static_cache, decoder=self.decoder, **kw)
        answers = []
        for row in out[:, T:].tolist():
            row = row[:row.index(self.tokenizer.eos_token_id)] if self.tokenizer.eos_token_id in row else row
            answers.append(split_reasoning(self.tokenizer.decode(row, skip_special_tokens=True), self.open_thinking)[1])
        return answers


class IncrementalDecoder:
    """An answer's token ids, one at a time -> its text, piece by piece, each piece whole UTF-8
    characters. Decoding the whole answer again for every token costs O(answer) per token; this
    decodes a short window: the tokens not yet shown plus those of the last piece, which give them
    their context (a tokenizer may drop a leading space at the start of a decode). A byte-level
    token can end inside a character (a Chinese character or an emoji spans 2-4 tokens): the
    window's text then ends in U+FFFD, and nothing is given until the character is whole. The
    pieces joined are the answer's full decode (less an unfinished last character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids = tokenizer, []
        self.start, self.shown = 0, 0  # the window starts at ids[start]; ids[:shown] are shown

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id):
        """-> the new text ("" while a character is unfinished or the token has no text)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.start:self.shown])
        text = self.decode(self.ids[self.start:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.start, self.shown = self.shown, len(self.ids)
        return text[len(before):]


def _is_tower_dir(path):
    return bool(path) and os.path.isfile(os.path.join(path, "config.json"))


def load_hf_dir(args):
    """A transformers-format directory (scripts/convert_model.py) -> (model, tokenizer).

    The model is built by this repository's classes, never by the .py files the directory carries
    (they are there for plain transformers, trust_remote_code=True): loading a directory does not run
    its code. Its weights must be finite and cover the tokenizer's ids.

    Vision tower: --vision_model_path when it was set to an existing tower, else the path the
    directory records (as given, relative to it, or its `vision_model` folder), else the flag's default."""
    import inspect
    import json

    from .modeling_minimind_v import MiniMindVLMForCausalLM
    path = args.weight
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} is not a transformers-format model directory (no config.json). Make one "
                                f"with `python scripts/convert_model.py --weight X.pth --out {path}`")
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        recorded = json.load(f).get("vision_model_path") or ""
    default = inspect.signature(VLMConfig.__init__).parameters["vision_model_path"].default
    candidates = [recorded] if os.path.isabs(recorded) else [recorded, os.path.join(path, recorded)] if recorded else []
    candidates.append(os.path.join(path, "vision_model"))  # the places the directory's own code looks
    kwargs = {}
    flag = args.vision_model_path
    if _is_tower_dir(flag) and (flag != default or not any(map(_is_tower_dir, candidates))):
        kwargs["vision_model_path"] = flag
    model = MiniMindVLMForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs)
    refuse_non_finite({k: v for k, v in model.state_dict().items() if not k.startswith("vision_encoder.")},
                      os.path.join(path, "model.safetensors"), "it is damaged, or was exported from a run that "
                      "diverged; export the directory again from another checkpoint")
    if getattr(args, "image_token_id", -1) >= 0:
        model.config.image_token_id = args.image_token_id
    tokenizer = load_tokenizer(path)
    check_vocab(tokenizer, path, model.config.vocab_size, os.path.join(path, "model.safetensors"),
                fix="export the directory again with the tokenizer its weights were trained with (--tokenizer_path)")
    return model, tokenizer
