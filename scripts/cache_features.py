"""Pre-build the frozen-feature cache that `--cache_features DIR` trains from.

    python scripts/cache_features.py --data_path dataset/pretrain_i2t.parquet --cache_dir out/feature_cache

Every image the data names (or, in parquet, holds) is encoded once by the vision tower and appended to the cache, exactly
as the first epoch of a training run with the same --vision_model_path and --dtype would store it
(the cache is keyed by the tower's weights *in that dtype*). Images already cached are skipped, so
the script can be stopped and rerun, or run once per data file into one shared DIR (an image
embedded twice, in the pretrain and the SFT file, is encoded once). Under torchrun
(or with RANK and WORLD_SIZE set) each process encodes its own slice into its own shard file.
It costs about 300 KB per image with CLIP ViT-B/16 (196 x 768 fp16): about 180 GB for the
released pretrain set; about 100 KB per image with SigLIP2 P32 (64 x 768).
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cli import DEVICE_HELP, IMAGES_PATH_DEFAULT, make_parser, preparing_progress  # noqa: E402
from model.paths import DEFAULT_VISION_MODEL  # noqa: E402
from model.precision import DTYPES, describe, resolve_device, resolve_dtype  # noqa: E402


def build_parser():
    p = make_parser(__doc__)
    a = p.add_argument_group("data").add_argument
    a("--data_path", required=True, help="the training data whose images to encode: a jsonl, or parquet (a file, "
                                         "a folder or a glob of shards)")
    a("--images_path", help=f"jsonl only: the folder its image names are relative to (default: {IMAGES_PATH_DEFAULT})")
    a("--num_workers", type=int, default=2, help="DataLoader workers decoding images")
    a = p.add_argument_group("the tower, as training runs it").add_argument
    a("--vision_model_path", default=DEFAULT_VISION_MODEL, help="the training run's vision tower")
    a("--dtype", default="auto", choices=DTYPES,
      help="the training run's --dtype (auto resolves the same way on the same machine): the tower runs in it, "
           "and the cache is keyed by it")
    a("--device", default="auto", help=DEVICE_HELP)
    a("--batch_size", type=int, default=32, help="images per tower call")
    a = p.add_argument_group("output").add_argument
    a("--cache_dir", default="out/feature_cache", help="the DIR of the trainers' --cache_features DIR (out/"
                                                       "feature_cache is where their --cache_features 1 looks)")
    return p


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer here, before torch loads (seconds)

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dataset.feature_cache import image_key, open_cache_for  # noqa: E402
from dataset.samples import open_source  # noqa: E402
from model.images import ImageError, load_processor, open_image, to_pixels  # noqa: E402
from model.model_vlm import load_vision_tower, tower_features  # noqa: E402


def images_of(source):
    """Unique images of the data in first-seen order: key -> (sample index, image position, where)."""
    found, t0 = {}, time.time()
    for i in range(len(source)):
        sample = source.get(i)  # SampleError names the file and line or row
        for k, src in enumerate(sample.images):
            found.setdefault(image_key(src), (i, k, sample.where))
        if time.time() - t0 > 2 and (i + 1) % 10000 == 0:
            print(f"\rreading {source.path}: {i + 1}/{len(source)} samples", end="", flush=True)
    return found


class Pixels(Dataset):
    def __init__(self, source, todo, processor):
        self.source, self.todo, self.processor = source, todo, processor  # todo: [(sample, image, where)]

    def __len__(self):
        return len(self.todo)

    def __getitem__(self, j):
        i, k, where = self.todo[j]
        try:
            image = open_image(self.source.get(i).images[k])
        except ImageError as e:
            raise ValueError(f"{where}: cannot read image: {e}") from None
        return to_pixels(self.processor, [image])[0]


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.device = resolve_device(args.device)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device.startswith("cuda") and world > 1:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"

    try:  # data errors first: they cost nothing to find
        source = open_source(args.data_path, args.images_path, None, progress=preparing_progress)  # None: it has no --allow_outside_images
        if source.n_bad:
            raise ValueError(f"{source.bad[0]}" + (f" ({source.n_bad} bad samples in all)" if source.n_bad > 1 else ""))
        where = images_of(source)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")

    dtype, why = resolve_dtype(args.dtype, args.device)
    print(describe(dtype, why), flush=True)
    # As in the trainer: the frozen tower's weights in the training dtype, then its identity.
    try:
        tower = load_vision_tower(args.vision_model_path).to(args.device, dtype)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    processor = load_processor(args.vision_model_path)
    try:
        cache = open_cache_for(tower, processor, args.cache_dir)  # the trainer's call: same identity and row shape
    except ValueError as e:  # an index line this script did not write
        sys.exit(f"error: {e}")
    if cache.lost:
        print(f"note: {cache.lost_note()}")
    mine = list(where)[rank::world]
    todo = [key for key in mine if cache.lookup(key) is None]
    print(f"{len(where)} images in {args.data_path}" + (f", {len(mine)} of them on rank {rank}" if world > 1 else "")
          + f"; {len(mine) - len(todo)} already cached in {cache.dir}, {len(todo)} to encode", flush=True)
    loader = DataLoader(Pixels(source, [where[key] for key in todo], processor), batch_size=args.batch_size,
                        num_workers=args.num_workers,
                        pin_memory=args.device.startswith("cuda"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    done, t0 = 0, time.time()
    try:
        for batch in loader:
            with autocast:
                features = tower_features(tower, batch.to(args.device)).to(torch.float16)  # [N, image_token_count, C]
            for features_of_one in features:
                cache.add(todo[done], features_of_one)
                done += 1
            rate = done / max(time.time() - t0, 1e-9)
            print(f"\rencoded {done}/{len(todo)} images, {rate:.1f}/s, eta {(len(todo) - done) / rate:.0f}s",
                  end="", flush=True)
    except ValueError as e:  # an unreadable image; from a worker, the message's last line is ours
        sys.exit(f"\nerror: {str(e).strip().splitlines()[-1].removeprefix('ValueError: ')}\n"
                 f"The {done} images encoded before it stay in the cache: fix or remove it and rerun.")
    if todo:
        print()
    size = cache.disk_bytes()
    cache.refresh()
    print(f"cache {cache.dir}: {len(cache)} images, {size / 2**20:.1f} MB on disk "
          f"({size / max(len(cache), 1) / 1024:.0f} KB per image)")


if __name__ == "__main__":
    main()
