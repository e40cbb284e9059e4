"""GPU check: is training and serving ready for this CUDA machine? Offline, generated data.

    python dev/gpu_check.py                  # cuda:0; on a machine without CUDA it says so and exits 0
    python dev/gpu_check.py --quick          # 32 images a run instead of 128

For dim 512 x 8 layers and 768 x 16 (the MiniMind2 sizes), with a ViT-B/16-sized random tower:
  - a short pretrain and SFT run of the real trainer (dev/bench.py's train_scenario, --use_compile 1,
    --dtype auto) under TORCH_LOGS=graph_breaks,recompiles: samples/s, MFU, peak memory, and every
    line the run wrote to stderr (graph breaks, recompiles, warnings);
  - one SFT optimizer step (2 micro-batches, eager) under torch.cuda.set_sync_debug_mode("warn"):
    every synchronizing operation it made, with the line that made it (one is expected: the step
    reads whether its update was applied);
  - decode tokens/s at batch 1 (dev/bench.py's decode_scenario), eager and with the decode steps
    compiled as CUDA graphs (--compile_decode 1), and the API server under 8
    concurrent clients against one at a time (dev/api_throughput.py).
MFU counts the LLM's matmuls only (no tower, no attention scores), against the matmul peak measured
here (dev/bench.py): a lower bound, comparable between runs on the same card.
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

os.environ.setdefault("TORCH_LOGS", "graph_breaks,recompiles")  # before torch is imported, here and in the runs
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "dev"), os.path.join(ROOT, "demo")]

import torch  # noqa: E402

SIZES = [(512, 8), (768, 16)]  # (dim, n_layers)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda:0")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--n_images", type=int, default=128, help="generated images (and samples) per run")
    p.add_argument("--quick", action="store_true", help="32 images a run")
    args = p.parse_args(argv)
    if args.quick:
        args.n_images = 32
    # What dev/bench.py's scenarios read from their arguments.
    args.dtype, args.decode_dtype, args.decode_tokens, args.max_seq_len, args.num_workers = "auto", "auto", 128, 640, 2
    return args


def llm_mfu(dim, n_layers, run, peak_tflops):
    """A training run's model FLOPs utilisation, LLM matmuls only: per token 2 FLOPs per weight
    forward, 2 backward to the activations (the trained projector is below every layer, so the
    backward passes all of them even with the LLM frozen), and 2 per trainable weight for its gradient."""
    from model.model_minimind import MiniMindConfig, MiniMindForCausalLM, count_llm_params
    with torch.device("meta"):  # shapes only
        n = count_llm_params(MiniMindForCausalLM(MiniMindConfig(dim=dim, n_layers=n_layers)))
    return run["tokens_per_s"] * (4 * n + 2 * run["trainable"]) / (peak_tflops * 1e12)


def print_lines(title, text):
    """Every non-empty line of a run's stderr, each once, with how often it came."""
    counts = {}
    for line in text.splitlines():
        if line.strip():
            counts[line] = counts.get(line, 0) + 1
    print(f"    {title}:" + ("" if counts else " none"))
    for line, n in counts.items():
        print(f"      {line}" + (f"  (x{n})" if n > 1 else ""))


def train_runs(a, tower, data_root, work, peak_tflops):
    """Pretrain and SFT at each size, compiled -> whether all ran."""
    from bench import train_scenario
    ok = True
    for a.dim, a.n_layers in SIZES:
        for stage in ("pretrain", "sft"):
            label = f"{stage}, dim {a.dim} x {a.n_layers}, compiled"
            try:
                r = train_scenario(a, tower, data_root, stage, False, os.path.join(work, "out"), compiled=True)
            except RuntimeError as e:  # the run's own output is in the message
                print(f"  {label}: FAILED\n{e}", flush=True)
                ok = False
                continue
            print(f"  {label}: {r['samples_per_s']:.1f} samples/s, {r['tokens_per_s']:.0f} tok/s, "
                  f"MFU {llm_mfu(a.dim, a.n_layers, r, peak_tflops):.1%}, peak {r['peak_mb']:.0f} MB", flush=True)
            print_lines("stderr (graph breaks, recompiles, warnings)", r["stderr"])
    return ok


