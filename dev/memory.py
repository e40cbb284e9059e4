"""How much memory does it need? Peak memory of inference and of training, full and LoRA, with and
without gradient checkpointing, for two sizes of each model generation: the memory table of
docs/performance.md.

    python dev/memory.py                      # CPU: peak resident memory (RSS) of each process
    python dev/memory.py --device cuda:0      # GPU: peak memory allocated by torch on the device

Method. Every figure is one fresh process running the real scripts' code on random weights of the
released shapes, with a vision tower of the release's geometry (CLIP ViT-B/16 for MiniMind2-V,
SigLIP2 base p32/256 for minimind-3v), so nothing is downloaded:
- inference: load the model as eval_vlm.py does (float32 on CPU, bfloat16 on CUDA), answer one
  question about one 224-px image with 32 new tokens;
- training: train_sft_vlm.py on synthetic SFT data (one image and two Q&A turns per sample, about
  280 tokens with CLIP), batch 8, bf16 autocast, AdamW, --steps optimizer steps; "full" trains the
  whole LLM (--freeze_llm 0), "LoRA" adapters of rank 8 on every attention and FFN projection.
On CPU the peak RSS includes Python, torch and the tower (about 0.5-0.9 GB before any model); a
GPU's figure is torch's own peak allocation, without the CUDA context (~0.3-0.5 GB more).
Samples/s come from the same runs (steady state, first step excluded): figures for comparing the
options with each other, not a benchmark.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo"), os.path.join(ROOT, "dev")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from bench import make_data, train_scenario  # noqa: E402

# (label, generation, dim, n_layers, use_moe): the released sizes of each generation
MODELS = [("MiniMind2-V 512/8", "minimind2", 512, 8, 0), ("MiniMind2-V 768/16", "minimind2", 768, 16, 0),
          ("minimind-3v 768/8", "minimind3", 768, 8, 0), ("minimind-3v 768/8 MoE", "minimind3", 768, 8, 1)]
TRAININGS = [("full", ["--freeze_llm", 0]), ("LoRA r8", ["--lora_rank", 8])]


def build_tower(path, generation):
    """A random tower of the release's geometry: CLIP ViT-B/16 (196 tokens) or SigLIP2 base p32/256 (64)."""
    if generation == "minimind2":
        from make_demo_vision_tower import build_vision_tower
        build_vision_tower(path, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, verbose=False)
        return path
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(image_size=256, patch_size=32, hidden_size=768, num_hidden_layers=12,
                                         num_attention_heads=12, intermediate_size=3072)).save_pretrained(path)
    SiglipImageProcessor(size={"height": 256, "width": 256}).save_pretrained(path)
    return path


def start_weights(path, generation, dim, n_layers, use_moe, tower):
    """Random VLM weights of the generation's shapes and key format (what --from_weight reads)."""
    from model.checkpoint import llm_state_dict
    from model.files import atomic_save
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    config = VLMConfig(generation=generation, dim=dim, n_layers=n_layers, use_moe=bool(use_moe),
                       projector="linear" if generation == "minimind2" else "mlp", vision_model_path=tower)
    atomic_save(llm_state_dict(MiniMindVLM(config)), path)
    return path


INFERENCE = """
import sys, time
sys.path.insert(0, {root!r})
from PIL import Image
from model.inference import InferenceConfig, VLMChat, load_model
sys.path.insert(0, {dev!r})
from bench import peak_memory_mb
chat = VLMChat(*load_model(InferenceConfig(weight={weight!r}, vision_model_path={tower!r}, device={device!r})))
image = Image.new("RGB", (224, 224), "red")
t = time.perf_counter()
answer = chat.answer([{{"role": "user", "content": "<image>\\nWhat is in the picture?"}}], [image], max_new_tokens=32)
print("RESULT", peak_memory_mb({device!r}), time.perf_counter() - t)
"""


def inference_peak(weight, tower, device):
    code = INFERENCE.format(root=ROOT, dev=os.path.join(ROOT, "dev"), weight=weight, tower=tower, device=device)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"inference failed:\n{proc.stderr[-3000:]}")
    peak, seconds = map(float, proc.stdout.rsplit("RESULT", 1)[1].split())
    return {"peak_mb": peak, "answer_s": seconds}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps per training run")
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated model labels' prefixes, e.g. 'MiniMind2-V 512'")
    ap.add_argument("--out", default="out/memory.json")
    args = ap.parse_args()
    bench_args = argparse.Namespace(dim=0, n_layers=0, batch_size=args.batch_size, num_workers=0, device=args.device,
                                    dtype="bfloat16", max_seq_len=640)
    results = {}
    with tempfile.TemporaryDirectory() as work:
        data = os.path.join(work, "data")
        make_data(data, args.steps * args.batch_size, sft=True)
        towers = {}
        for label, generation, dim, n_layers, use_moe in MODELS:
            if args.only and not any(label.startswith(p) for p in args.only.split(",")):
                continue
            if generation not in towers:
                towers[generation] = build_tower(os.path.join(work, f"tower_{generation}"), generation)
            tower = towers[generation]
            weight = start_weights(os.path.join(work, f"start_{dim}.pth"), generation, dim, n_layers, use_moe, tower)
            r = results[label] = {"inference": inference_peak(weight, tower, args.device)}
            print(f"{label:<24} inference               peak {r['inference']['peak_mb']:7.0f} MB", flush=True)
            bench_args.dim, bench_args.n_layers = dim, n_layers
            for name, flags in TRAININGS:
                for gc in (0, 1):
                    extra = flags + ["--from_weight", weight, "--gradient_checkpointing", gc,
                                     "--stop_after_steps", args.steps, "--use_moe", use_moe]
                    t = train_scenario(bench_args, tower, data, "sft", False, os.path.join(work, "out"), extra=extra)
                    key = f"{name}{', checkpointing' if gc else ''}"
                    r[key] = t
                    print(f"{label:<24} {key:<23} peak {t['peak_mb']:7.0f} MB  trainable {t['trainable'] / 1e6:6.2f}M"
                          f"  {t['samples_per_s']:5.2f} samples/s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": args.device, "batch_size": args.batch_size, "steps": args.steps, "results": results},
                  f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
