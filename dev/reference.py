"""Side by side with the original implementation: whole processes, the same data, the same weights.

    python dev/bench.py --reference DIR [--rounds 3] [--n_images 128] [--sft_images 64]

DIR is a runnable copy of the original 2025 minimind-v, outside this repository: its
train_pretrain_vlm.py and train_sft_vlm.py, model/ with its tokenizer (model/minimind_tokenizer),
a CLIP tower at model/vision_model/clip-vit-base-patch16, a random out/lm_512.pth made with its own
code, and a Python that runs it (DIR/.venv/bin/python, or --reference_python). Nothing of it is
imported here: it runs as its own processes, and we load its files as a user would.

Both sides get the same jsonl + images (the released 2025 format), the same tokenizer ('@' as the
image placeholder), the same tower and the same starting weights: pretrain starts from DIR's
out/lm_512.pth, SFT from the pretrain_vlm_512.pth that the original's own pretrain writes. The
original runs with its defaults (fp32 on CPU, every sample padded to its max_seq_len: 640 for
pretrain, 1536 for SFT); ours with its defaults (--dtype auto, dynamic padding), so each side is
as a user finds it. Both save once, at the end. Rounds alternate which side goes first; the report
is each scenario's median wall time and the ratio of medians. The original's pretrain and SFT
write into DIR/out (its paths are fixed).

Decoding: batch 1, one image + a short question, greedy, `--decode_tokens` new tokens without
stopping at EOS, each in a fresh process from the SFT weights: the original's own generate();
ours as eval_vlm.py loads it (model.inference.load_model, --dtype auto); and our transformers
export as a user loads it (AutoModelForCausalLM.from_pretrained, its default dtype).
"""
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORIGINAL_FILES = ("train_pretrain_vlm.py", "train_sft_vlm.py", "model/minimind_tokenizer/tokenizer.json",
                  "model/vision_model/clip-vit-base-patch16/config.json", "out/lm_512.pth")

# The original's generate() (its stream=True generator), timed per token. Its max_new_tokens bounds
# the whole sequence, so it gets the prompt length on top; temperature 0 makes its sampling greedy;
# eos_token_id=-1 never matches, so every run makes the same number of tokens.
ORIGINAL_DECODE = r"""
import sys, time, torch
from PIL import Image
from transformers import AutoTokenizer
from model.model_vlm import MiniMindVLM
from model.VLMConfig import VLMConfig
weights, image, question, n_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
tok = AutoTokenizer.from_pretrained("./model/minimind_tokenizer")
config = VLMConfig(dim=512, n_layers=8)
model = MiniMindVLM(config)
model.load_state_dict(torch.load(weights, map_location="cpu"), strict=False)
model.eval()
text = tok.apply_chat_template([{"role": "user", "content": config.image_special_token + "\n" + question}],
                               tokenize=False, add_generation_prompt=True)
ids = torch.tensor(tok(text)["input_ids"])[None]
pixels = MiniMindVLM.image2tensor(Image.open(image).convert("RGB"), model.processor)[None]
def run(n):
    times, start = [], time.perf_counter()
    with torch.inference_mode():
        for _ in model.generate(ids, eos_token_id=-1, max_new_tokens=ids.shape[1] + n + 1, temperature=0.0,
                                top_p=None, stream=True, rp=1.0, use_cache=True, pad_token_id=0,
                                pixel_tensors=pixels):
            times.append(time.perf_counter())
    return start, times
run(4)
start, times = run(n_new)
print("RESULT", ids.shape[1], len(times), times[0] - start, (len(times) - 1) / (times[-1] - times[0]))
"""

# Ours, the same prompt through our chat encoder, timed per token the same way. mode "eval": as
# eval_vlm.py loads a .pth; mode "export": a transformers directory as a user loads it.
OURS_DECODE = r"""
import sys, time, torch
sys.path.insert(0, ROOT)
from PIL import Image
from model.images import open_image
mode, weights, image, question, n_new, tokenizer_path, tower = sys.argv[1:8]
n_new = int(n_new)
messages = [{"role": "user", "content": "<image>\n" + question}]
if mode == "eval":
    from model.inference import InferenceConfig, VLMChat, load_model
    model, tok, processor = load_model(InferenceConfig(weight=weights, tokenizer_path=tokenizer_path,
                                                       vision_model_path=tower, device="cpu"))
    chat = VLMChat(model, tok, processor)
    prompt_ids, is_image = chat.encoder.encode_prompt(messages)
    ids, mask = torch.tensor([prompt_ids]), torch.tensor([is_image])
    pixels = chat.pixels([open_image(image)])
else:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(weights, trust_remote_code=True)
    tok, processor = model._chat_tools(None, None)
    prompt_ids, is_image = model.encode_chat(messages, tok)
    ids, mask = torch.tensor([prompt_ids]), torch.tensor([is_image])
    pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
def run(n):
    times, start = [], time.perf_counter()
    for _ in model.generate_stream(ids, pixel_values=pixels, image_mask=mask, max_new_tokens=n, eos_token_id=-1):
        times.append(time.perf_counter())
    return start, times
run(4)
start, times = run(n_new)
print("RESULT", ids.shape[1], len(times), times[0] - start, (len(times) - 1) / (times[-1] - times[0]))
""".replace("ROOT", repr(ROOT))


