"""The offline demo: train a vision-language model from nothing on a laptop CPU, in minutes, and
show that it really sees. Run it as `bash demo/demo.sh` (which calls this file).

  1. generate the "shapes world" data (dataset/demo/)
  2. train the vision tower on the pretrain captions, then freeze it (out/demo/vision_tower): a CLIP
     ViT (the 224 px images seen at 128 px in 32 px patches: 16 tokens per image) learns to see this
     world, as the real CLIP was pretrained on the world's images (demo/train_demo_tower.py); its features
     of the training images go into the trainers' feature cache as it ends
  3. pretrain on captions; with no pretrained LLM offline, the whole LLM is trained (--freeze_llm 0)
  4. SFT on short questions and answers, four about each image
  5. score the held-out split with the images, then with blank images ("blind")
  6. print a table and a few answers; write out/demo/results.json

The steps run the real scripts (train_*.py, eval_vlm.py's scoring), so the demo is also the
standing end-to-end check that image features reach the language model: a model that does as
well blind as with the images is broken, however low its loss.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import add_model_args, make_parser, switch  # noqa: E402
from make_demo_vision_tower import TOWER_LAYERS, geometry_problem  # noqa: E402
from make_shapes_data import COLOR_ANSWERS, TYPES  # noqa: E402
from model.generations import GENERATIONS, RELEASE_N_HEADS  # noqa: E402


HEAD_DIM = 64  # the LLM's attention head width, where the architecture lets it be chosen (minimind3)


def step(n, title):
    print(f"\n=== [{n}/6] {title}", flush=True)


def run(cmd):
    """Run a repo script, streaming its output (progress, ETA) through."""
    print("$ " + " ".join(cmd), flush=True)
    done = subprocess.run([sys.executable, *cmd], cwd=ROOT)
    if done.returncode:  # the step has printed why; a traceback of this wrapper would bury it
        sys.exit(f"error: {cmd[0]} failed (exit status {done.returncode}); its output above says why")


def make_tower(a):
    geometry = (f"CLIP, {a.tower_layers} layers, {a.image_size} px, patch {a.patch_size}: "
                f"{(a.image_size // a.patch_size) ** 2} tokens per image")
    if a.tower_steps:
        step(2, f"train the vision tower on the captions, {a.tower_steps} steps ({geometry}), then freeze it")
        run(["demo/train_demo_tower.py", "--data_dir", a.data_dir, "--out_dir", a.tower_dir, "--steps",
             str(a.tower_steps), "--patch_size", str(a.patch_size), "--image_size", str(a.image_size),
             "--seed", str(a.seed), "--dtype", a.dtype, "--num_layers", str(a.tower_layers),
             "--cache_features", feature_cache(a)])
    else:
        step(2, f"build an untrained vision tower ({geometry}), frozen as it is")
        run(["demo/make_demo_vision_tower.py", "--out_dir", a.tower_dir, "--patch_size", str(a.patch_size),
             "--image_size", str(a.image_size), "--seed", str(a.seed), "--num_layers", str(a.tower_layers)])


def feature_cache(a):
    """The trainers' feature cache, which the tower stage fills as it ends (from the pixels it holds)."""
    return os.path.join(a.out_dir, "feature_cache")


def train_args(a, stage):
    data = os.path.join(a.data_dir, f"{stage}.jsonl")
    epochs, lr = (a.pretrain_epochs, a.pretrain_lr) if stage == "pretrain" else (a.sft_epochs, a.sft_lr)
    args = ["--data_path", data, "--images_path", os.path.join(a.data_dir, "images"), "--out_dir", a.out_dir,
            "--vision_model_path", a.tower_dir, "--dim", a.dim, "--n_layers", a.n_layers,
            "--epochs", epochs, "--batch_size", a.batch_size, "--learning_rate", lr, "--max_seq_len", 320,
            "--log_interval", a.log_interval, "--save_interval", 10**9, "--num_workers", a.num_workers,
            "--dtype", a.dtype, "--device", a.device, "--cache_features", feature_cache(a),
            "--freeze_llm", 0, "--seed", a.seed, "--use_compile", a.use_compile, "--projector", a.projector,
            # Here a sample's length says how many objects its image has: batches of one length would
            # each hold one kind of scene, and the look-ups the questions need are then barely learned
            # (docs/demo-experiments.md). Plain shuffled batches cost little padding at these lengths.
            "--group_by_length", 0]
    if stage == "pretrain":
        args += ["--from_weight", "none", "--generation", a.generation]
        for flag in ("n_heads", "n_kv_heads", "head_dim"):  # when set (head_dim: see parse_args), else the LLM's own
            if getattr(a, flag) is not None:
                args += [f"--{flag}", getattr(a, flag)]
    return [str(x) for x in args]


