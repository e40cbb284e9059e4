"""Throughput of scripts/serve_openai_api.py under concurrent clients against one client at a time,
with a randomly initialised model (a tiny CLIP tower built here; no downloads).

    python dev/api_throughput.py                       # dim 512 x 8 layers (MiniMind2-small), 8 clients, CPU
    python dev/api_throughput.py --image 0             # text-only requests
    python dev/api_throughput.py --dim 768 --n_layers 16 --device cuda

Each request is greedy, has one image (--image 0: none) and asks for --max_tokens tokens (--mixed 1: a
quarter, half, three quarters or all of them, so that rows of one batch end at different steps). The two ways of
sending alternate (one at a time, concurrent, one at a time, ...) for --rounds rounds, so a machine whose
speed drifts (other work on its cores) affects both alike; prints each round, then the medians and the
median of the rounds' speed-ups. --steps also times the model alone: the batch prefill and one decode step
at batch 1 and at batch --max_batch (alternating), which bound what batching can give: when a step of 8
rows costs nearly 8 steps of one, the matmuls are compute-bound and batching has little left to share.
"""
import argparse
import base64
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "demo")]


def png_url(colour):
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def step_times(chat, prompts, pixels, batch, rounds, decode_steps=16):
    """Median prefill and decode-step times (s) of the model alone, at batch 1 and `batch`, alternating."""
    import torch
    from model.model_minimind import KVCache
    model = chat.model
    times = {(b, kind): [] for b in (1, batch) for kind in ("prefill", "decode")}
    with torch.inference_mode():
        for _ in range(rounds + 1):  # the first round warms up
            for b in (1, batch):
                ids, mask, image_mask = chat.left_pad(prompts[:b])
                px = torch.cat(pixels[:b]) if pixels[0] is not None else None
                cache = KVCache(len(model.layers), capacity=ids.shape[1] + decode_steps)
                t = time.perf_counter()
                out = model(ids, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1,
                            pixel_values=px, image_mask=image_mask)
                prefill = time.perf_counter() - t
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                steps = []
                for _ in range(decode_steps):
                    if mask is not None:
                        mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
                    t = time.perf_counter()
                    nxt = model(nxt, attention_mask=mask, past_key_values=cache, use_cache=True,
                                logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
                    steps.append(time.perf_counter() - t)
                times[b, "prefill"].append(prefill)
                times[b, "decode"].append(statistics.median(steps))
    return {k: statistics.median(v[1:]) for k, v in times.items()}


COLOURS = ["red", "green", "blue", "yellow"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--n_layers", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto: as the server chooses (bf16 on a CPU with native bf16)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="sent each way, each round")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two ways of sending")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=1, help="0: text-only requests")
    ap.add_argument("--mixed", type=int, default=0, help="1: request i asks for max_tokens * (1 + i %% 4) / 4 tokens "
                                                         "(answers of different lengths share a batch)")
    ap.add_argument("--steps", type=int, default=1, help="0: skip timing the model's prefill and decode steps")
    return ap.parse_args()


def build_chat(args):
    """A random model of the asked size on a tiny tower, as the server would hold it -> VLMChat."""
    import torch
    from make_demo_vision_tower import build_vision_tower
    from model.images import load_processor
    from model.inference import VLMChat
    from model.model_minimind import count_llm_params
    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.precision import cpu_bf16_instructions, dtype_name, resolve_dtype
    from transformers import AutoTokenizer

    tower = tempfile.mkdtemp(prefix="tower")
    build_vision_tower(tower, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    torch.manual_seed(0)
    dtype, _ = resolve_dtype(args.dtype, args.device)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower, dim=args.dim, n_layers=args.n_layers)).eval()
    chat = VLMChat(model.to(args.device, dtype), AutoTokenizer.from_pretrained(os.path.join(ROOT, "model")),
                   load_processor(tower))
    print(f"model dim {args.dim} x {args.n_layers} layers ({count_llm_params(model) / 1e6:.1f}M LLM parameters), "
          f"{dtype_name(dtype)} on {args.device}; CPU bf16 instructions: "
          f"{', '.join(cpu_bf16_instructions()) or 'none'}; {torch.get_num_threads()} torch threads, "
          f"{os.cpu_count()} cores; {args.image} image(s) of {model.config.image_token_count} tokens a request")
    return chat


