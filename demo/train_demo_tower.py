"""Teach the demo's vision tower to see the shapes world, before any VLM is built on it.

The real MiniMind-V freezes a CLIP tower that was pretrained on the world's images, so every patch
token already says what object is there. A random tower passes each 16x16 patch on almost
linearly: the colour survives, but the shape of an object is spread over the edges of several
patches, and only a nonlinear readout across them finds it. So the demo does what the real system
did, at its own scale: it pretrains its tower on its own world, then freezes it.

The objective reads the caption off the image. The captions name every object's colour, shape,
size and grid cell ("a small red circle at the top left"). Linear heads on every patch token predict
the colour and shape of the object in that token's grid cell, or that the cell is empty.
Labels are the captions' words only (no masks or boxes), and the heads are thrown away: what is
kept is a tower whose patch tokens carry the object under them, which the VLM's projection then
reads linearly. The tower is saved as save_pretrained saves it, beside its image processor, like any tower.

    python demo/train_demo_tower.py --data_dir dataset/demo --out_dir out/demo/vision_tower
"""
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo")]

from cli import make_parser  # noqa: E402
from make_demo_vision_tower import TOWER_LAYERS  # noqa: E402  (no torch at import: --help stays fast)


def build_parser():
    p = make_parser(__doc__)
    a = p.add_argument_group("data and output").add_argument
    a("--data_dir", default="dataset/demo", help="the demo data (demo/make_shapes_data.py): its pretrain captions")
    a("--out_dir", default="out/demo/vision_tower", help="where the trained tower and its processor go")
    a = p.add_argument_group("the tower").add_argument
    a("--hidden_size", type=int, default=256, help="token width (real ViT-B/16: 768)")
    a("--num_layers", type=int, default=TOWER_LAYERS, help="transformer layers (real ViT-B/16: 12)")
    a("--num_heads", type=int, default=4, help="attention heads (must divide hidden_size)")
    a("--patch_size", type=int, default=16, help="16: 196 tokens per image (ViT-B/16); 32: 49 (ViT-B/32)")
    a("--image_size", type=int, default=224, help="the side the processor resizes images to (CLIP: 224)")
    a = p.add_argument_group("training").add_argument
    a("--steps", type=int, default=800, help="optimizer steps")
    a("--batch_size", type=int, default=32, help="images per step")
    a("--learning_rate", type=float, default=3e-4, help="the tower's peak (its heads: 10x)")
    a("--seed", type=int, default=0, help="weights and data order")
    a("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
      help="autocast dtype on the CPU (auto: bf16 where the CPU computes it natively)")
    a("--cache_features", default=None, metavar="DIR",
      help="then write the trained tower's features of every captioned image into the trainers' feature cache "
           "DIR (their --cache_features DIR), from the pixels this stage already holds (in fp32 it holds none and "
           "computes them again; default: none)")
    return p


def parse_args(argv=None):
    from make_demo_vision_tower import geometry_problem
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := geometry_problem(args.image_size, args.patch_size):
        parser.error(problem)
    return args


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before torch loads (seconds)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from make_demo_vision_tower import make_vision_tower, write_tower  # noqa: E402
from make_shapes_data import CELLS, COLORS, IMG, SHAPES, parse_caption  # noqa: E402
from model.images import ImageError, open_image, to_pixels  # noqa: E402
from model.model_vlm import tower_features  # noqa: E402

# Each head also has "nothing here" (index 0), for an empty cell. (Size is in the captions too, but
# no question asks it.)
HEADS = {"colour": ["none", *COLORS], "shape": ["none", *SHAPES]}