def build_parser():
    p = make_parser(__doc__)
    a = p.add_argument_group("data").add_argument
    a("--data_dir", default="dataset/demo", help="where the shapes world is written")
    a("--n_train", type=int, default=9000, help="training images (one caption and one Q&A sample each)")
    a("--n_test", type=int, default=1500, help="held-out questions, a fifth of each type: with 300 a type's score "
                                                "is known to about +-0.04, with 60 only to about +-0.09")
    a("--sft_turns", type=int, default=4,
      help="questions per training image: with 4, the one left out is count, which the captions state (5: count "
           "too, and questions take a fifth longer; docs/demo-experiments.md)")
    a("--color_answers", default="sentence", choices=COLOR_ANSWERS,
      help='a colour answer as "The star is red." (the shape named first) or as "red"')
    a("--object_mix", type=float, nargs=3, default=None, metavar=("ONE", "TWO", "THREE"),
      help="relative weights of 1, 2 and 3 objects in a training image (default: even; held-out images "
           "are always even)")
    a("--question_mix", type=float, nargs=len(TYPES), default=None, metavar=tuple(t.upper() for t in TYPES),
      help="relative weights of the first question's type in training (default: even; held-out "
           "questions are always even)")
    a = p.add_argument_group("model").add_argument
    a("--tower_steps", type=int, default=800,
      help="steps that teach the vision tower this world before the VLM is built on it (0: a random tower)")
    a("--tower_layers", type=int, default=TOWER_LAYERS,
      help="the tower's transformer layers: with 2, a run's tower reads the shape of an object less surely, "
           "and the colour of 'the circle' can then go unlearned (docs/demo-experiments.md)")
    a("--patch_size", type=int, default=32, choices=[16, 32],
      help="the tower's patch: at 224 px, 32 gives 49 image tokens (ViT-B/32 geometry), 16 the design's 196 "
           "(ViT-B/16); docs/demo-experiments.md compares them")
    a("--image_size", type=int, default=128,
      help="the side the tower's processor resizes the 224 px images to: 128 gives 16 tokens, and a run takes about "
           "60%% of its time at 224 (49 tokens), scoring as well; at 96 (one token per grid cell) position is at "
           "chance where there are several objects (docs/demo-experiments.md)")
    a("--dim", type=int, default=256, help="the LLM's width (trained from scratch)")
    a("--n_layers", type=int, default=3, help="the LLM's layers: with 4, position fell below 0.85 on two seeds of "
                                               "three, and a run took 2 min longer (docs/demo-experiments.md)")
    a("--generation", default="minimind3", choices=list(GENERATIONS),
      help="the LLM architecture: the 2026 release's (QK-norm, 4 KV heads), or the 2025 one's; the 2026 one "
           "learns the look-ups the questions need on more seeds (docs/demo-experiments.md)")
    a("--n_heads", type=int, default=None,
      help=f"the LLM's attention heads (minimind3 only); default: {RELEASE_N_HEADS}, as the releases. With 4 of "
           "the same width, colour went unlearned in 2 runs of 4 (docs/demo-experiments.md)")
    a("--n_kv_heads", type=int, default=None, help="the LLM's key/value heads; default: the generation's (minimind3: 4)")
    a("--head_dim", type=int, default=None,
      help=f"the width of the LLM's attention heads (minimind3 only); default: {HEAD_DIM} with minimind3, twice "
           "--dim 256 / 8 heads: QK-norm bounds a score by sqrt(width), and with 32-wide heads the look-up of an "
           "object's cell stayed soft (docs/demo-experiments.md); --dim / 8 with minimind2")
    a("--projector", default="linear", choices=["linear", "mlp"], help="the projector kind (passed to training)")
    a = p.add_argument_group("training").add_argument
    a("--pretrain_epochs", type=int, default=2, help="epochs of captions: in one, a run often binds an object's "
                                                     "colour and shape to its cell only partly (docs/demo-experiments.md)")
    a("--sft_epochs", type=int, default=2, help="epochs of questions: in one, a run often learns some of the "
                                                 "look-ups the questions need and not others (docs/demo-experiments.md)")
    a("--pretrain_lr", type=float, default=2e-3, help="pretraining's learning rate")
    a("--sft_lr", type=float, default=1e-3, help="SFT's learning rate")
    a("--batch_size", type=int, default=16, help="samples per step")
    a("--num_workers", type=int, default=1, help="DataLoader workers decoding images")
    a("--device", default="cpu", help="passed to training and scoring (the demo is sized for a CPU)")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="passed to training (auto: bf16 where the CPU computes it natively, else fp32)")
    a("--seed", type=int, default=0, help="the world's, the tower's and training's seed")
    switch(a, "--use_compile", 1, help="torch.compile the LLM blocks: about twice the steps in the same minutes")
    a = p.add_argument_group("output").add_argument
    a("--out_dir", default="out/demo", help="weights, logs, the tower and results.json")
    a("--log_interval", type=int, default=20, help="optimizer steps between training's log lines")
    a("--samples", type=int, default=6, help="held-out answers to print (results.json keeps every one)")
    return p


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := geometry_problem(args.image_size, args.patch_size):
        parser.error(problem)
    if args.head_dim is None and args.generation == "minimind3":
        args.head_dim = HEAD_DIM
    args.tower_dir = os.path.join(args.out_dir, "vision_tower")
    return args


