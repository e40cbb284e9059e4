"""Speed report: training and inference throughput, MFU and peak memory on the current device.

Everything is synthetic (random weights, generated images and captions), so it runs offline
anywhere. All figures come from one invocation, so their ratios are trustworthy even where the
absolute numbers vary between machines. Each training scenario runs the real trainer in a
child process, so each one's peak memory is its own.

    python dev/bench.py                       # CPU, --dtype auto, dim 512 / 8 layers, ViT-B/16-sized tower
    python dev/bench.py --device cuda:0       # the same on a GPU
    python dev/bench.py --quick               # a tiny smoke run
    python dev/bench.py --reference DIR       # against the original implementation, side by side (reference.py)

Scenarios:
  startup                       opening the training dataset on a 1M-row parquet file, in a fresh process:
                                first (making the Arrow copy) and later opens: seconds and peak RSS
  loader, N workers             the data pipeline alone on parquet rows of 256x256 JPEGs: read, decode,
                                preprocess, tokenize, collate (what a training step must never wait for)
  pretrain / sft, cache off     the vision tower encodes every image (first epoch of a plain run)
  pretrain, cache cold          first epoch with --cache_features: encode once and store
  pretrain / sft, cache warm    a later epoch or run: features come from the disk cache
  pretrain, cache warm, compiled    the same under --use_compile 1 (compiling is in the first steps)
  LLM step, dynamic / padded    forward+backward+AdamW on token batches of the typical length,
                                then of --max_seq_len (what padding every sample to the maximum costs),
                                then the typical length under torch.compile
  decode, batch 1 / 8           prefill latency (time to first token) and decode tokens/s, in the
                                inference dtype and, on CPU, with int8 weights (--quantize int8), and
                                with the decode steps compiled (--compile_decode 1) unless --compile 0
"""
import argparse
import glob
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from cli import switch  # noqa: E402


def peak_memory_mb(device):
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KB


def matmul_peak_tflops(device, dtype, n=2048, seconds=3.0):
    """Fastest of the square matmuls run in a `seconds` window: on a shared machine the fastest is
    the least disturbed. A window, not a count, because a short burst can fall entirely into a
    slow phase (30 back-to-back runs once measured 0.95 TFLOPS where 3 s later gave 2.35)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):  # warm-up: kernel selection, AMX tile set-up, clocks
        a @ b
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e12


def make_data(root, n_images, sft):
    """Synthetic photos-ish images (noise + blocks) with short captions or Q&A, released format."""
    from PIL import Image
    import numpy as np
    rng = random.Random(0)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    words = "a red blue green small large circle square cat dog tree on the left right top of image".split()
    lines = []
    for i in range(n_images):
        arr = np.random.default_rng(i).integers(0, 255, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(root, "images", f"{i}.jpg"), quality=90)
        text = " ".join(rng.choice(words) for _ in range(rng.randint(8, 20)))
        conv = [{"role": "user", "content": "<image>\nDescribe the image." if not sft else "<image>\nWhat is it?"},
                {"role": "assistant", "content": text}]
        if sft:
            conv += [{"role": "user", "content": "And the colour?"}, {"role": "assistant", "content": rng.choice(words)}]
        lines.append(json.dumps({"conversations": conv, "image": f"{i}.jpg"}))
    path = os.path.join(root, "sft.jsonl" if sft else "pretrain.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def make_parquet(root, n_rows):
    """n_rows of the release's shape: a 256x256 JPEG photo-ish image and a short caption each."""
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    images, convs = [], []
    for i in range(n_rows):
        arr = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)  # smooth blocks JPEG-compress like a photo
        buf = io.BytesIO()
        Image.fromarray(arr).resize((256, 256), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        convs.append(json.dumps([{"role": "user", "content": "<image>\nDescribe the image."},
                                 {"role": "assistant", "content": f"A picture, number {i}, of blocks."}]))
    os.makedirs(root, exist_ok=True)
    path = os.path.join(root, "loader.parquet")
    pq.write_table(pa.table({"conversations": convs, "image_bytes": pa.array(images, pa.binary())}), path)
    return path


def make_big_parquet(path, n_rows, distinct=256):
    """n_rows like the release's (a caption + a 256x256 JPEG each), written in row groups of 64K rows
    (dictionary encoding off, so repeated images take their full size, as distinct photos would)."""
    import io
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(distinct):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).resize((256, 256)).save(buf, "JPEG")
        jpegs.append(buf.getvalue())
    schema = pa.schema([("conversations", pa.string()), ("image_bytes", pa.binary())])
    with pq.ParquetWriter(path, schema, use_dictionary=False) as writer:
        for start in range(0, n_rows, 65536):
            rows = range(start, min(start + 65536, n_rows))
            convs = [json.dumps([{"role": "user", "content": "<image>\nDescribe the image."},
                                 {"role": "assistant", "content": f"A picture of blocks, number {i}."}]) for i in rows]
            writer.write_table(pa.table({"conversations": convs, "image_bytes": [jpegs[i % distinct] for i in rows]},
                                        schema=schema))
    return os.path.getsize(path)


