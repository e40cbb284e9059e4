"""Talk to, or score, a trained MiniMind-V model. Three modes:

  folder (default)  ask --prompt about every image in --image_dir (or just --image, or a --video's
                    --frames frames, shown with their timestamps), streaming answers
  --chat            a multi-turn terminal conversation about one image (/image PATH, /clear, /quit)
  --bench FILE      greedy exact-match accuracy on SFT-format data (jsonl + images, or parquet); the last line is
                    `accuracy=0.913 n=300`. --blind swaps every image for a blank one: the no-vision baseline.

Scoring is importable (normalize, score, run_benchmark) so other scripts and the tests share it.
"""
import json
import os
import sys
import time
import unicodedata
from collections import defaultdict

from PIL import Image

from cli import IMAGES_PATH_DEFAULT, add_model_args, add_video_args, make_parser, switch
from model.images import ImageError, open_image
from dataset.samples import open_source
from dataset.video import read_frames
from model.chat import IMAGE_TAG, Video, user_content

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_PROMPT = "Describe the image."
BLANK = (128, 128, 128)  # mid-grey is ~CLIP's mean pixel: after normalisation the image is almost all zeros


# ----------------------------------------------------------------------------- scoring

def normalize(text):
    """Lowercase, punctuation (any script: '。' '，' as well as '.' ',') -> space, whitespace collapsed.
    NFKC first, so full-width 'ＲＥＤ' or '３' match 'red' and '3'. Punctuation becomes a space, not
    nothing, so 'top-left' equals 'top left' and '红色。' equals '红色'."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text)
    return " ".join(text.split())


def score(predictions, references, types=None):
    """Exact match after normalize -> {"accuracy", "n", "correct", "per_type": {type: {...}}}."""
    types = types or ["all"] * len(references)
    assert len(predictions) == len(references) == len(types)
    hits = defaultdict(lambda: [0, 0])  # type -> [correct, n]
    for p, r, t in zip(predictions, references, types):
        hits[t][0] += normalize(p) == normalize(r)
        hits[t][1] += 1
    correct, n = sum(h[0] for h in hits.values()), len(references)
    per_type = {t: {"accuracy": c / k, "n": k, "correct": c} for t, (c, k) in sorted(hits.items())}
    return {"accuracy": correct / n if n else 0.0, "n": n, "correct": correct, "per_type": per_type}


def format_summary(summary):
    """A small per-type table; the last line is always exactly `accuracy=0.913 n=300`."""
    lines = [f"{'type':<12}{'n':>6}  accuracy"]
    lines += [f"{t:<12}{s['n']:>6}  {s['accuracy']:.3f}" for t, s in summary["per_type"].items()]
    lines.append(f"accuracy={summary['accuracy']:.3f} n={summary['n']}")
    return "\n".join(lines)


def read_questions(path, images_path=None, limit=0):
    """One question per non-empty assistant turn: the model gets the *reference* history before the
    turn, so a multi-turn sample is scored turn by turn, never on its own earlier mistakes.
    The data is jsonl + images or parquet, read by the training data reader (dataset/samples.py)."""
    try:
        source = open_source(path, images_path, path_flag="--bench")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if source.n_bad:
        raise ValueError(source.bad[0])
    questions = []
    for i in range(min(len(source), limit) if limit else len(source)):
        sample = source.get(i)  # raises SampleError (a ValueError) naming file and row
        if sample.video is not None:
            raise ValueError(f"{sample.where}: --bench does not score video samples yet (train on them, or ask "
                             f"with --video)")
        names = [os.path.basename(s) if isinstance(s, str) else f"embedded image {k + 1}"
                 for k, s in enumerate(sample.images)]
        for j, turn in enumerate(sample.messages):
            if turn["role"] != "assistant" or not turn["content"].strip() or j == 0:
                continue
            history = sample.messages[:j]
            n_tags = sum(m["content"].count(IMAGE_TAG) for m in history)  # images shown so far
            users = [m["content"] for m in history if m["role"] == "user"]
            questions.append({"where": sample.where, "turn": j, "history": history, "sources": sample.images[:n_tags],
                              "images": names[:n_tags],
                              "question": users[-1].replace(IMAGE_TAG, "").strip() if users else "",
                              "reference": turn["content"], "type": sample.type})
    return questions


def load_images(sources, blind=False, where=""):
    """Image files or bytes -> RGB images through the one opener training uses; --blind swaps each
    for a blank one of the same size."""
    try:
        images = [open_image(s) for s in sources]
    except ImageError as e:
        raise ValueError(f"{where}: cannot read image: {e}" if where else str(e)) from None
    return [Image.new("RGB", im.size, BLANK) for im in images] if blind else images


def run_benchmark(chat, path, images_path=None, blind=False, limit=0, batch_size=32, max_new_tokens=16,
                  progress=True):
    """-> (summary, rows). Greedy, batched through VLMChat.answer_batch; images are read per batch."""
    questions = read_questions(path, images_path, limit)
    # Batch similar-length prompts together (less left padding); results go back in file order.
    order = sorted(range(len(questions)), key=lambda i: (len(questions[i]["sources"]),
                                                         sum(len(m["content"]) for m in questions[i]["history"])))
    predictions = [None] * len(questions)
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        convs = [(questions[i]["history"], load_images(questions[i]["sources"], blind, questions[i]["where"]))
                 for i in idx]
        for i, answer in zip(idx, chat.answer_batch(convs, max_new_tokens=max_new_tokens)):
            predictions[i] = answer.strip()
        if progress and len(questions) > batch_size:
            print(f"scored {min(b + batch_size, len(questions))}/{len(questions)}", file=sys.stderr, flush=True)
    summary = score(predictions, [q["reference"] for q in questions], [q["type"] for q in questions])
    summary.update(bench=path, blind=bool(blind), limit=limit)
    rows = [{"where": q["where"], "turn": q["turn"], "type": q["type"], "image": ", ".join(q["images"]),
             "question": q["question"], "reference": q["reference"], "prediction": p,
             "correct": normalize(p) == normalize(q["reference"])} for q, p in zip(questions, predictions)]
    return summary, rows


# ----------------------------------------------------------------------------- talking

def stream_answer(chat, tokenizer, messages, images, args):
    """Prints the answer (piece by piece with --stream 1), then speed stats on stderr; returns it."""
    t0, t_first, pieces = time.time(), None, []
    kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    if args.stream:
        for piece in chat.stream(messages, images, **kw):
            t_first = t_first or time.time()
            pieces.append(piece)
            print(piece, end="", flush=True)
    else:
        pieces.append(chat.answer(messages, images, **kw))
        print(pieces[0], end="")
    t_end = time.time()
    print(flush=True)
    answer = "".join(pieces)
    n = len(tokenizer.encode(answer, add_special_tokens=False))  # pieces are whole characters, not tokens
    stats = f"[{n} tokens, "
    stats += (f"first token {t_first - t0:.2f}s, {(n - 1) / max(t_end - t_first, 1e-9):.0f} tok/s]" if t_first and n > 1
              else f"{t_end - t0:.2f}s]")
    print(stats, file=sys.stderr, flush=True)
    return answer


def with_tag(prompt):
    return prompt if IMAGE_TAG in prompt else f"{IMAGE_TAG}\n{prompt}"


def video_mode(chat, tokenizer, args):
    """--video: its frames, in time order and with their timestamps, as the images of one prompt."""
    try:
        frames, times = read_frames(args.video, args.frames, args.max_video_seconds)
    except ValueError as e:  # VideoError, or --frames out of range
        sys.exit(f"error: {e}")
    prompt = "Describe the video." if args.prompt == DEFAULT_PROMPT else args.prompt
    content, frames = user_content([Video(frames, times), prompt])  # a typed tag in the prompt is text
    messages = [{"role": "user", "content": content}]
    print(f"[{os.path.basename(args.video)}: {len(frames)} frames at "
          f"{', '.join(f'{t:.1f}' for t in times)} s] {prompt}", flush=True)
    stream_answer(chat, tokenizer, messages, frames, args)


def folder_mode(chat, tokenizer, args):
    if args.image:
        files = [args.image]
    elif os.path.isdir(args.image_dir):
        named = sorted(os.path.join(args.image_dir, f) for f in os.listdir(args.image_dir)
                       if f.lower().endswith(IMAGE_EXTS))
        files = [f for f in named if os.path.isfile(f)]  # regular files only: opening a FIFO waits forever
        if len(files) < len(named):
            print(f"note: skipped {len(named) - len(files)} of the {len(named)} entries named like images in "
                  f"{args.image_dir}: not regular files (FIFOs, sockets, devices or folders)",
                  file=sys.stderr, flush=True)
    else:
        files = []
    if not files:
        sys.exit(f"error: no images ({', '.join(IMAGE_EXTS)}) in {args.image_dir}: pass --image_dir DIR or "
                 f"--image FILE, or use --chat / --bench")
    messages = [{"role": "user", "content": with_tag(args.prompt)}]
    unreadable = []
    for path in files:
        try:
            images = load_images([path])
        except ValueError as e:  # one bad file must not cost the answers about the others
            print(f"error: {e}; skipped", file=sys.stderr, flush=True)
            unreadable.append(path)
            continue
        print(f"[{os.path.basename(path)}] {args.prompt}", flush=True)
        stream_answer(chat, tokenizer, messages, images, args)
        print()
    if unreadable:
        sys.exit(f"error: {len(unreadable)} of {len(files)} images could not be read: "
                 + ", ".join(map(os.path.basename, unreadable)))


def chat_mode(chat, tokenizer, args):
    image, messages = None, []
    if args.image:
        try:
            image = load_images([args.image], where=args.image)[0]
        except ValueError as e:
            sys.exit(f"error: {e}")
    print(f"chat about {args.image or 'no image (text only)'}. Commands: /image PATH, /clear, /quit", flush=True)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/clear" or line.startswith("/image"):
            if line.startswith("/image"):
                path = line[len("/image"):].strip()
                try:
                    image = load_images([path], where=path)[0]
                except ValueError as e:
                    print(f"error: {e}", flush=True)
                    continue
                print(f"(image: {path})")
            messages = []  # a new image starts a new conversation: old answers were about the old one
            print("(history cleared)", flush=True)
            continue
        # The image goes with the first turn; a typed <image> is text, as in the web demo and the API.
        content = user_content([image, line] if image is not None and not messages else [line])[0]
        messages.append({"role": "user", "content": content})
        try:
            answer = stream_answer(chat, tokenizer, messages, [image] if image is not None else [], args)
        except (ValueError, RuntimeError) as e:  # e.g. the history outgrew max_seq_len
            messages.pop()
            print(f"error: {e} (try /clear)", flush=True)
            continue
        messages.append({"role": "assistant", "content": answer})


def build_parser():
    ap = make_parser(__doc__)
    add_model_args(ap)
    a = ap.add_argument_group("decoding").add_argument
    a("--max_new_tokens", type=int, default=None, help="answer length limit; default: 128, or 16 with --bench "
                                                       "(short answers)")
    a("--temperature", type=float, default=0.0, help="0 = greedy (folder/chat; --bench is always greedy)")
    a("--top_p", type=float, default=0.85, help="nucleus sampling: the smallest set of tokens with this much "
                                                "probability (with --temperature > 0)")
    switch(a, "--stream", 1, help="print answers token by token")
    switch(a, "--static_cache", 0, help="KV cache of one fixed shape, written in place (what CUDA graphs need); "
                                        "the same answers")
    switch(a, "--compile_decode", 0, help="decode steps as one compiled graph in a static KV cache (on CUDA "
                                          "a CUDA graph: torch.compile mode reduce-overhead); the same answers, "
                                          "after a compile of each new batch size")
    inputs = ap.add_argument_group("folder and chat modes")
    a = inputs.add_argument
    a("--image_dir", default="images/eval", help="folder mode: every png/jpg/jpeg/webp/bmp, sorted by name")
    a("--image", default=None, help="one image: folder mode answers just it; --chat starts with it (default: none)")
    a("--prompt", default=DEFAULT_PROMPT, help="folder mode question; <image>\\n is prepended if absent")
    a("--video", default=None, help="ask --prompt (whose default becomes \"Describe the video.\") about a video's "
                                    "frames (default: none)")
    add_video_args(inputs)
    switch(a, "--chat", 0, help="interactive multi-turn chat")
    a = ap.add_argument_group("benchmark (--bench)").add_argument
    a("--bench", default=None, help="SFT-format data to score: a jsonl or parquet (exact match; an optional "
                                    "per-sample \"type\" field or column gives per-type scores) (default: none)")
    a("--images_path", default=None, help=f"--bench with a jsonl: its image folder (default: {IMAGES_PATH_DEFAULT})")
    switch(a, "--blind", 0, help="--bench with every image replaced by a blank one")
    a("--limit", type=int, default=0, help="--bench: first N samples only (0 = all)")
    a("--batch_size", type=int, default=32, help="--bench questions per generation batch")
    a("--out", default=None, help="--bench: write summary + per-question rows to this JSON file (default: none)")
    return ap


def main(argv=None):
    args = build_parser().parse_args(argv)
    from model.inference import InferenceConfig, VLMChat, load_model  # torch: after the flags, so --help is at once
    if args.max_new_tokens is None:
        args.max_new_tokens = 16 if args.bench else 128

    try:
        model, tokenizer, processor = load_model(InferenceConfig.from_args(args))
        chat = VLMChat(model, tokenizer, processor, args.open_thinking, args.static_cache, args.compile_decode)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        sys.exit(f"error: {e}")
    if args.bench:
        try:
            summary, rows = run_benchmark(chat, args.bench, args.images_path, args.blind, args.limit,
                                          args.batch_size, args.max_new_tokens)
        except ValueError as e:
            sys.exit(f"error: {e}")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump({"summary": summary, "rows": rows}, f, ensure_ascii=False, indent=1)
        print(format_summary(summary), flush=True)
    elif args.chat:
        chat_mode(chat, tokenizer, args)
    elif args.video:
        video_mode(chat, tokenizer, args)
    else:
        folder_mode(chat, tokenizer, args)


if __name__ == "__main__":
    main()
