"""How much does a frozen vision tower tell about the demo's shapes? Linear probes on its features.

The demo's LLM can only learn what the frozen tower's 196 patch tokens make reachable. This
script measures it without training any LLM: on the one-object images of the demo data it fits
a linear classifier (a logistic regression, on standardised features) for
  colour    from the mean of the 196 patch tokens,
  shape     from the same mean,
  position  from the single token at the centre of the object's grid cell,
and prints held-out accuracy next to chance. Labels come from the pretrain captions.

    python dev/probe_tower.py --data_dir dataset/demo --vision_model_path out/demo/vision_tower
"""
import argparse
import os
import re
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "demo")]

from model.images import load_processor, open_image, to_pixels  # noqa: E402
from dataset.samples import open_source  # noqa: E402
from make_shapes_data import CELL_PHRASE, CELLS, COLORS, IMG, SHAPES  # noqa: E402

PHRASE_TO_CELL = {CELL_PHRASE.get(c, f"at the {c}"): c for c in CELLS}
ONE_OBJECT = re.compile(r"There is 1 shape: a \w+ (\w+) (\w+) (.+)\.$")


def one_object_images(data_dir, limit):
    """[(image path, colour, shape, cell)] from the captions of images with a single object."""
    path = os.path.join(data_dir, "pretrain.jsonl")
    try:
        source = open_source(path, os.path.join(data_dir, "images"))  # the training data reader
    except FileNotFoundError:
        sys.exit(f"error: {path} not found: generate the demo data first "
                 f"(python demo/make_shapes_data.py --out_dir {data_dir}) or pass --data_dir")
    if source.n_bad:
        sys.exit(f"error: {source.bad[0]}; regenerate the data")
    found = []
    for i in range(len(source)):
        sample = source.get(i)
        m = ONE_OBJECT.match(sample.messages[-1]["content"])
        if len(sample.images) == 1 and m and m.group(1) in COLORS and m.group(2) in SHAPES \
                and m.group(3) in PHRASE_TO_CELL:
            found.append((sample.images[0], m.group(1), m.group(2), PHRASE_TO_CELL[m.group(3)]))
    return found[:limit]


def probe_accuracy(x, labels, train_frac=0.8, steps=300, weight_decay=1e-2):
    """Held-out accuracy of a multinomial logistic regression on x [N, C]."""
    classes = sorted(set(labels))
    y = torch.tensor([classes.index(v) for v in labels])
    n = int(len(x) * train_frac)
    mean, std = x[:n].mean(0), x[:n].std(0) + 1e-6  # statistics of the training part only
    x = (x - mean) / std
    torch.manual_seed(0)  # the same figures on every run
    clf = torch.nn.Linear(x.shape[1], len(classes))
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):  # full batch: a few hundred images
        loss = torch.nn.functional.cross_entropy(clf(x[:n]), y[:n])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return (clf(x[n:]).argmax(-1) == y[n:]).float().mean().item()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", default="dataset/demo")
    p.add_argument("--vision_model_path", default="out/demo/vision_tower")
    p.add_argument("--n", type=int, default=900, help="one-object images to use (80%% fit, 20%% scored)")
    a = p.parse_args()
    from model.model_vlm import load_vision_tower, tower_features
    items = one_object_images(a.data_dir, a.n)  # before loading the tower: a data problem shows at once
    tower, processor = load_vision_tower(a.vision_model_path), load_processor(a.vision_model_path)
    if len(items) < 50:
        sys.exit(f"error: only {len(items)} one-object images in {a.data_dir}/pretrain.jsonl; generate the demo data first")
    means, centres = [], []
    grid = tower.config.image_size // tower.config.patch_size  # 14 patches a side
    for b in range(0, len(items), 64):
        batch = items[b:b + 64]
        pixels = to_pixels(processor, [open_image(path) for path, *_ in batch])
        tokens = tower_features(tower, pixels)  # [B, 196, C]
        means.append(tokens.mean(1))
        for i, (_, _, _, cell) in enumerate(batch):
            row, col = divmod(CELLS.index(cell), 3)
            r, c = (int((k + 0.5) * IMG / 3 * grid / IMG) for k in (row, col))  # the cell's centre patch
            centres.append(tokens[i].view(grid, grid, -1)[r, c])
        print(f"encoded {min(b + 64, len(items))}/{len(items)} images", file=sys.stderr, flush=True)
    means, centres = torch.cat(means), torch.stack(centres)
    _, colours, shapes, cells = zip(*items)
    print(f"{len(items)} one-object images, tower {a.vision_model_path}")
    for name, x, labels in (("colour (mean token)", means, colours), ("shape (mean token)", means, shapes),
                            ("position (centre token)", centres, cells)):
        print(f"  {name:<24} accuracy {probe_accuracy(x, list(labels)):.2f}   chance {1 / len(set(labels)):.2f}")


if __name__ == "__main__":
    main()
