"""Throughput of scripts/serve_openai_api.py under concurrent clients against one client at a time,
with a randomly initialised model (a tiny CLIP tower built here; no downloads).

    python dev/api_throughput.py                       # dim 64 x 2 layers, 8 clients, CPU
    python dev/api_throughput.py --dim 512 --n_layers 8 --device cuda

Each request is greedy, has one image (--image 0: none) and asks for --max_tokens tokens. Prints requests/s and answer
tokens/s for both ways of sending, and the speed-up.
"""
import argparse
import base64
import inspect
import io
import os
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--n_layers", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=16, help="sent each way")
    ap.add_argument("--max_tokens", type=int, default=32)
    ap.add_argument("--max_batch", type=int, default=8)
    ap.add_argument("--image", type=int, default=1, help="0: text-only requests")
    args = ap.parse_args()

    import httpx
    import torch
    import uvicorn
    import serve_openai_api as api
    from make_demo_vision_tower import build_vision_tower
    from model.images import load_processor
    from model.inference import VLMChat
    from model.model_vlm import MiniMindVLM, VLMConfig
    from transformers import AutoTokenizer

    tower = tempfile.mkdtemp(prefix="tower")
    build_vision_tower(tower, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    torch.manual_seed(0)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower, dim=args.dim, n_layers=args.n_layers)).eval()
    chat = VLMChat(model.to(args.device), AutoTokenizer.from_pretrained(os.path.join(ROOT, "model")),
                   load_processor(tower))
    server_args = api.parse_args([])
    kw = {"max_batch": args.max_batch} if "max_batch" in inspect.signature(api.Engine).parameters else {}
    engine = api.Engine(chat, 0, max(args.clients, 16), **kw)
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = uvicorn.Server(uvicorn.Config(api.create_app(engine, server_args, "tiny"), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    colours = ["red", "green", "blue", "yellow"]
    bodies = [{"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_url(colours[i % 4])}}] * args.image + [
        {"type": "text", "text": f"Describe picture {i}."}]}], "max_tokens": args.max_tokens, "temperature": 0}
        for i in range(args.requests)]
    local = threading.local()

    def ask(body):
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=base, trust_env=False, timeout=600)
        r = local.http.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    ask(bodies[0])  # warm-up
    results = {}
    for name, workers in (("one at a time", 1), (f"{args.clients} concurrent", args.clients)):
        t = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            tokens = sum(pool.map(ask, bodies))
        took = time.perf_counter() - t
        results[name] = took
        print(f"{name:>14}: {len(bodies) / took:6.2f} requests/s, {tokens / took:7.1f} answer tokens/s "
              f"({len(bodies)} requests, {tokens} tokens, {took:.2f} s)")
    one, many = results.values()
    print(f"speed-up: {one / many:.2f}x; generations run: {engine.stats.get('batches', 'not counted')}")
    server.should_exit = True


if __name__ == "__main__":
    main()
