"""The transformers entry point of an exported MiniMind-V directory (scripts/convert_model.py copies
this file there as it is, next to model_minimind.py, generations.py, model_vlm.py, chat.py, images.py,
paths.py and precision.py).

    model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
    print(model.chat(PIL.Image.open("cat.jpg"), "What is in the picture?"))

Without a `dtype`, the weights load in the dtype eval_vlm.py's `--dtype auto` picks on the CPU
(precision.py): bf16 where the CPU computes it natively, else fp32.

The frozen vision tower (CLIP or SigLIP2) is not stored here: it is loaded after the weights, from
`vision_model_path` (from_pretrained keyword, else config.json's value, tried as given and relative
to this directory, else a `vision_model` folder inside it).
"""
import os

import torch

from .chat import ChatEncoder, check_room, user_content
from .images import from_pil, load_processor, open_image, to_pixels
from .model_minimind import rope_cos_sin
from .model_vlm import MiniMindVLM, VLMConfig, load_vision_tower, tower_token_count, vision_help
from .precision import resolve_dtype


class MiniMindVLMForCausalLM(MiniMindVLM):
    config_class = VLMConfig
    _keys_to_ignore_on_load_unexpected = [r"^vision_encoder\."]

    def __init__(self, config, vision_tower=None, load_tower=False):
        # No tower while transformers builds and fills the model (it would be re-initialised).
        super().__init__(config, vision_tower=vision_tower, load_tower=load_tower)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, attach_tower=True, **kwargs):
        if "dtype" not in kwargs and "torch_dtype" not in kwargs:
            kwargs["dtype"] = resolve_dtype("auto", "cpu")[0]
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # The RoPE tables are non-persistent buffers: transformers leaves them uninitialised.
        cos, sin = rope_cos_sin(model.config.head_dim, model.config.max_seq_len,
                                model.config.rope_theta)
        with torch.no_grad():
            model.rope_cos.copy_(cos.to(model.rope_cos.dtype))
            model.rope_sin.copy_(sin.to(model.rope_sin.dtype))
        if attach_tower:
            model.attach_vision_tower(model.find_vision_tower(str(pretrained_model_name_or_path)))
        return model.eval()

    def find_vision_tower(self, model_dir):
        recorded = self.config.vision_model_path
        candidates = [os.path.join(model_dir, recorded)] if recorded and not os.path.isabs(recorded) else []
        candidates += [recorded, os.path.join(model_dir, "vision_model")]
        for path in candidates:
            if path and os.path.isfile(os.path.join(path, "config.json")):
                return path
        raise FileNotFoundError(
            f"No vision tower for this MiniMind-V: looked in {candidates}. Pass "
            f"from_pretrained(..., vision_model_path=DIR). {vision_help(next(c for c in candidates if c))}")

    def attach_vision_tower(self, path):
        tower = load_vision_tower(path)
        if tower.config.hidden_size != self.config.vision_hidden_size:
            raise ValueError(f"vision tower at {path} has width {tower.config.hidden_size}, but this model's "
                             f"projection expects {self.config.vision_hidden_size}")
        param = next(self.parameters())
        self.vision_encoder = tower.to(param.device, param.dtype)
        self.config.vision_model_path = path
        # Placeholders per image follow the tower (196 CLIP B/16, 64 SigLIP2), also when the export
        # was written without it and its config.json kept the default.
        self.config.image_token_count = tower_token_count(tower)
        return self

    def _chat_tools(self, tokenizer, processor):
        from transformers import AutoTokenizer
        here = self.name_or_path
        if tokenizer is None:
            tokenizer = (getattr(self, "_chat_tokenizer", None)
                         or AutoTokenizer.from_pretrained(here, trust_remote_code=True))
            self._chat_tokenizer = tokenizer
        if processor is None:
            processor = getattr(self, "_chat_processor", None)
            if processor is None:
                has_own = os.path.isfile(os.path.join(here, "preprocessor_config.json"))
                processor = load_processor(here if has_own else self.config.vision_model_path)
            self._chat_processor = processor
        return tokenizer, processor

    def encode_chat(self, messages, tokenizer):
        """The prompt's (ids, is_image), as training and eval_vlm.py encode it (model/chat.py)."""
        return ChatEncoder(tokenizer, self.config.image_token_id, self.config.image_token_count).encode_prompt(messages)

    def conversation(self, image=None, messages=None):
        """chat()'s arguments -> (turns with an <image> tag per picture, the pictures in tag order),
        built by chat.user_content as eval_vlm.py, the web demo and the API build theirs: text is what
        was typed, so an <image> typed in it reads "[image]" and takes no picture."""
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        images = [open_image(im) if isinstance(im, (str, os.PathLike, bytes)) else im for im in images]
        if messages is None:
            messages = "Describe the image."
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        parts = [[m["content"]] if isinstance(m["content"], str) else list(m["content"]) for m in messages]
        if images:
            users = [i for i, m in enumerate(messages) if m["role"] == "user"]
            if not users:
                raise ValueError("the images go in front of the last user message, but the messages have none")
            parts[users[-1]] = images + parts[users[-1]]
        turns, shown = [], []
        for m, turn_parts in zip(messages, parts):
            turn_parts = [open_image(p) if isinstance(p, (os.PathLike, bytes)) else p for p in turn_parts]
            content, pictures = user_content(turn_parts)
            turns.append({**m, "content": content})
            shown += pictures
        return turns, [from_pil(im) for im in shown]

    @torch.inference_mode()
    def chat(self, image=None, messages=None, tokenizer=None, processor=None, max_new_tokens=256,
             temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0):
        """One answer. image: None, a PIL image or path, or a list of them; they go in front of the
        last user message. messages: a question, or [{"role", "content"}, ...] whose content is text
        or a list of parts in order (text, a PIL image or path-like, a chat.Video). Text is what was
        typed: an <image> in it is text, as in eval_vlm.py, the web demo and the API (conversation()).
        Tokenizer and processor default to this directory's own. Images become pixels as in training
        (images.py: orientation, RGB, size)."""
        messages, images = self.conversation(image, messages)
        tokenizer, processor = self._chat_tools(tokenizer, processor)
        device = next(self.parameters()).device
        prompt_ids, is_image = self.encode_chat(messages, tokenizer)
        check_room(len(prompt_ids), max_new_tokens, self.config.max_seq_len)
        ids = torch.tensor([prompt_ids], device=device)
        pixel_values = to_pixels(processor, images).to(device) if images else None
        out = self.generate(ids, pixel_values=pixel_values, image_mask=torch.tensor([is_image], device=device),
                            max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
                            eos_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[:new.index(tokenizer.eos_token_id)]
        return tokenizer.decode(new, skip_special_tokens=True)