def sync_warnings(a, tower, data_root, work):
    """One SFT optimizer step of 2 micro-batches, in this process, under set_sync_debug_mode("warn")
    -> "file:line: message" of every synchronizing operation it made."""
    import trainer.build
    import trainer.config
    import trainer.distributed
    import trainer.loop
    import trainer.schedule
    from model.precision import dtype_name, resolve_dtype, use_tf32
    parser = trainer.config.build_parser("gpu_check", epochs=1, batch_size=a.batch_size, learning_rate=1e-4,
                                         max_seq_len=a.max_seq_len, from_weight="none", save_weight="gpu_check",
                                         freeze_llm=0)
    cfg = trainer.config.TrainConfig(**vars(parser.parse_args([
        "--data_path", os.path.join(data_root, "sft.jsonl"), "--images_path", os.path.join(data_root, "images"),
        "--vision_model_path", tower, "--out_dir", os.path.join(work, "sync"), "--dim", str(a.dim),
        "--n_layers", str(a.n_layers), "--num_workers", str(a.num_workers), "--device", a.device,
        "--accumulation_steps", "2"])))
    dtype = resolve_dtype(cfg.dtype, a.device)[0]  # as trainer.loop.train resolves it
    use_tf32(a.device, dtype)
    cfg = dataclasses.replace(cfg, dtype=dtype_name(dtype), tokenizer_path=os.path.join(ROOT, "model"))
    run = trainer.build.build_run(cfg, trainer.distributed.Cluster(device=a.device))
    run.model.train()
    run.sampler.set_epoch(0, 0)
    steps = trainer.schedule.optimizer_steps(run.loader, len(run.sampler), cfg.accumulation_steps)
    trainer.loop.train_step(run, 0, next(steps), 0)  # first-step work: cuBLAS handles, AdamW's state
    micro_batches = list(next(steps))  # loaded first: the loader's copies are not the step's
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            trainer.loop.train_step(run, 0, micro_batches, 0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0]}" for w in caught]


def serving(a, tower):
    """Decode tokens/s at batch 1 and the API under 8 concurrent clients, at each size."""
    from bench import decode_scenario
    for a.dim, a.n_layers in SIZES:
        for compiled in (False, True):  # eager, then --compile_decode 1 (a CUDA graph per step)
            r = decode_scenario(a, tower, 1, compiled=compiled)
            print(f"  decode, dim {a.dim} x {a.n_layers}, batch 1{', compiled' if compiled else ''}: "
                  f"{r['decode_tokens_per_s']:.1f} tok/s, time to first token {r['ttft_s'] * 1e3:.0f} ms", flush=True)
        proc = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "api_throughput.py"), "--dim", str(a.dim),
                               "--n_layers", str(a.n_layers), "--device", a.device, "--clients", "8",
                               "--requests", "32", "--max_tokens", "64"], capture_output=True, text=True, cwd=ROOT)
        print(f"  API, dim {a.dim} x {a.n_layers}, 8 concurrent clients against one at a time:"
              + ("" if proc.returncode == 0 else f" FAILED (exit {proc.returncode})"))
        for line in proc.stdout.splitlines():
            print(f"    {line}")
        print_lines("stderr", proc.stderr)


def main(argv=None):
    a = parse_args(argv)
    if not torch.cuda.is_available():
        print("no GPU: torch.cuda.is_available() is False (a CPU-only torch, or no CUDA device); "
              "run this on a CUDA machine")
        return 0
    from bench import make_data, matmul_peak_tflops
    from make_demo_vision_tower import build_vision_tower
    from model.precision import resolve_dtype
    work = tempfile.mkdtemp(prefix="minimind_gpu_check_")
    tower, data_root = os.path.join(work, "tower"), os.path.join(work, "data")
    build_vision_tower(tower, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, verbose=False)
    make_data(data_root, a.n_images, sft=False)
    make_data(data_root, a.n_images, sft=True)
    dtype = resolve_dtype("auto", a.device)[0]
    peak = matmul_peak_tflops(a.device, dtype)
    print(f"{torch.cuda.get_device_name(a.device)}, torch {torch.__version__}, "
          f"{dtype}: matmul peak {peak:.1f} TFLOPS; TORCH_LOGS={os.environ['TORCH_LOGS']}", flush=True)
    ok = train_runs(a, tower, data_root, work, peak)
    for a.dim, a.n_layers in SIZES:
        synced = sync_warnings(a, tower, data_root, work)
        print(f"  synchronizing operations in one SFT step (dim {a.dim}, 2 micro-batches): {len(synced)}")
        for line in synced:
            print(f"    {line}")
    serving(a, tower)
    shutil.rmtree(work, ignore_errors=True)  # generated images, checkpoints
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