def startup_scenario(parquet, tower):
    """Seconds and peak RSS of opening the training dataset on a big parquet file, in a fresh process:
    the first time (which makes the Arrow copy) and again (which memory-maps it)."""
    code = (f"import sys, time, resource; sys.path.insert(0, {ROOT!r}); t = time.time()\n"
            "from transformers import AutoTokenizer\nfrom model.images import load_processor\n"
            "from dataset.vlm_dataset import VLMDataset\nfrom model.chat import resolve_image_token_id\n"
            f"tok = AutoTokenizer.from_pretrained({os.path.join(ROOT, 'model')!r}); t1 = time.time()\n"
            f"ds = VLMDataset({parquet!r}, None, tok, load_processor({tower!r}), "
            "resolve_image_token_id(tok))\n"
            "ds[len(ds) - 1]; t2 = time.time()\n"
            "st = {l.split(':')[0]: int(l.split()[1]) // 1024 for l in open('/proc/self/status') if l.startswith('Rss')}\n"
            "print('RESULT', len(ds), t2 - t1, t2 - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
            "st.get('RssAnon', 0), st.get('RssFile', 0))")
    out = {}
    for label in ("first open (makes the Arrow copy)", "later opens"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        n, dataset_s, total_s, rss, anon, file = proc.stdout.rsplit("RESULT", 1)[1].split()
        # RssFile: pages of the memory-mapped Arrow file (shared, clean: the kernel can drop them).
        out[label] = {"rows": int(n), "dataset_s": float(dataset_s), "process_s": float(total_s),
                      "peak_rss_mb": float(rss), "rss_anon_mb": int(anon), "rss_file_mb": int(file)}
    return out


def loader_scenario(a, tower, parquet, workers):
    """The data pipeline alone, as training runs it: read row, decode JPEG, preprocess, tokenize,
    collate. -> samples/s over every row of the file (workers start up outside the timing)."""
    import functools
    from torch.utils.data import DataLoader
    from transformers import AutoTokenizer
    from model.images import load_processor
    from dataset.vlm_dataset import VLMDataset, collate_batch
    from model.chat import resolve_image_token_id
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))
    dataset = VLMDataset(parquet, None, tokenizer, load_processor(tower),
                         resolve_image_token_id(tokenizer))
    loader = DataLoader(dataset, batch_size=a.batch_size, shuffle=True, num_workers=workers,
                        collate_fn=functools.partial(collate_batch, pad_id=tokenizer.pad_token_id or 0),
                        persistent_workers=workers > 0)
    for epoch in range(2):  # the first epoch warms up (worker start-up, page cache); the second is timed
        n, t = 0, time.perf_counter()
        for batch in loader:
            n += batch["input_ids"].shape[0]
    return {"samples_per_s": n / (time.perf_counter() - t)}


