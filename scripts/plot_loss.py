"""Plot training loss curves from the trainer's JSONL logs (out/{save_weight}_{dim}[_moe]_log.jsonl).

    python scripts/plot_loss.py --logs out/demo/pretrain_vlm_*_log.jsonl out/demo/sft_vlm_*_log.jsonl

One curve per file, labelled by file name; x = optimizer step, y = loss (mean over the log interval).
"""
import glob
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import make_parser  # noqa: E402


def read_log(path):
    """-> (steps, losses). The trainer appends, so a restarted run's steps go back down and a resumed
    run may re-log steps after its last checkpoint: a record replaces everything from its step on."""
    if not os.path.isfile(path):
        raise ValueError(f"log file {path} not found (train first, or check --logs)")
    points = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                step, loss = int(r["step"]), float(r["loss"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a trainer log record ({e})") from None
            while points and points[-1][0] >= step:  # steps in points stay strictly increasing
                points.pop()
            points.append((step, loss))
    if not points:
        raise ValueError(f"log file {path} is empty (no step was logged yet: the train scripts log every "
                         f"--log_interval steps)")
    return [p[0] for p in points], [p[1] for p in points]


def main(argv=None):
    ap = make_parser(__doc__)
    ap.add_argument("--logs", nargs="+", required=True, help="one or more *_log.jsonl files (globs are expanded)")
    ap.add_argument("--out", default="out/loss_curves.png", help="the picture to write")
    ap.add_argument("--title", default="MiniMind-V training loss", help="the picture's title")
    args = ap.parse_args(argv)
    import matplotlib  # after the flags: --help does not wait for it
    matplotlib.use("Agg")  # no display needed: we only write a file
    import matplotlib.pyplot as plt
    # Expand globs ourselves too, so a quoted pattern (or Windows shell) works; a pattern matching
    # nothing is kept as is and then reported as a missing file.
    paths = [p for pattern in args.logs for p in (sorted(glob.glob(pattern)) or [pattern])]
    try:
        curves = [(os.path.basename(p).removesuffix(".jsonl"), *read_log(p)) for p in paths]
    except ValueError as e:
        sys.exit(f"error: {e}")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, steps, losses in curves:
        ax.plot(steps, losses, marker="." if len(steps) < 30 else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title=args.title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"saved {args.out} ({', '.join(f'{label}: {len(s)} points' for label, s, _ in curves)})")


if __name__ == "__main__":
    main()
