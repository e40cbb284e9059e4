"""Web demo: chat with MiniMind-V about your pictures (Gradio).

    python web_demo_vlm.py --weight sft_vlm --dim 512            # then open http://127.0.0.1:8888
    python web_demo_vlm.py --hf_dirs out/MiniMind2-V-hf          # also offer a transformers-format directory

Attach one or more images (or a video: its --frames frames, with their times) and ask; answers
stream token by token. The conversation (text and
images, each image kept in the turn it was given in) goes back to the model on every turn. The
model selector lists the weights in --out_dir (.pth files, not the trainer's resume files) and the
--hf_dirs directories; a model is loaded
the first time it is chosen and kept (the last --cache_models of them). Each browser tab has its
own conversation; requests wait in a queue.
"""
import dataclasses
import functools
import glob
import os
import sys
import threading
from collections import OrderedDict

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = os.path.dirname(os.path.abspath(__file__))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import add_model_args, add_video_args, make_parser, switch  # noqa: E402
from dataset.video import VIDEO_EXTS, read_frames  # noqa: E402
from model.chat import ReasoningSplitter, Video, check_image_count, check_room, user_content  # noqa: E402
from model.images import open_image  # noqa: E402
from model.paths import RunFiles  # noqa: E402

HINT = "Type a question, and attach pictures or a video with the 📎 button (or drop them on the box)."