def print_step_bound(chat, args):
    """The model alone: prefill and decode step at batch 1 and --max_batch, and what they allow batching."""
    from PIL import Image
    prompts, pixels = [], []
    for i in range(args.max_batch):
        prompts.append(chat.encoder.encode_prompt([{"role": "user", "content": "<image>\n" * args.image
                                                    + f"Describe picture {i}."}]))
        pixels.append(chat.pixels([Image.new("RGB", (64, 48), COLOURS[i % 4])] * args.image))
    t = step_times(chat, prompts, pixels, args.max_batch, args.rounds)
    b = args.max_batch
    print(f"model alone, medians of {args.rounds} alternations: prefill of {len(prompts[0][0])} tokens "
          f"{t[1, 'prefill'] * 1e3:.1f} ms at batch 1, {t[b, 'prefill'] * 1e3:.1f} ms at batch {b} "
          f"({t[b, 'prefill'] / t[1, 'prefill']:.2f}x); decode step {t[1, 'decode'] * 1e3:.2f} ms at batch 1, "
          f"{t[b, 'decode'] * 1e3:.2f} ms at batch {b} ({t[b, 'decode'] / t[1, 'decode']:.2f}x)")
    n = args.max_tokens
    one = t[1, "prefill"] + (n - 1) * t[1, "decode"]
    print(f"  -> the most batching can give for {n}-token answers, HTTP and all else free: "
          f"{b * one / (t[b, 'prefill'] + (n - 1) * t[b, 'decode']):.2f}x")


def start_server(chat, args):
    """The API's app on a free local port, in a thread -> (base URL, uvicorn server, the batch sizes it ran)."""
    import uvicorn
    import serve_openai_api as api
    from trainer.distributed import free_port
    batcher = api.Batcher(chat, 0, max(args.clients, 16), max_batch=args.max_batch)
    sizes = []
    generate = batcher.generate
    batcher.generate = lambda batch: sizes.append(len(batch)) or generate(batch)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(api.create_app(batcher, api.parse_args([]), "tiny"), host="127.0.0.1",
                                           port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, sizes


def compare(base, sizes, args):
    """Both ways of sending, alternated for --rounds rounds; prints each round and the medians."""
    import httpx
    bodies = [{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(COLOURS[i % 4])}}] * args.image + [
        {"type": "text", "text": f"Describe picture {i}."}]}], "temperature": 0,
        "max_tokens": max(1, args.max_tokens * (1 + i % 4) // 4) if args.mixed else args.max_tokens}
        for i in range(args.requests)]
    local = threading.local()

    def ask(body):
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=base, trust_env=False, timeout=600)
        r = local.http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    ask(bodies[0])  # warm-up
    ways = (("one at a time", 1), (f"{args.clients} concurrent", args.clients))
    took = {name: [] for name, _ in ways}
    for rnd in range(args.rounds):
        for name, workers in ways:
            sizes.clear()
            t = time.perf_counter()
            with ThreadPoolExecutor(workers) as pool:
                tokens = sum(pool.map(ask, bodies))
            took[name].append(time.perf_counter() - t)
            print(f"round {rnd + 1} {name:>14}: {len(bodies) / took[name][-1]:6.2f} requests/s, "
                  f"{tokens / took[name][-1]:7.1f} answer tokens/s ({len(bodies)} requests, {tokens} tokens, "
                  f"{took[name][-1]:.2f} s; batches of {sizes})")
    one, many = (took[name] for name, _ in ways)
    print(f"medians of {args.rounds} rounds: one at a time {len(bodies) / statistics.median(one):.2f} requests/s, "
          f"concurrent {len(bodies) / statistics.median(many):.2f} requests/s; "
          f"speed-up {statistics.median(a / b for a, b in zip(one, many)):.2f}x (median of the rounds' ratios)")


def main():
    args = parse_args()
    chat = build_chat(args)
    if args.steps:
        print_step_bound(chat, args)
    base, server, sizes = start_server(chat, args)
    compare(base, sizes, args)
    server.should_exit = True


if __name__ == "__main__":
    main()