def train_scenario(a, tower, data_root, stage, cache, out_dir, compiled=False, extra=()):
    """Run the real trainer for one epoch in a child process -> samples/s, tokens/s, peak MB, and
    its trainable parameters. extra: more flags, after (so overriding) these."""
    sft = stage == "sft"
    data = os.path.join(data_root, f"{stage}.jsonl")
    args = ["--data_path", data, "--images_path", os.path.join(data_root, "images"), "--out_dir", out_dir,
            "--vision_model_path", tower, "--dim", a.dim, "--n_layers", a.n_layers, "--epochs", 1,
            "--batch_size", a.batch_size, "--log_interval", 1, "--save_interval", 10**9,
            "--num_workers", a.num_workers, "--device", a.device, "--dtype", a.dtype,
            "--from_weight", "none",
            "--freeze_llm", 0 if sft else 1, "--max_seq_len", a.max_seq_len, "--learning_rate", 1e-4]
    if cache:
        args += ["--cache_features", os.path.join(data_root, "cache")]
    if compiled:
        args += ["--use_compile", 1]
    args += list(extra)
    script = os.path.join(ROOT, "train_sft_vlm.py" if sft else "train_pretrain_vlm.py")
    code = (f"import sys, runpy, json; sys.argv = {[script] + [str(x) for x in args]!r}; "
            f"sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.join(ROOT, 'dev')!r})\n"
            "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
            "finally:\n    from bench import peak_memory_mb\n"
            f"    print('PEAK_MB', peak_memory_mb({a.device!r}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{stage} run failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    name = "sft_vlm" if sft else "pretrain_vlm"
    log_path = glob.glob(os.path.join(out_dir, f"{name}_{a.dim}*_log.jsonl"))[0]  # _moe_log.jsonl with --use_moe 1
    with open(log_path) as f:
        log = [json.loads(line) for line in f]
    os.remove(log_path)
    # Steady state: from the first logged step to the last (start-up and the first step excluded).
    dt = log[-1]["time"] - log[0]["time"]
    steps = len(log) - 1
    tok_rate = sum(r["tokens_per_s"] for r in log[1:]) / max(steps, 1)
    peak = float(proc.stdout.rsplit("PEAK_MB", 1)[1].split()[0])  # the trainer's main process
    trainable = float(proc.stdout.split("trainable ", 1)[1].split("M")[0]) * 1e6  # as the trainer prints it
    return {"samples_per_s": steps * a.batch_size / dt, "tokens_per_s": tok_rate, "peak_mb": peak,
            "trainable": trainable, "stderr": proc.stderr}  # warnings, and TORCH_LOGS output if it was set


def llm_step_scenario(a, T, compiled=False):
    """Forward+backward+AdamW of the LLM on [batch, T] tokens, all positions supervised."""
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM
    torch.manual_seed(0)
    model = MiniMindForCausalLM(MiniMindConfig(dim=a.dim, n_layers=a.n_layers)).to(a.device).train()
    if compiled:
        model.compile_for_training()  # as the trainer's --use_compile 1
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    ids = torch.randint(0, 6400, (a.llm_batch, T), device=a.device)
    dtype = a.compute_dtype

    def step():
        with torch.autocast(a.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3 if compiled else 2):  # compiling happens in the first steps
        step()
    n, t = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t < a.seconds:
        step()
        n += 1
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / n
    d, L = a.dim, a.n_layers
    # The embedding lookup is no matmul, but its tied tensor is the head's, so each parameter (tied
    # counted once) is one matmul weight.
    n_matmul = sum(p.numel() for p in model.parameters())
    # 6 FLOPs per matmul weight per token (fwd + 2x bwd), plus causal attention: 6 * L * T * d per token.
    flops = a.llm_batch * T * (6 * n_matmul + 6 * L * T * d)
    return {"samples_per_s": a.llm_batch / dt, "tokens_per_s": a.llm_batch * T / dt,
            "tflops": flops / dt / 1e12}


def decode_scenario(a, tower, batch, int8=False, compiled=False):
    """Prefill (image + prompt) latency to the first token, then decode speed, with the KV cache
    (compiled: the decode steps as one compiled graph, --compile_decode 1)."""
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    from model.precision import resolve_dtype
    from model.quantize import quantize_int8
    dtype = torch.float32 if int8 else resolve_dtype(a.decode_dtype, a.device)[0]  # as eval_vlm.py would use
    model = MiniMindVLM(VLMConfig(dim=a.dim, n_layers=a.n_layers, vision_model_path=tower)).to(a.device, dtype).eval()
    if int8:
        model = quantize_int8(model)  # eval_vlm.py --quantize int8
    ids = torch.randint(10, 6000, (batch, 20), device=a.device)
    ids = torch.cat([ids[:, :4], torch.full((batch, 196), 3, device=a.device), ids[:, 4:]], 1)  # image + prompt
    pixels = torch.randn(batch, 3, 224, 224, device=a.device)
    n_new = a.decode_tokens
    from model.compiled_decode import CompiledDecoder
    decoder = CompiledDecoder(model) if compiled else None
    for _ in range(2):  # warm-up; compiled, the timed run's length, so that its graph is compiled here
        list(model.generate_stream(ids, pixel_values=pixels, max_new_tokens=n_new if compiled else 4, eos_token_id=-1,
                                   decoder=decoder))
    t0 = time.perf_counter()
    times = []
    for _ in model.generate_stream(ids, pixel_values=pixels, max_new_tokens=n_new, eos_token_id=-1,
                                   temperature=0.0, decoder=decoder):
        times.append(time.perf_counter())
    ttft = times[0] - t0
    decode = (len(times) - 1) * batch / (times[-1] - times[0])
    return {"ttft_s": ttft, "decode_tokens_per_s": decode, "decode_tokens_per_s_per_row": decode / batch}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="the training scenarios' --dtype; auto resolves as the trainer does (model/precision.py)")
    a("--dim", type=int, default=512)
    a("--n_layers", type=int, default=8)
    a("--batch_size", type=int, default=8, help="training scenarios' batch")
    a("--llm_batch", type=int, default=16, help="LLM-step scenarios' batch")
    a("--n_images", type=int, default=256, help="synthetic images per training epoch")
    a("--num_workers", type=int, default=2)
    a("--max_seq_len", type=int, default=640, help="the padded length of the 'padded' scenario")
    a("--typical_len", type=int, default=256, help="the dynamic-padding length of a typical batch")
    a("--tower", default="base", choices=["base", "tiny"], help="base: ViT-B/16-sized (768 wide, 12 layers)")
    switch(a, "--compile", 1,
           help="also time warm-cache pretrain and the LLM step under torch.compile (--use_compile 1), "
                "and decoding with --compile_decode 1")
    a("--decode_tokens", type=int, default=64)
    a("--decode_dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="inference dtype (auto: as eval_vlm.py resolves it)")
    a("--seconds", type=float, default=10.0, help="minimum timing window of the LLM-step scenarios")
    switch(a, "--quick", 0, help="tiny sizes: checks the script, not the machine")
    a("--only", default="", help="comma-separated subset: loader,startup,train,llm,decode")
    a("--loader_rows", type=int, default=512, help="parquet rows of 256x256 JPEGs for the loader scenario")
    a("--startup_rows", type=int, default=1_000_000, help="rows of the big parquet file the startup scenario opens")
    a("--out", default="out/bench.json")
    a("--reference", metavar="DIR", help="instead: the original implementation in DIR against ours, side by side "
                                         "(dev/reference.py says what DIR holds)")
    a("--reference_python", metavar="PATH", help="the Python that runs the original (default: DIR/.venv/bin/python)")
    a("--rounds", type=int, default=3, help="--reference: rounds of every scenario (medians are reported)")
    a("--sft_images", type=int, default=64, help="--reference: SFT samples (the original pads each to 1536 tokens)")
    args = p.parse_args()
    from model.precision import resolve_dtype
    args.compute_dtype = resolve_dtype(args.dtype, args.device)[0]  # what the steps compute in, and MFU's peak
    if args.quick:
        args.dim, args.n_layers, args.n_images, args.tower, args.seconds, args.compile = 64, 2, 16, "tiny", 0.5, 0
        args.llm_batch, args.max_seq_len, args.typical_len, args.decode_tokens = 2, 128, 64, 8
        args.loader_rows, args.startup_rows = 32, 5000
    return args


def run_loader(args, tower, work, results):
    parquet = make_parquet(os.path.join(work, "loader"), args.loader_rows)
    for workers in (0, 1, 2):
        r = results["loader"][f"{workers} workers"] = loader_scenario(args, tower, parquet, workers)
        print(f"  loader, parquet, {workers} workers {r['samples_per_s']:9.1f} samples/s", flush=True)


def run_startup(args, tower, work, results):
    big = os.path.join(work, "big", "big.parquet")
    os.makedirs(os.path.dirname(big))
    t = time.time()
    size = make_big_parquet(big, args.startup_rows)
    print(f"  startup: wrote {args.startup_rows} rows, {size / 2**30:.2f} GB of parquet in {time.time() - t:.0f} s",
          flush=True)
    results["startup"] = startup_scenario(big, tower)
    for label, r in results["startup"].items():
        print(f"  startup, {label:<34} dataset ready in {r['dataset_s']:6.1f} s (process {r['process_s']:.1f} s), "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (at the end: {r['rss_anon_mb']} MB private, "
              f"{r['rss_file_mb']} MB mapped files)", flush=True)
    shutil.rmtree(os.path.dirname(big))


def run_train(args, tower, work, results):
    data_root = os.path.join(work, "data")
    make_data(data_root, args.n_images, sft=False)
    make_data(data_root, args.n_images, sft=True)  # the same images, so SFT's warm cache is warm
    # (stage, cache, compiled, label)
    runs = [("pretrain", False, False, "pretrain, cache off"),
            ("pretrain", True, False, "pretrain, cache cold"),
            ("pretrain", True, False, "pretrain, cache warm"),
            ("sft", False, False, "sft, cache off"), ("sft", True, False, "sft, cache warm")]
    if args.compile:
        runs.append(("pretrain", True, True, "pretrain, cache warm, compiled"))
    for stage, cache, compiled, label in runs:
        r = train_scenario(args, tower, data_root, stage, cache, os.path.join(work, "out"), compiled)
        r.pop("stderr")
        results["train"][label] = r
        print(f"  {label:<32} {r['samples_per_s']:7.1f} samples/s {r['tokens_per_s']:8.0f} tok/s "
              f"peak {r['peak_mb']:6.0f} MB", flush=True)


def run_llm(args, peaks, results):
    runs = [("dynamic", args.typical_len, False), ("padded", args.max_seq_len, False)]
    if args.compile:
        runs.append(("dynamic, compiled", args.typical_len, True))
    for label, T, compiled in runs:
        r = results["llm_step"][f"{label} (T={T})"] = llm_step_scenario(args, T, compiled)
        print(f"  LLM step, {label} T={T:<5} {r['samples_per_s']:7.1f} samples/s {r['tokens_per_s']:8.0f} tok/s "
              f"{r['tflops']:.3f} TFLOPS", flush=True)
    # MFU against the best peak of the run: measured again right after the LLM steps, so a slow
    # phase of the machine during the first measurement cannot inflate it.
    peaks.append(matmul_peak_tflops(args.device, args.compute_dtype, seconds=0.3 if args.quick else 3.0))
    for label, r in results["llm_step"].items():
        r["mfu"] = r["tflops"] / max(peaks)
        print(f"  MFU, LLM step {label:<28} {r['mfu']:.1%} of {max(peaks):.2f} TFLOPS", flush=True)


def run_decode(args, tower, results):
    from model.precision import dtype_name, resolve_dtype
    decode_dtype = dtype_name(resolve_dtype(args.decode_dtype, args.device)[0])
    int8 = [False, True] if args.device == "cpu" else [False]  # --quantize int8 is CPU-only
    runs = [(b, q, False) for q in int8 for b in (1, 8)] + ([(b, False, True) for b in (1, 8)] if args.compile else [])
    for batch, quantized, compiled in runs:
        label = f"batch {batch}" + (", int8" if quantized else "") + (", compiled" if compiled else "")
        r = results["decode"][label] = decode_scenario(args, tower, batch, quantized, compiled)
        print(f"  decode, {label:<17} ({'int8 weights' if quantized else decode_dtype}) time to first token "
              f"{r['ttft_s']:.3f} s, {r['decode_tokens_per_s']:7.1f} tok/s "
              f"({r['decode_tokens_per_s_per_row']:.1f} per row)", flush=True)


def main():
    args = parse_args()
    if args.reference:
        import reference
        report = reference.main(args, make_data)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"wrote {args.out}")
        return
    only = set(args.only.split(",")) if args.only else {"loader", "startup", "train", "llm", "decode"}
    from make_demo_vision_tower import build_vision_tower
    work = tempfile.mkdtemp(prefix="minimind_bench_")
    tower = os.path.join(work, "tower")
    if args.tower == "base":
        build_vision_tower(tower, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, verbose=False)
    else:
        build_vision_tower(tower, hidden_size=32, num_layers=1, num_heads=2, verbose=False)
    peaks = [matmul_peak_tflops(args.device, args.compute_dtype, seconds=0.3 if args.quick else 3.0)]
    from model.precision import dtype_name
    compute_dtype = dtype_name(args.compute_dtype)
    results = {"device": args.device, "dtype": compute_dtype, "dim": args.dim, "n_layers": args.n_layers,
               "threads": torch.get_num_threads(), "loader": {}, "train": {}, "llm_step": {}, "decode": {}}
    print(f"{args.device} {compute_dtype} ({args.dtype}): matmul peak {peaks[0]:.2f} TFLOPS, {torch.get_num_threads()} threads", flush=True)
    if "loader" in only:
        run_loader(args, tower, work, results)
    if "startup" in only:
        run_startup(args, tower, work, results)
    if "train" in only:
        run_train(args, tower, work, results)
    if "llm" in only:
        run_llm(args, peaks, results)
    results["matmul_peak_tflops"], results["matmul_peak_tflops_measurements"] = max(peaks), peaks
    if "decode" in only:
        run_decode(args, tower, results)
    results["peak_rss_mb_bench_process"] = peak_memory_mb(args.device)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)  # synthetic images, feature cache, checkpoints
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