def parse_args(argv=None):
    ap = make_parser("MiniMind-V web demo (Gradio)")
    add_model_args(ap)
    a = ap.add_argument_group("model list").add_argument
    a("--hf_dirs", nargs="*", default=[], help="transformers-format model directories to offer besides the "
                                               ".pth files in --out_dir (default: none)")
    a("--cache_models", type=int, default=3, help="loaded models kept in memory")
    a = ap.add_argument_group("serving").add_argument
    a("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    a("--port", type=int, default=8888, help="the port to listen on")
    switch(a, "--share", 0, help="also serve on a temporary public gradio.live link (needs the internet)")
    a("--concurrency", type=int, default=1, help="answers generated at once (others queue)")
    a("--max_file_mb", type=float, default=25, help="largest upload accepted")
    limits = ap.add_argument_group("limits")
    a = limits.add_argument
    a("--max_images", type=int, default=8,
      help="images per conversation, a video's frames included (each takes the model's "
           "image_token_count placeholders: 196 for CLIP ViT-B/16)")
    add_video_args(limits)  # a video upload becomes --frames images
    a("--max_seq_len", type=int, default=0, help="prompt + answer token limit; 0 = the model's max_seq_len")
    a = ap.add_argument_group("decoding", "the sliders' starting values").add_argument
    a("--max_new_tokens", type=int, default=512, help="answer length limit")
    a("--temperature", type=float, default=0.85, help="0 = greedy")
    a("--top_p", type=float, default=0.85, help="nucleus sampling: the smallest set of tokens with this much "
                                                "probability")
    return ap.parse_args(argv)


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before gradio and torch load (seconds)

import gradio as gr  # noqa: E402

from model.model_minimind import count_llm_params  # noqa: E402
from model.inference import (InferenceConfig, VLMChat, is_hf_dir, load_model, missing_weights,  # noqa: E402
                             resolve_weight_path)


class ModelHub:
    """The models one can pick (label -> (load, path)) and a small cache of loaded ones."""

    def __init__(self, args):
        self.args, self.lock, self.cache = args, threading.Lock(), OrderedDict()
        self.cfg = InferenceConfig.from_args(args)
        self.default = None
        self.choices = self.discover()

    def discover(self):
        """label -> (load, path, lora). Labels are file / directory names (the full path on a clash);
        the --weight model carries the --lora adapter, named in its label."""
        args, found = self.args, []
        if is_hf_dir(args.weight):
            found.append((1, args.weight, args.lora))
        elif os.path.isfile(resolve_weight_path(args)):
            found.append((0, resolve_weight_path(args), args.lora))
        found += [(0, p, None) for p in sorted(glob.glob(os.path.join(args.out_dir, "*.pth")))
                  if not p.endswith(RunFiles.SUFFIXES["resume"])]  # a trainer's resume state, not weights to chat with
        found += [(1, d, None) for d in args.hf_dirs]
        choices, seen = OrderedDict(), set()
        for load, path, lora in found:
            path = os.path.normpath(path)
            if (load, path, lora) in seen:
                continue
            seen.add((load, path, lora))
            suffix = (" [transformers]" if load == 1 else "") + (f" + {os.path.basename(lora)}" if lora else "")
            label = os.path.basename(path) + suffix
            if label in choices:
                label = path + suffix
            choices[label] = (load, path, lora)
        self.default = next(iter(choices), None)
        return choices

    def refresh(self):
        """Re-scan --out_dir (new checkpoints appear on the next page load); loaded models stay."""
        with self.lock:
            self.choices = self.discover() | {k: v for k, v in self.choices.items() if k in self.cache}
            return list(self.choices)

    def get(self, label):
        """-> VLMChat for a label, loading it on first use. Raises RuntimeError with a reason."""
        with self.lock:
            if label in self.cache:
                self.cache.move_to_end(label)
                return self.cache[label]
            if label not in self.choices:
                raise RuntimeError(f"unknown model {label!r}")
            _, weight, lora = self.choices[label]
            cfg = dataclasses.replace(self.cfg, weight=weight, lora=lora)  # a .pth or a directory
            try:
                chat = VLMChat(*load_model(cfg), cfg.open_thinking)
            except Exception as e:
                raise RuntimeError(f"could not load {label}: {e}") from None
            self.cache[label] = chat
            while len(self.cache) > max(1, self.args.cache_models):
                self.cache.popitem(last=False)
            return chat


def describe(label, chat):
    c = chat.model.config
    n = count_llm_params(chat.model)
    tower = os.path.basename(os.path.normpath(c.vision_model_path))
    return (f"**{label}**: dim {c.dim}, {c.n_layers} layers{' (MoE)' if c.use_moe else ''}, "
            f"{n / 1e6:.1f}M LLM parameters; vision tower {tower}")


def new_session(model_label):
    # messages: what the model sees (with <image> tags); images: PIL images in tag order;
    # display: what the chat window shows (also notices that never reach the model)
    return {"model": model_label, "messages": [], "images": [], "display": []}


def file_path(f):
    return f if isinstance(f, str) else (f.get("path") if isinstance(f, dict) else getattr(f, "path", None))


def notice(state, text):
    """A message in the chat that never reaches the model."""
    state["display"].append({"role": "assistant", "content": f"⚠️ {text}"})
    return state["display"], None, state


def read_upload(args, path):
    """An uploaded file -> a part of the user's turn (model.chat.user_content): an image, or a
    video (by extension) as its frames and their times, as in training."""
    name = os.path.basename(path)
    if path.lower().endswith(VIDEO_EXTS):
        return Video(*read_frames(path, args.frames, args.max_video_seconds, name=name))
    return open_image(path, name=name)


def user_turn(args, state, message):
    """A submitted message -> (its content for the model, images), shown in the chat; or the reason
    (str) it cannot go to the model: nothing in it, an unreadable file, or too many pictures."""
    message = message or {}
    text = (message.get("text") or "").strip()
    files = [p for p in map(file_path, message.get("files") or []) if p]
    if not text and not files:
        return HINT
    for p in files:
        state["display"].append({"role": "user", "content": {"path": p}})
    if text:
        state["display"].append({"role": "user", "content": text})
    parts, problems = [], []
    for p in files:
        try:
            parts.append(read_upload(args, p))
        except ValueError as e:  # ImageError, VideoError
            problems.append(str(e))
    if problems:
        return " ".join(problems) + " Nothing was sent to the model; try again."
    content, images = user_content(parts + [text])
    try:
        check_image_count(len(state["images"]) + len(images), args.max_images)
    except ValueError as e:
        return f"Too many images: {e}. Press Clear to start a new conversation."
    return content, images


def respond(args, hub, message, state, temperature, top_p, max_new_tokens):
    """One turn: the user's message, then the answer streamed into the chat (without the reasoning
    of an open think block)."""
    turn = user_turn(args, state, message)
    if isinstance(turn, str):
        yield notice(state, turn)
        return
    content, images = turn
    try:
        chat = hub.get(state["model"])
    except RuntimeError as e:
        yield notice(state, str(e))
        return
    messages = state["messages"] + [{"role": "user", "content": content}]
    all_images = state["images"] + images
    max_new_tokens = max(1, min(int(max_new_tokens), 4096))
    try:
        check_room(len(chat.encoder.encode_prompt(messages)[0]), max_new_tokens,
                   args.max_seq_len or chat.model.config.max_seq_len)
    except ValueError as e:
        yield notice(state, f"The conversation is too long: {e}. Press Clear, or lower max new tokens.")
        return
    # Commit the turn before streaming, so a Stop keeps the partial answer in the history.
    answer, display = {"role": "assistant", "content": ""}, state["display"]
    state["messages"], state["images"] = messages + [answer], all_images
    display.append({"role": "assistant", "content": ""})
    yield display, None, state
    try:
        splitter = ReasoningSplitter(chat.open_thinking)
        for piece in chat.stream(messages, all_images, max_new_tokens=max_new_tokens,
                                 temperature=float(temperature), top_p=float(top_p)):
            content = "".join(text for kind, text in splitter.feed(piece) if kind == "content")
            if content:
                answer["content"] += content
                display[-1]["content"] = answer["content"]
                yield display, gr.skip(), state
    except Exception as e:  # keep the session usable: drop the failed turn
        state["messages"], state["images"] = messages[:-1], all_images[:len(all_images) - len(images)]
        display[-1]["content"] = f"⚠️ generation failed: {e}"
        yield display, gr.skip(), state
        return
    if not answer["content"]:
        display[-1]["content"] = "_(the model ended its answer without text)_"
        yield display, gr.skip(), state


def build_demo(args, hub):
    def clear(state):
        fresh = new_session(state["model"])
        return [], None, fresh

    def select_model(label, state):
        try:
            chat = hub.get(label)
        except RuntimeError as e:
            return f"⚠️ {e} (still using {state['model']})", state, gr.update(value=state["model"])
        state["model"] = label
        return describe(label, chat), state, gr.skip()

    def on_load(state):
        labels = hub.refresh()
        status = describe(state["model"], hub.cache[state["model"]]) if state["model"] in hub.cache else ""
        return gr.update(choices=labels, value=state["model"]), status

    with gr.Blocks(title="MiniMind-V") as demo:
        gr.Markdown("# MiniMind-V\nA tiny vision-language model: attach pictures, ask about them, keep chatting.")
        state = gr.State(new_session(hub.default))
        with gr.Row():
            model_box = gr.Dropdown(choices=list(hub.choices), value=hub.default, label="Model", scale=3,
                                    allow_custom_value=False)
            status = gr.Markdown(describe(hub.default, hub.cache[hub.default]) if hub.default in hub.cache
                                 else "No model found: pass --weight or --hf_dirs." if hub.default is None else "")
        chatbot = gr.Chatbot(label="Chat", height=480, elem_id="chat", buttons=["copy", "copy_all"])
        textbox = gr.MultimodalTextbox(file_count="multiple", placeholder="Ask about your pictures...",
                                       show_label=False, elem_id="input", sources=["upload"])
        with gr.Row():
            stop_btn = gr.Button("Stop", variant="secondary", elem_id="stop")
            clear_btn = gr.Button("Clear", variant="secondary", elem_id="clear")
        with gr.Accordion("Sampling", open=False):
            temperature = gr.Slider(0.0, 1.5, value=args.temperature, step=0.05, label="Temperature (0 = greedy)")
            top_p = gr.Slider(0.05, 1.0, value=args.top_p, step=0.05, label="Top-p")
            max_new = gr.Slider(1, 2048, value=args.max_new_tokens, step=16, label="Max new tokens")
        gr.Markdown(f"Up to {args.max_images} images per conversation (a video counts as its {args.frames} frames); "
                    "larger pictures are shrunk first. "
                    "Stop interrupts the answer (what was written stays); Clear starts over.")

        chat_event = textbox.submit(functools.partial(respond, args, hub), [textbox, state, temperature, top_p, max_new],
                                    [chatbot, textbox, state], api_name="chat",
                                    concurrency_limit=args.concurrency, concurrency_id="generate")
        stop_btn.click(None, None, None, cancels=[chat_event], api_name=False)
        clear_btn.click(clear, [state], [chatbot, textbox, state], cancels=[chat_event], api_name="clear")
        chatbot.clear(clear, [state], [chatbot, textbox, state], cancels=[chat_event], api_name=False)
        # A pick by the user, not any change: after a failed load, select_model puts the list back to the
        # model in use, and a .change would take that for a new pick whose status replaces the error at once.
        model_box.input(select_model, [model_box, state], [status, state, model_box], api_name="select_model",
                        concurrency_limit=1, concurrency_id="load")
        demo.load(on_load, [state], [model_box, status], api_name=False)
    return demo


def main(argv=None):
    args = parse_args(argv)
    hub = ModelHub(args)
    if hub.default is None:  # nothing to offer: the --weight it looked for is missing, as eval_vlm.py says
        sys.exit(f"error: {missing_weights(resolve_weight_path(args))}")
    try:
        hub.get(hub.default)  # as eval and the API do: a model that cannot load is an error at once
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    demo = build_demo(args, hub)
    demo.queue(default_concurrency_limit=args.concurrency, max_size=64)
    # quiet: gradio's own start lines end with a hint to edit launch() for a public link, which is --share here
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, share=bool(args.share), quiet=True,
                max_file_size=f"{args.max_file_mb}mb", inbrowser=False, prevent_thread_lock=True)
    print(f"web demo at {demo.local_url}" + (f" and {demo.share_url}" if demo.share_url else ""), flush=True)
    demo.block_thread()


if __name__ == "__main__":
    main()