def cell_pooling(grid=14):
    """[9, grid*grid]: row k averages the patch tokens whose centre lies in grid cell k."""
    pool = torch.zeros(len(CELLS), grid * grid)
    for r in range(grid):
        for c in range(grid):
            y, x = ((i + 0.5) * IMG / grid for i in (r, c))
            pool[int(y // (IMG / 3)) * 3 + int(x // (IMG / 3)), r * grid + c] = 1
    return pool / pool.sum(1, keepdim=True)


def cell_labels(objs):
    """A caption's objects -> {head: [9] class indices}, 0 where a cell is empty."""
    labels = {head: [0] * len(CELLS) for head in HEADS}
    for shape, colour, cell, _ in objs:
        labels["colour"][CELLS.index(cell)] = HEADS["colour"].index(colour)
        labels["shape"][CELLS.index(cell)] = HEADS["shape"].index(shape)
    return labels


def read_captions(data_dir):
    """[(image path, objects)] from the demo's pretrain captions, read as training reads them."""
    from dataset.samples import open_source
    source = open_source(os.path.join(data_dir, "pretrain.jsonl"), os.path.join(data_dir, "images"))
    if source.n_bad:  # the demo's own captions: a bad line means the data is not the demo's
        raise ValueError(f"{source.bad[0]} ({source.n_bad} bad lines)")
    items = []
    for i in range(len(source)):
        sample = source.get(i)
        try:
            items.append((sample.images[0], parse_caption(sample.messages[-1]["content"])))
        except ValueError as e:
            raise ValueError(f"{sample.where}: {e}") from None
    return items


class CellReader(torch.nn.Module):
    """The tower plus linear heads that read the colour and shape of a cell's object from a token."""

    def __init__(self, tower):
        super().__init__()
        width = tower.config.hidden_size
        self.tower = tower
        self.heads = torch.nn.ModuleDict({h: torch.nn.Linear(width, len(v)) for h, v in HEADS.items()})
        pool = cell_pooling(tower.config.image_size // tower.config.patch_size)
        self.register_buffer("pool", pool)  # [9, P], P patches: 196 at patch 16, 49 at 32
        self.register_buffer("cell_of_patch", pool.argmax(0))  # [P]

    def forward(self, pixels, per_cell=False):
        """[B, 3, 224, 224] -> {head: [B, P, classes]}, or with per_cell the heads on each cell's
        mean token, [B, 9, classes] (how the held-out accuracy is read)."""
        tokens = tower_features(self.tower, pixels)  # [B, P, C]
        if per_cell:
            tokens = self.pool @ tokens  # [9, P] @ [B, P, C] -> [B, 9, C]
        return {h: head(tokens) for h, head in self.heads.items()}


def train_tower(items, steps, batch_size=32, lr=3e-4, seed=0, dtype=torch.float32, log=print, frozen=False,
                kept=None, **tower_kw):
    """-> (tower, processor, held-out accuracy per head on occupied cells). items: [(image, objects)].
    frozen: train the heads only, over the random tower (the control: what a tower reads before it is taught).
    kept: where each image's pixels are kept across batches (path -> [3, H, W] in dtype), for the caller
    to reuse; by default pixel_store(dtype)."""
    tower, processor = make_vision_tower(seed=seed, **tower_kw)
    # At the demo's 17 tokens an image, the plain attention's backward is cheaper than the fused
    # kernel's (docs/demo-experiments.md); the tower is handed back with the attention it came with.
    attention = tower.config._attn_implementation
    tower.set_attn_implementation("eager")
    reader = CellReader(tower.train(not frozen).requires_grad_(not frozen))
    n_eval = min(256, len(items) // 10)
    train, held_out = items[n_eval:], items[:n_eval]
    # The fresh heads learn faster than the tower under them; a warm-up and clipping keep the ViT,
    # trained from scratch, from diverging early.
    opt = torch.optim.AdamW([*([] if frozen else [{"params": reader.tower.parameters(), "base_lr": lr}]),
                             {"params": reader.heads.parameters(), "base_lr": 10 * lr}], weight_decay=0.01,
                            fused=True)  # one kernel for the update instead of several per tensor
    gen = torch.Generator().manual_seed(seed)
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)

    if kept is None:
        kept = pixel_store(dtype)

    def batch(rows):
        pixels = pixels_of(processor, [path for path, _ in rows], dtype, kept)  # as training will see them
        labels = [cell_labels(objs) for _, objs in rows]
        return pixels, {h: torch.tensor([l[h] for l in labels]) for h in HEADS}  # [B, 9] each

    t0 = time.time()
    for step in range(1, steps + 1):
        schedule = min(1.0, step / 50) * min(1.0, 4 * (1 - step / steps) + 0.1)  # warm-up, flat, decay over the last quarter
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * schedule
        pixels, labels = batch([train[int(i)] for i in torch.randint(len(train), (batch_size,), generator=gen)])
        with autocast:
            logits = reader(pixels)  # {head: [B, P, classes]}
        loss = sum(F.cross_entropy(logits[h].float().flatten(0, 1), labels[h][:, reader.cell_of_patch].flatten())
                   for h in HEADS)  # every token: its cell's label
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reader.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps:
            rate = step / (time.time() - t0)
            log(f"tower step {step}/{steps} loss {loss.item():.3f}, {rate:.1f} steps/s, "
                f"eta {(steps - step) / rate:.0f}s")
    reader.eval()
    correct, total = {h: 0 for h in HEADS}, 0
    with torch.no_grad(), autocast:
        for b in range(0, len(held_out), 64):
            pixels, labels = batch(held_out[b:b + 64])
            logits = reader(pixels, per_cell=True)
            occupied = labels["shape"] > 0
            total += int(occupied.sum())
            for h in HEADS:
                correct[h] += int(((logits[h].argmax(-1) == labels[h]) & occupied).sum())
    accuracy = {h: correct[h] / max(total, 1) for h in HEADS}
    tower.set_attn_implementation(attention)
    return tower.eval().requires_grad_(False), processor, accuracy


def pixel_store(dtype):
    """Where the stage keeps each image's pixels across batches: a dict, or None where it does not keep them.
    800 steps of 32 draw each image about three times, so each image's pixels are computed once and kept, in
    the autocast dtype, which the tower's first layer casts them to anyway (the same numbers; 0.9 GB for the
    demo's 9000 images at 128 px, 2.6 GB at 224). In fp32 they would take twice that: there they are computed
    each time."""
    return {} if dtype != torch.float32 else None


def pixels_of(processor, paths, dtype, kept=None):
    """[B, 3, H, W] in dtype for these image paths, through the processor once per image: from `kept`
    where it holds them, and kept there (None: this call's own)."""
    store = {} if kept is None else kept
    if new := [path for path in dict.fromkeys(paths) if path not in store]:
        store.update(zip(new, to_pixels(processor, [open_image(path, name=path) for path in new]).to(dtype)))
    return torch.stack([store[path] for path in paths])


def cache_features(tower_dir, paths, cache_dir, dtype, kept=None):
    """Write the saved tower's features of these images into the trainers' feature cache (--cache_features
    DIR), as training would compute them: the tower's weights in dtype, under autocast, through the trainer's
    own encoder. Pretraining then reads them in its first epoch instead of decoding and encoding every image
    again, beside its own steps. -> how many were encoded (those already cached are skipped)."""
    from dataset.feature_cache import image_key, open_cache_for
    from model.images import load_processor
    from model.model_vlm import load_vision_tower
    from trainer.build import ImageEncoder
    tower = load_vision_tower(tower_dir).to(dtype).requires_grad_(False)
    processor = load_processor(tower_dir)
    cache = open_cache_for(tower, processor, cache_dir)
    encoder = ImageEncoder(tower, torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32), cache)
    keys = {path: image_key(path) for path in paths}
    todo = [path for path, key in keys.items() if cache.lookup(key) is None]
    for b in range(0, len(todo), 64):
        chunk = todo[b:b + 64]
        encoder({"pixel_values": pixels_of(processor, chunk, dtype, kept), "image_keys": [keys[p] for p in chunk],
                 "cached": [None] * len(chunk)}, "cpu")
    return len(todo)


def save_tower(tower, processor, out_dir):
    """Written into a sibling folder, then swapped in: a killed run leaves the old tower whole."""
    tmp = out_dir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write_tower(tower, processor, tmp)
    shutil.rmtree(out_dir, ignore_errors=True)
    os.replace(tmp, out_dir)


def main():
    args = parse_args()
    from model.precision import describe, resolve_dtype
    dtype, why = resolve_dtype(args.dtype, "cpu")
    print(describe(dtype, why), flush=True)
    fix = f"generate the demo data (python demo/make_shapes_data.py --out_dir {args.data_dir}) or pass --data_dir"
    if not os.path.isfile(os.path.join(args.data_dir, "pretrain.jsonl")):
        sys.exit(f"error: no {os.path.join(args.data_dir, 'pretrain.jsonl')}: {fix}")
    try:
        items = read_captions(args.data_dir)
    except ValueError as e:
        sys.exit(f"error: {e}: {fix}")
    t0 = time.time()
    kept = pixel_store(dtype)  # the pixels, also for the feature cache
    try:
        tower, processor, accuracy = train_tower(
            items, args.steps, args.batch_size, args.learning_rate, args.seed, dtype,
            log=lambda s: print(s, flush=True), kept=kept, hidden_size=args.hidden_size, num_layers=args.num_layers,
            num_heads=args.num_heads, patch_size=args.patch_size, image_size=args.image_size)
    except ImageError as e:  # an image the demo's generator did not write whole
        sys.exit(f"error: {e}: {fix}")
    save_tower(tower, processor, args.out_dir)
    print(f"trained the tower in {time.time() - t0:.0f}s on {len(items)} captioned images; held-out occupied "
          f"cells read right: " + ", ".join(f"{h} {v:.3f}" for h, v in accuracy.items()) + f" -> {args.out_dir}",
          flush=True)
    if args.cache_features:
        t0 = time.time()
        try:
            n = cache_features(args.out_dir, [path for path, _ in items], args.cache_features, dtype, kept)
        except ImageError as e:  # the tower is saved; the images encoded before this one stay cached
            sys.exit(f"error: {e}: {fix}")
        print(f"cached the features of {n} images in {time.time() - t0:.0f}s -> {args.cache_features}")


if __name__ == "__main__":
    main()
