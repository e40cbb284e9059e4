"""Pre-build the frozen-feature cache that `--cache_features DIR` trains from.

    python scripts/cache_features.py --data_path dataset/pretrain_data.jsonl \
        --images_path dataset/pretrain_images --cache_dir out/feature_cache

Every image the jsonl names is encoded once by the vision tower and appended to the cache, exactly
as the first epoch of a training run with the same --vision_model_path and --dtype would store it
(the cache is keyed by the tower's weights *in that dtype*). Images already cached are skipped, so
the script can be stopped and rerun, or run once per jsonl into one shared DIR. Under torchrun
(or with RANK and WORLD_SIZE set) each process encodes its own slice into its own shard file.
It costs about 300 KB per image at ViT-B/16 width (196 x 768 fp16): about 180 GB for the
released pretrain set.
"""
import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from dataset.feature_cache import open_cache_for  # noqa: E402
from dataset.lm_dataset import parse_line  # noqa: E402
from model.model_vlm import load_vision_tower, tower_features  # noqa: E402


def images_of(jsonl_path, images_path):
    """Unique image paths of a jsonl in first-seen order, each with the line that names it."""
    if not os.path.isfile(jsonl_path):
        sys.exit(f"error: data file {jsonl_path} not found (set --data_path)")
    found = {}
    with open(jsonl_path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                _, names = parse_line(line)
            except ValueError as e:
                sys.exit(f"error: {jsonl_path}:{lineno}: {e}")
            for name in names:
                found.setdefault(os.path.join(images_path, name), f"{jsonl_path}:{lineno}")
    return found


class Pixels(Dataset):
    def __init__(self, paths, where, processor):
        self.paths, self.where, self.processor = paths, where, processor

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            image = Image.open(self.paths[i]).convert("RGB")
        except OSError as e:
            raise ValueError(f"{self.where[self.paths[i]]}: cannot read image: {e} (check --images_path)") from None
        return self.processor(images=[image], return_tensors="pt")["pixel_values"][0]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--data_path", required=True, help="jsonl whose images to encode")
    a("--images_path", required=True, help="folder the jsonl's image names are relative to")
    a("--cache_dir", default="out/feature_cache", help="the DIR of --cache_features DIR (default: the trainer's)")
    a("--vision_model_path", default="model/vision_model/clip-vit-base-patch16")
    a("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
      help="the training run's --dtype: the tower runs in it, and the cache is keyed by it")
    a("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    a("--batch_size", type=int, default=32)
    a("--num_workers", type=int, default=2, help="DataLoader workers decoding images")
    args = p.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.device.startswith("cuda") and world > 1:
        args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"

    where = images_of(args.data_path, args.images_path)  # data errors first: they cost nothing to find
    missing = [path for path in where if not os.path.isfile(path)]
    if missing:
        sys.exit(f"error: {where[missing[0]]}: image {missing[0]} not found (check --images_path); "
                 f"{len(missing)} missing in all")

    from transformers import AutoImageProcessor
    dtype = getattr(torch, args.dtype)
    # As in the trainer: the frozen tower's weights in the training dtype, then its identity.
    try:
        tower = load_vision_tower(args.vision_model_path).to(args.device, dtype)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    processor = AutoImageProcessor.from_pretrained(args.vision_model_path)
    cache = open_cache_for(tower, processor, args.cache_dir)  # the trainer's call: same identity and row shape
    mine = list(where)[rank::world]
    todo = [path for path in mine if cache.lookup(path) is None]
    print(f"{len(where)} images in {args.data_path}" + (f", {len(mine)} of them on rank {rank}" if world > 1 else "")
          + f"; {len(mine) - len(todo)} already cached in {cache.dir}, {len(todo)} to encode", flush=True)
    loader = DataLoader(Pixels(todo, where, processor), batch_size=args.batch_size, num_workers=args.num_workers,
                        pin_memory=args.device.startswith("cuda"))
    autocast = torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
    done, t0 = 0, time.time()
    try:
        for batch in loader:
            with autocast:
                features = tower_features(tower, batch.to(args.device)).to(torch.float16)  # [N, 196, C]
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
