"""MiniMind-V as an lmms-eval model (chat type), so the field's benchmarks score our weights:

    python -m lmms_eval --model minimind_v --model_args weight=out/sft_vlm_512.pth --tasks mmstar

scripts/setup_eval_env.sh installs it into .venv-eval, registered under lmms-eval's entry-point
group `lmms_eval.models`. It loads any weights eval_vlm.py loads and builds prompts the same way,
through model/inference.py (load_model, VLMChat.answer_batch): a score here and one of
`eval_vlm.py --bench` differ only by how each task reads an answer, never by the prompt.
"""
import dataclasses
import json
import os
import sys

from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MAX_NEW_TOKENS = 16  # as eval_vlm.py --bench: short answers; a task's own max_new_tokens wins


def manifest():
    """The entry point: lmms-eval calls it at start-up, so it imports nothing heavy."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id="minimind_v", chat_class_path="minimind_lmms.MiniMindV")


def repository():
    """The repository is scripts beside packages, not an installed package: its root goes first on
    sys.path, as a script run from it would have it. Only when a model is built, so lmms-eval's
    start-up sees no `model` or `cli` module of ours."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)


def inference_config(model_args):
    """lmms-eval's --model_args (key=value, values already turned into int/float/bool where they
    look like one) -> our InferenceConfig; an unknown key is an error naming the known ones."""
    from model.inference import InferenceConfig
    fields = {f.name: f for f in dataclasses.fields(InferenceConfig)}
    unknown = sorted(set(model_args) - set(fields))
    if unknown:
        raise ValueError(f"minimind_v: unknown model_args {unknown}; known: {sorted(fields)} and max_new_tokens "
                         f"(the batch size is lmms-eval's --batch_size)")
    # A path such as `model` or a tokenizer named `1` stays text; numeric flags become ints.
    typed = {k: int(v) if fields[k].type is int else str(v) for k, v in model_args.items()}
    return InferenceConfig(**typed)


def to_conversation(messages):
    """lmms-eval's chat messages -> (our turns with an <image> tag per image, in place, the images),
    built by model.chat.user_content as eval, the web demo and the API build theirs: a literal
    <image> in a task's text reads "[image]" and adds no image slot."""
    from model.chat import user_content
    from model.images import open_image
    turns, images = [], []
    for message in ChatMessages(messages=messages).messages:
        parts = []
        for content in message.content:
            if content.type == "image":
                url = content.url
                parts.append(open_image(url) if isinstance(url, (str, bytes, os.PathLike)) else url)
            elif content.type == "text":
                parts.append(content.text)
            else:
                raise ValueError(f"minimind_v answers about images and text; this task gives {content.type}")
        text, shown = user_content(parts)  # "<image>\nquestion", as trained
        turns.append({"role": message.role, "content": text})
        images += shown
    return turns, images


def cut_at(text, until):
    """The answer up to the first of the task's stop strings."""
    for stop in [until] if isinstance(until, str) else until or []:
        if stop:
            text = text.split(stop)[0]
    return text


def sampling(gen_kwargs):
    """A task's generation settings -> answer_batch's keywords: greedy unless it asks to sample."""
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    if not gen_kwargs.get("do_sample", temperature > 0) or temperature <= 0:
        return {}
    return {"temperature": temperature, "top_p": float(gen_kwargs.get("top_p") or 1.0)}


class MiniMindV(lmms):
    is_simple = False  # a chat model: each request brings its messages (doc_to_messages)

    def __init__(self, batch_size=1, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, max_batch_size=None, **model_args):
        super().__init__()
        if not str(batch_size).isdigit() or int(batch_size) < 1:  # lmms-eval's --batch_size; also "auto"
            raise ValueError(f"minimind_v: --batch_size must be a number of questions, not {batch_size!r}")
        repository()
        from model.inference import VLMChat, load_model
        config = inference_config(model_args)
        self.chat = VLMChat(*load_model(config), open_thinking=config.open_thinking)
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def conversation(self, request):
        _, doc_to_messages, _, doc_id, task, split = request.args
        return to_conversation(doc_to_messages(self.task_dict[task][split][doc_id]))

    def generate_until(self, requests):
        """Requests with the same generation settings go in batches through VLMChat.answer_batch,
        similar prompt texts together (less left padding); answers come back in request order.
        A batch's images are decoded when its turn comes, as eval_vlm.py --bench does."""
        from tqdm import tqdm
        groups = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[2], sort_keys=True, default=str), []).append(i)
        answers = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="minimind_v")
        for key, idx in groups.items():
            gen_kwargs = json.loads(key)
            idx.sort(key=lambda i: len(str(requests[i].args[0])))  # the task's prompt text
            limit = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
            for b in range(0, len(idx), self.batch_size):
                chunk = idx[b:b + self.batch_size]
                convs = [self.conversation(requests[i]) for i in chunk]
                out = self.chat.answer_batch(convs, max_new_tokens=limit, **sampling(gen_kwargs))
                for i, text in zip(chunk, out):
                    answers[i] = cut_at(text, gen_kwargs.get("until"))
                    self.cache_hook.add_partial("generate_until", (requests[i].args[0], gen_kwargs), answers[i])
                bar.update(len(chunk))
        bar.close()
        return answers

    def loglikelihood(self, requests):
        raise NotImplementedError("minimind_v answers by generation (generate_until tasks such as mmstar, mme, pope)")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("minimind_v does not run multi-round tasks yet")