def main():
    args = parse_args()
    t_start = time.time()

    step(1, f"generate the shapes world: {args.n_train} training images, {args.n_test} held-out questions")
    run(["demo/make_shapes_data.py", "--out_dir", args.data_dir, "--seed", str(args.seed),
         "--n_train", str(args.n_train), "--n_test", str(args.n_test), "--sft_turns", str(args.sft_turns),
         "--color_answers", args.color_answers,
         *(["--object_mix", *map(str, args.object_mix)] if args.object_mix else []),
         *(["--question_mix", *map(str, args.question_mix)] if args.question_mix else [])])

    make_tower(args)

    t_train = time.time()
    heads = f", heads {args.head_dim} wide" if args.head_dim else ""
    step(3, f"pretrain: captions, LLM {args.dim}x{args.n_layers} ({args.generation}{heads}) trained from scratch "
            f"with the projection")
    run(["train_pretrain_vlm.py", *train_args(args, "pretrain")])
    step(4, "SFT: short questions and answers about the images")
    run(["train_sft_vlm.py", *train_args(args, "sft"), "--from_weight", "pretrain_vlm"])
    train_seconds = time.time() - t_train

    step(5, "score the held-out split, with the images and blind (blank images)")
    from eval_vlm import run_benchmark
    from model.inference import InferenceConfig, VLMChat, load_model
    model_args = add_model_args(argparse.ArgumentParser()).parse_args(
        ["--weight", "sft_vlm", "--out_dir", args.out_dir, "--dim", str(args.dim), "--n_layers", str(args.n_layers),
         "--vision_model_path", args.tower_dir, "--device", args.device])
    chat = VLMChat(*load_model(InferenceConfig.from_args(model_args)))
    test = os.path.join(args.data_dir, "test.jsonl")
    images = os.path.join(args.data_dir, "images")
    seeing, rows = run_benchmark(chat, test, images, batch_size=64, progress=False)
    blind, _ = run_benchmark(chat, test, images, blind=True, batch_size=64, progress=False)

    step(6, "results")
    print(f"{'type':<10}{'n':>5}{'with image':>12}{'blind':>8}")
    for t, s in seeing["per_type"].items():
        print(f"{t:<10}{s['n']:>5}{s['accuracy']:>12.3f}{blind['per_type'][t]['accuracy']:>8.3f}")
    print(f"{'all':<10}{seeing['n']:>5}{seeing['accuracy']:>12.3f}{blind['accuracy']:>8.3f}")
    print("\nheld-out answers:")
    for r in rows[:args.samples]:
        print(f"  {r['image']}: {r['question']} -> {r['prediction']!r} (reference {r['reference']!r})"
              f"{'' if r['correct'] else '  x'}")
    results = {"accuracy": seeing["accuracy"], "blind_accuracy": blind["accuracy"], "n": seeing["n"],
               "per_type": {t: {"accuracy": s["accuracy"], "blind_accuracy": blind["per_type"][t]["accuracy"],
                                "n": s["n"]} for t, s in seeing["per_type"].items()},
               "train_seconds": round(train_seconds, 1), "total_seconds": round(time.time() - t_start, 1),
               "config": {k: v for k, v in vars(args).items() if k != "samples"},
               "answers": rows}  # every held-out question, to see what the wrong answers say
    path = os.path.join(args.out_dir, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\naccuracy {results['accuracy']:.3f} (blind {results['blind_accuracy']:.3f}) on {results['n']} held-out "
          f"questions; trained in {train_seconds / 60:.1f} min, {results['total_seconds'] / 60:.1f} min in all -> {path}")


if __name__ == "__main__":
    main()