def check_reference(ref, python):
    missing = [f for f in ORIGINAL_FILES if not os.path.exists(os.path.join(ref, f))]
    if missing:
        raise SystemExit(f"error: {ref} is not a runnable copy of the original: no {', '.join(missing)}")
    if not os.access(python, os.X_OK):
        raise SystemExit(f"error: no Python at {python} to run the original with (--reference_python PATH)")


def timed(cmd, cwd, log_path):
    """Run a whole process -> its wall time in seconds; its output goes to log_path."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([str(c) for c in cmd], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
    seconds = time.perf_counter() - start
    if proc.returncode:
        with open(log_path) as f:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{f.read()[-3000:]}")
    return seconds


def scenarios(a, ref, python, data, cache, out):
    """name -> (side, command, cwd). Both sides: one epoch, batch 8, 2 loader workers."""
    common = ["--epochs", 1, "--batch_size", 8, "--num_workers", 2, "--device", "cpu"]
    steps = lambda n: (n + 7) // 8  # noqa: E731  the original saves only every --save_interval steps
    original = lambda script, jsonl, n: [python, script, *common, "--data_path", jsonl,  # noqa: E731
                                         "--images_path", os.path.join(data, "images"), "--log_interval", 10**6,
                                         "--save_interval", steps(n)]
    tower = os.path.join(ref, "model/vision_model/clip-vit-base-patch16")
    ours_common = [*common, "--images_path", os.path.join(data, "images"), "--out_dir", out, "--log_interval", 10**6,
                   "--vision_model_path", tower, "--tokenizer_path", os.path.join(ref, "model/minimind_tokenizer")]
    pre, sft = os.path.join(data, "pretrain.jsonl"), os.path.join(data, "sft.jsonl")
    ours_pre = [sys.executable, os.path.join(ROOT, "train_pretrain_vlm.py"), *ours_common, "--data_path", pre,
                "--from_weight", os.path.join(ref, "out/lm_512.pth")]
    ours_sft = [sys.executable, os.path.join(ROOT, "train_sft_vlm.py"), *ours_common, "--data_path", sft,
                "--from_weight", os.path.join(ref, "out/pretrain_vlm_512.pth")]
    runs = {
        "pretrain": {"original": (original("train_pretrain_vlm.py", pre, a.n_images), ref),
                     "ours": (ours_pre, ROOT),
                     "ours, warm feature cache": (ours_pre + ["--cache_features", cache], ROOT)},
        "sft": {"original": (original("train_sft_vlm.py", sft, a.sft_images), ref),
                "ours": (ours_sft, ROOT),
                "ours, warm feature cache": (ours_sft + ["--cache_features", cache], ROOT)}}
    if a.compile:
        runs["pretrain"]["ours, --use_compile 1"] = (ours_pre + ["--use_compile", 1], ROOT)
    return runs


def make_data(write, root, n_pretrain, n_sft):
    """write: bench.make_data, the benchmark's own data (passed in: bench.py imports this file)."""
    write(root, max(n_pretrain, n_sft), sft=True)  # the images, and SFT conversations for all of them
    with open(os.path.join(root, "sft.jsonl")) as f:
        sft = f.readlines()
    with open(os.path.join(root, "sft.jsonl"), "w") as f:
        f.writelines(sft[:n_sft])
    write(os.path.join(root, "pretrain_only"), n_pretrain, sft=False)  # captions (its images are the same)
    os.replace(os.path.join(root, "pretrain_only", "pretrain.jsonl"), os.path.join(root, "pretrain.jsonl"))
    shutil.rmtree(os.path.join(root, "pretrain_only"))


def prebuild_cache(ref, data, cache):
    """The warm cache: every image encoded once by scripts/cache_features.py (not timed)."""
    tower = os.path.join(ref, "model/vision_model/clip-vit-base-patch16")
    for jsonl in ("pretrain.jsonl", "sft.jsonl"):
        subprocess.run([sys.executable, os.path.join(ROOT, "scripts/cache_features.py"), "--data_path",
                        os.path.join(data, jsonl), "--images_path", os.path.join(data, "images"), "--cache_dir", cache,
                        "--vision_model_path", tower], check=True, capture_output=True)


