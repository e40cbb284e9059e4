"""Where a training step's time goes: torch.profiler's top operations by self time.

    python dev/profile_step.py                    # warm-cache pretrain step, dim 512 / 8, batch 8
    python dev/profile_step.py --stage sft --cache 0

Synthetic data and a random ViT-B/16-sized tower, as dev/bench.py makes them; the run is built
and stepped through the trainer's own functions (trainer.build.build_run, trainer.loop.train_step), so what
is profiled is the real step. A few steps warm up, then `--steps` are timed without the profiler
(the figure to compare) and `--steps` more are profiled.
"""
import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo"), os.path.join(ROOT, "dev")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["pretrain", "sft"], default="pretrain")
    p.add_argument("--cache", type=int, choices=[0, 1], default=1, help="1: features from a warm feature cache")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rows", type=int, default=12, help="operations to list")
    a = p.parse_args()

    from torch.profiler import ProfilerActivity, profile

    import trainer.build
    import trainer.config
    import trainer.distributed
    import trainer.loop
    import trainer.schedule
    from bench import make_data
    from make_demo_vision_tower import build_vision_tower
    from model.precision import dtype_name, resolve_dtype
    work = tempfile.mkdtemp(prefix="minimind_profile_")
    tower, data = os.path.join(work, "tower"), os.path.join(work, "data")
    build_vision_tower(tower, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, verbose=False)
    n = a.batch_size * (3 + 2 * a.steps)
    jsonl = make_data(data, n, sft=a.stage == "sft")
    flags = ["--data_path", jsonl, "--images_path", os.path.join(data, "images"), "--vision_model_path", tower]
    if a.cache:  # encoded once beforehand, so the profiled steps read features from disk
        flags += ["--cache_features", os.path.join(work, "cache")]
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "cache_features.py"), "--data_path", jsonl,
                        "--images_path", os.path.join(data, "images"), "--cache_dir", os.path.join(work, "cache"),
                        "--vision_model_path", tower, "--dtype", a.dtype], check=True, capture_output=True)
    parser = trainer.config.build_parser("profile", epochs=1, batch_size=a.batch_size, learning_rate=1e-4,
                                         max_seq_len=640, from_weight="none", save_weight=a.stage,
                                         freeze_llm=1 if a.stage == "pretrain" else 0)
    cfg = trainer.config.TrainConfig(**vars(parser.parse_args(flags + ["--out_dir", os.path.join(work, "out"),
                                                                  "--num_workers", "0", "--dtype", a.dtype])))
    cfg = dataclasses.replace(cfg, dtype=dtype_name(resolve_dtype(cfg.dtype, "cpu")[0]),
                              tokenizer_path="model")
    run = trainer.build.build_run(cfg, trainer.distributed.Cluster())
    run.model.train()
    run.sampler.set_epoch(0, 0)
    # loaded up front
    steps = [list(group) for group in trainer.schedule.optimizer_steps(run.loader, len(run.sampler), 1)]
    for micro in steps[:3]:
        trainer.loop.train_step(run, 0, micro, 0)
    start = time.perf_counter()
    for micro in steps[3:3 + a.steps]:
        trainer.loop.train_step(run, 0, micro, 0)
    print(f"{a.stage} step, {'warm cache' if a.cache else 'no cache'}, {cfg.dtype}, batch {a.batch_size}: "
          f"{(time.perf_counter() - start) / a.steps:.3f} s a step (unprofiled, {a.steps} steps)")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for micro in steps[3 + a.steps:3 + 2 * a.steps]:
            trainer.loop.train_step(run, 0, micro, 0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
