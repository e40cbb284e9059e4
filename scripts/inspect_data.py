"""Is my data read right? Print the first samples of a jsonl or parquet file as the model sees them.

    python scripts/inspect_data.py dataset/sft_i2t.parquet --n 3
    python scripts/inspect_data.py my_data.jsonl --images_path my_images

For each sample: where it comes from, each image's size and where its placeholder run starts,
and the rendered chat text with the supervised tokens (those the loss is computed on) between
[[ and ]]. A run of image placeholders is shown as <image x196>. A bad sample is reported with
its reason, as training would report it, and the next one is shown.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import IMAGES_PATH_DEFAULT, make_parser  # noqa: E402
from model.images import ImageError, open_image  # noqa: E402
from model.chat import ChatEncoder, resolve_image_token_id  # noqa: E402
from model.paths import load_tokenizer  # noqa: E402
from dataset.samples import SampleError, open_source  # noqa: E402


def spans(ids, labels, image_token_id):
    """Token ids -> [(kind, ids)] runs: kind is "image", "loss" (supervised) or "text"."""
    runs = []
    for t, label in zip(ids, labels):
        kind = "image" if t == image_token_id else "loss" if label != -100 else "text"
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(t)
        else:
            runs.append((kind, [t]))
    return runs


def show(sample, encoder, tokenizer):
    ids, labels, is_image = encoder.encode(sample.messages)
    n_loss = sum(label != -100 for label in labels)
    print(f"== {sample.where}: {len(ids)} tokens, {n_loss} supervised, {len(sample.images)} image(s)")
    starts = [i for i in range(len(ids)) if is_image[i] and (i == 0 or not is_image[i - 1])]
    for k, (source, start) in enumerate(zip(sample.images, starts)):
        name = os.path.basename(source) if isinstance(source, str) else f"{len(source)} embedded bytes"
        try:
            image = open_image(source)
            size = f"{image.width}x{image.height}"
        except ImageError as e:
            size = f"UNREADABLE: {e}"
        print(f"   image {k + 1} ({name}): {size}, placeholders at tokens {start}..{start + encoder.image_token_count - 1}")
    text = ""
    for kind, run in spans(ids, labels, encoder.image_token_id):
        if kind == "image":
            text += f"<image x{len(run)}>"
        else:
            piece = tokenizer.decode(run)
            text += f"[[{piece}]]" if kind == "loss" else piece
    print(text.rstrip("\n") + "\n")


def build_parser():
    p = make_parser(__doc__)
    p.add_argument("data_path", nargs="?", help="a .jsonl, or parquet: a file, a folder of them or a glob")
    p.add_argument("--data_path", dest="data_path_flag", metavar="DATA_PATH",
                   help="the same, spelled as the other scripts take it (default: none)")
    p.add_argument("--images_path", help=f"jsonl only: its image folder (default: {IMAGES_PATH_DEFAULT})")
    p.add_argument("--n", type=int, default=5, help="how many samples to show")
    p.add_argument("--start", type=int, default=0, help="the first sample to show")
    p.add_argument("--tokenizer_path", default="model", help="the tokenizer to render the text with")
    p.add_argument("--image_token_id", type=int, default=-1, help="as in training (-1: the tokenizer's)")
    p.add_argument("--image_token_count", type=int, default=196, help="placeholders per image, as in training")
    return p


def main(argv=None):
    p = build_parser()
    args = p.parse_args(argv)
    if args.data_path and args.data_path_flag and args.data_path != args.data_path_flag:
        p.error(f"two data paths: {args.data_path} and --data_path {args.data_path_flag}")
    args.data_path = args.data_path or args.data_path_flag
    if not args.data_path:
        p.error("which data? give its path (or --data_path PATH)")
    try:
        source = open_source(args.data_path, args.images_path, path_flag=None)  # a positional argument
        tokenizer = load_tokenizer(args.tokenizer_path)
        encoder = ChatEncoder(tokenizer, resolve_image_token_id(tokenizer, args.image_token_id),
                              args.image_token_count)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    print(f"{args.data_path}: {len(source)} samples" + (f" ({source.n_text_only} text-only)" if source.n_text_only else "")
          + (f", {source.n_bad} bad, e.g. {source.bad[0]}" if source.n_bad else "") + "\n")
    for i in range(args.start, min(args.start + args.n, len(source))):
        try:
            show(source.get(i), encoder, tokenizer)
        except SampleError as e:
            print(f"== BAD: {e}\n")


if __name__ == "__main__":
    main()