def decode_runs(a, ref, python, data, work):
    """Three decoders -> (command, cwd) each, from the original's SFT weights."""
    weights = os.path.join(ref, "out/sft_vlm_512.pth")
    image, question = os.path.join(data, "images", "0.jpg"), "What is in the picture?"
    tokenizer = os.path.join(ref, "model/minimind_tokenizer")
    tower = os.path.join(ref, "model/vision_model/clip-vit-base-patch16")
    export = os.path.join(work, "export")
    subprocess.run([sys.executable, os.path.join(ROOT, "scripts/convert_model.py"), "--weight", weights,
                    "--out_dir", export, "--tokenizer_path", tokenizer, "--vision_model_path", tower],
                   check=True, capture_output=True)
    n = str(a.decode_tokens)
    return {"original generate()": ([python, "-c", ORIGINAL_DECODE, weights, image, question, n], ref),
            "ours, eval_vlm.py load": ([sys.executable, "-c", OURS_DECODE, "eval", weights, image, question, n,
                                        tokenizer, tower], ROOT),
            "ours, transformers export": ([sys.executable, "-c", OURS_DECODE, "export", export, image, question, n,
                                           tokenizer, tower], ROOT)}


def run_decode(cmd, cwd):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, env=env)
    if proc.returncode or "RESULT" not in proc.stdout:
        raise RuntimeError(f"decoding failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    prompt, n, ttft, rate = proc.stdout.rsplit("RESULT", 1)[1].split()
    return {"prompt_tokens": int(prompt), "new_tokens": int(n), "ttft_s": float(ttft), "tokens_per_s": float(rate)}


def summarize(times):
    """{stage: {name: [seconds per round]}} -> {stage: {name: {median_s, runs_s, x_original}}}."""
    table = {}
    for stage, by_name in times.items():
        base = statistics.median(by_name["original"])
        table[stage] = {name: {"median_s": statistics.median(runs), "runs_s": runs,
                               "x_original": base / statistics.median(runs)} for name, runs in by_name.items()}
    return table


def main(a, write_data):
    ref = os.path.abspath(a.reference)
    python = a.reference_python or os.path.join(ref, ".venv/bin/python")
    check_reference(ref, python)
    work = tempfile.mkdtemp(prefix="minimind_reference_")
    data, cache, out = (os.path.join(work, d) for d in ("data", "cache", "out"))
    make_data(write_data, data, a.n_images, a.sft_images)
    prebuild_cache(ref, data, cache)
    runs = scenarios(a, ref, python, data, cache, out)
    times = {stage: {name: [] for name in by_name} for stage, by_name in runs.items()}
    for r in range(a.rounds):
        for stage, by_name in runs.items():  # pretrain first: the original's SFT starts from its output
            names = list(by_name) if r % 2 == 0 else list(by_name)[::-1]  # who goes first alternates
            started = os.path.exists(os.path.join(ref, "out/pretrain_vlm_512.pth"))
            if stage == "sft" and "original" in names and not started:
                raise RuntimeError("the original's pretrain wrote no out/pretrain_vlm_512.pth")
            for name in names:
                cmd, cwd = by_name[name]
                seconds = timed(cmd, cwd, os.path.join(work, "last.log"))
                times[stage][name].append(seconds)
                print(f"  round {r + 1}/{a.rounds} {stage:<8} {name:<28} {seconds:7.1f} s", flush=True)
    report = {"rounds": a.rounds, "pretrain_images": a.n_images, "sft_samples": a.sft_images,
              "train": summarize(times), "decode": {}}
    decoders = decode_runs(a, ref, python, data, work)
    decode_rates = {name: [] for name in decoders}
    for r in range(a.rounds):
        for name, (cmd, cwd) in decoders.items():
            result = run_decode(cmd, cwd)
            decode_rates[name].append(result)
            print(f"  round {r + 1}/{a.rounds} decode   {name:<28} {result['tokens_per_s']:7.1f} tok/s, "
                  f"first token {result['ttft_s']:.2f} s ({result['prompt_tokens']} prompt tokens)", flush=True)
    base = statistics.median(r["tokens_per_s"] for r in decode_rates["original generate()"])
    for name, results in decode_rates.items():
        rate = statistics.median(r["tokens_per_s"] for r in results)
        report["decode"][name] = {"tokens_per_s": rate, "ttft_s": statistics.median(r["ttft_s"] for r in results),
                                  "runs": results, "x_original": rate / base}
    print(format_report(report), flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return report


def format_report(report):
    lines = [f"\nmedians of {report['rounds']} rounds ({report['pretrain_images']} pretrain images, "
             f"{report['sft_samples']} SFT samples, batch 8, one epoch, whole processes):",
             "| stage | run | wall time | x original |", "|---|---|---|---|"]
    for stage, by_name in report["train"].items():
        for name, r in by_name.items():
            lines.append(f"| {stage} | {name} | {r['median_s']:.1f} s | {r['x_original']:.2f}x |")
    lines += ["", "| decoding, batch 1 | tokens/s | first token | x original |", "|---|---|---|---|"]
    for name, r in report["decode"].items():
        lines.append(f"| {name} | {r['tokens_per_s']:.1f} | {r['ttft_s']:.2f} s | {r['x_original']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit("run it as: python dev/bench.py --reference DIR")
