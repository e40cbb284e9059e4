"""Generate the offline "shapes world" demo dataset in the released MiniMind-V format.

Each 224x224 PNG shows 1-3 flat shapes on a light background. An object is
(shape, colour, cell, size), with each object in its own cell of a 3x3 grid.
The output is ``pretrain.jsonl`` (one caption per image), ``sft.jsonl`` (short
Q&A, sometimes 2-3 turns) and ``test.jsonl`` (single-turn, held-out images),
plus ``images/``. Every line looks like
``{"conversations": [{"role": "user", "content": "<image>\\nWhat color is the star?"},
{"role": "assistant", "content": "The star is red."}], "image": "train_000001.png", "type": "color"}``.

Design choices:
* The answers must not be guessable from the question text alone, because the
  demo compares accuracy with and without the image. Colour, shape, cell and
  size are drawn independently and uniformly, so the answer to "What color is
  the circle?" is uniform over the colours. A question is only asked when its
  subject is unique in the image. Exists questions are yes/no with a fair coin,
  and the "no" questions often share a colour or shape with something that is
  in the picture, so the model has to bind colour to shape.
* Question types are assigned from a shuffled, balanced schedule.
* A colour answer names the shape first ("The star is red."), so the colour is read with the
  shape's word just before it; the other answers are one word or number. With bare colours ("red",
  ``--color_answers word``) the look-up by shape was the one the demo's model learned least
  (docs/demo-experiments.md).
* The test split uses its own seed, and its layouts of two or three objects
  never repeat a training layout. A layout is the sorted (shape, colour, cell,
  size) tuple, i.e. ignoring jitter and background. A lone object's layout may
  repeat one (there are only 648, and training shows nearly all of them).
* Everything is deterministic: all randomness comes from ``random.Random``
  instances derived from the seeds, and each image is drawn from its own seed.
"""
import contextlib
import glob
import json
import multiprocessing
import os
import random
import re
import sys
import time
from collections import Counter

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cli import make_parser  # noqa: E402

IMG = 224
SCALE = 2  # draw at 2x and downsample: cheap anti-aliasing
COLORS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 230),
          "yellow": (240, 205, 20), "purple": (140, 50, 180), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle", "star")
# Bounding-box side in px; a cell is ~74.7 px. The smallest spans 2.5 patches of a ViT-B/16, so
# its outline, which tells a circle from a square, is legible in the tower's patch tokens.
SIZES = {"small": 40, "medium": 50, "large": 60}
JITTER = 5  # px each way: the largest shape stays inside its cell
CELLS = ("top left", "top", "top right", "left", "center", "right",
         "bottom left", "bottom", "bottom right")
CELL_PHRASE = {"top": "at the top", "bottom": "at the bottom", "left": "on the left",
               "right": "on the right", "center": "in the center"}  # corners: "at the <cell>"
BACKGROUNDS = [(248, 248, 248), (232, 232, 232), (242, 238, 226), (226, 236, 244),
               (232, 242, 230), (244, 232, 236)]  # light tints, all far from every shape colour
TYPES = ("color", "shape", "position", "count", "exists")
COLOR_ANSWERS = ("sentence", "word")  # "The star is red." or "red" (written())
ANSWERS = {"color": set(COLORS) | {f"The {s} is {c}." for s in SHAPES for c in COLORS}, "shape": set(SHAPES),
           "position": set(CELLS),
           "count": {"1", "2", "3"}, "exists": {"yes", "no"}}
TEMPLATES = {
    "color": ["What color is the {shape}?", "What is the color of the {shape}?"],
    "shape": ["What shape is the {color} object?", "Which shape is {color}?"],
    "position": ["Where is the {color} {shape}?", "In which part of the image is the {color} {shape}?"],
    "count": ["How many shapes are there?", "How many objects are in the image?"],
    "exists": ["Is there a {color} {shape}?", "Does the image contain a {color} {shape}?"],
}
CAPTION_PROMPTS = ["Describe the image.", "What is in this picture?", "Describe this picture in detail.",
                   "What do you see in the image?", "List the shapes in the image."]
assert min(sum((a - b) ** 2 for a, b in zip(bg, c)) ** 0.5
           for bg in BACKGROUNDS for c in COLORS.values()) > 150


def layout_signature(objs):
    """Canonical, order-independent identity of a layout: sorted (shape, colour, cell, size)."""
    return tuple(sorted(tuple(o) for o in objs))


def random_layout(rng, n):
    cells = rng.sample(CELLS, n)
    return [(rng.choice(SHAPES), rng.choice(list(COLORS)), c, rng.choice(list(SIZES))) for c in cells]


def make_question(rng, objs, qtype):
    """Return (question, answer) for this layout, or None if the type is not askable here."""
    tpl = rng.choice(TEMPLATES[qtype])
    if qtype == "count":
        return tpl, str(len(objs))
    if qtype == "exists":
        if rng.random() < 0.5:
            s, c, _, _ = rng.choice(objs)
            return tpl.format(color=c, shape=s), "yes"
        present = {(o[0], o[1]) for o in objs}
        absent = [(s, c) for s in SHAPES for c in COLORS if (s, c) not in present]
        # Half of the "no" questions are near misses (right colour or right shape).
        near = [p for p in absent if any(p[0] == o[0] or p[1] == o[1] for o in objs)]
        s, c = rng.choice(near if near and rng.random() < 0.5 else absent)
        return tpl.format(color=c, shape=s), "no"
    # Remaining types name one object, which must be unique under the attribute used to name it.
    key = {"color": lambda o: o[0], "shape": lambda o: o[1], "position": lambda o: (o[0], o[1])}[qtype]
    counts = Counter(key(o) for o in objs)
    candidates = [o for o in objs if counts[key(o)] == 1]
    if not candidates:
        return None
    s, c, cell, _ = rng.choice(candidates)
    answer = {"color": c, "shape": s, "position": cell}[qtype]
    return tpl.format(color=c, shape=s), answer


def caption(objs, rng=None):
    """Objects in reading order (row-major), or in a random order drawn from rng. In reading order a
    caption can be written by scanning the cells; in a random order each object's next word must be
    found by what was already said of it ("a small red" -> the small red object's shape), the look-up
    that the questions ask for."""
    objs = rng.sample(objs, len(objs)) if rng else sorted(objs, key=lambda o: CELLS.index(o[2]))
    parts = [f"a {z} {c} {s} {CELL_PHRASE.get(cell, 'at the ' + cell)}" for s, c, cell, z in objs]
    body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    head = "There is 1 shape" if len(objs) == 1 else f"There are {len(objs)} shapes"
    return f"{head}: {body}."


PHRASE_TO_CELL = {CELL_PHRASE.get(c, f"at the {c}"): c for c in CELLS}


def parse_caption(text):
    """A caption -> its objects [(shape, colour, cell, size)], the inverse of caption(): what the
    words of a caption say is where, for the demo tower's training and the probes."""
    found = []
    for size, colour, shape, phrase in re.findall(r"a (\w+) (\w+) (\w+) ((?:at the|on the|in the) [\w ]+?)(?=,| and |\.$)",
                                                  text):
        if size in SIZES and colour in COLORS and shape in SHAPES and phrase in PHRASE_TO_CELL:
            found.append((shape, colour, PHRASE_TO_CELL[phrase], size))
    head = re.match(r"There (?:is|are) (\d+) shapes?:", text)
    if not head or int(head.group(1)) != len(found):  # a cell read as empty would teach a wrong label
        raise ValueError(f"not a shapes-world caption (read {len(found)} objects): {text!r}")
    return found


def shape_points(kind, cx, cy, r):
    if kind == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    # 5-pointed star: alternate outer and inner radius, first point straight up.
    return [(cx + rad * np.sin(k * np.pi / 5), cy - rad * np.cos(k * np.pi / 5))
            for k, rad in ((k, r if k % 2 == 0 else r * 0.45) for k in range(10))]


def render(objs, seed):
    rng = random.Random(seed)
    style = rng.random()
    bg = np.array(rng.choice(BACKGROUNDS), dtype=np.float32)
    if style < 0.4:      # solid
        canvas = np.broadcast_to(bg, (IMG, IMG, 3))
    elif style < 0.75:   # gentle linear gradient towards another light tint
        other = np.array(rng.choice(BACKGROUNDS), dtype=np.float32)
        t = np.linspace(0, 1, IMG, dtype=np.float32)
        t = t[:, None, None] if rng.random() < 0.5 else t[None, :, None]
        canvas = np.broadcast_to(bg + (other - bg) * t, (IMG, IMG, 3))
    else:                # soft low-frequency blotches; per-pixel noise would bloat the PNGs
        nrng = np.random.default_rng(rng.getrandbits(32))
        low = nrng.uniform(-8, 8, size=(7, 7)).astype(np.float32)
        up = np.asarray(Image.fromarray(low).resize((IMG, IMG), Image.BICUBIC))
        canvas = bg + up[..., None]
    # The background is built at 1x (cheap) and only the shapes are drawn at 2x.
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    img = img.resize((IMG * SCALE, IMG * SCALE), Image.NEAREST)
    draw = ImageDraw.Draw(img)
    cell = IMG / 3
    for kind, colour, where, sz in objs:
        row, col = divmod(CELLS.index(where), 3)
        # Small jitter so positions are not pixel-identical, but the shape stays inside its cell.
        cx = ((col + 0.5) * cell + rng.uniform(-JITTER, JITTER)) * SCALE
        cy = ((row + 0.5) * cell + rng.uniform(-JITTER, JITTER)) * SCALE
        r = SIZES[sz] / 2 * SCALE
        fill = COLORS[colour]
        if kind == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif kind == "square":
            draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(shape_points(kind, cx, cy, r), fill=fill)
    return img.reduce(SCALE)  # box-filter downsample = anti-aliased edges


def render_to(job):
    """Draw one image and write it. PNG's fastest level: it compresses these flat colours half as well
    (4 KB an image instead of 3) in half the time, and the pixels are the same."""
    objs, seed, path = job
    render(objs, seed).save(path, compress_level=1)


def written(qtype, question, answer, color_answers="sentence"):
    """An answer as the data writes it: a colour answer as a sentence that names the shape first
    ("The star is red."), unless color_answers is "word"; every other answer as it is."""
    if qtype != "color" or color_answers == "word":
        return answer
    return f"The {subject(qtype, question)[1][0]} is {answer}."


def sample(name, turns, qtype=None):
    conv = []
    for k, (q, a) in enumerate(turns):
        conv += [{"role": "user", "content": ("<image>\n" if k == 0 else "") + q},
                 {"role": "assistant", "content": a}]
    rec = {"conversations": conv, "image": name}
    if qtype:
        rec["type"] = qtype
    return rec


def subject(qtype, question):
    """What a question asks about, whatever its template: ("color", ("star",)) for both colour templates."""
    return qtype, tuple(w for w in question.rstrip("?").split() if w in COLORS or w in SHAPES)


def follow_ups(rng, objs, qtype, first, n_turns):
    """Up to n_turns distinct questions about one layout: `first`, then other types in turn, each
    type again (about another object) once all have been asked, but none more than `cap` times,
    so yes/no questions (always askable) do not crowd out the rest. -> (turns, types)

    The other types come in a random order, but count, which the caption states outright ("There
    are 2 shapes: ..."), comes last: with fewer turns than types it is the one left out, unless the
    others run out of things to ask (two purple squares), and the turns go to the look-ups
    (docs/demo-experiments.md)."""
    turns, types, asked = [first], [qtype], {subject(qtype, first[0])}
    cap = -(-n_turns // len(TYPES)) + 1
    order = sorted(rng.sample([t for t in TYPES if t != qtype], len(TYPES) - 1), key=lambda t: t == "count")
    order += [qtype]
    for k in range(8 * n_turns):  # a few tries per turn: a type may have nothing new to ask
        if len(turns) >= n_turns:
            break
        t = order[k % len(order)]
        if types.count(t) >= cap:
            continue
        qa = make_question(rng, objs, t)
        if qa and (about := subject(t, qa[0])) not in asked:
            asked.add(about)
            turns.append(qa)
            types.append(t)
    return turns, types


def type_schedule(n, question_mix=None):
    """The first question's type of each of n images: evenly, or in proportion to question_mix (one
    weight per TYPES entry), counts rounded so that they add up to n."""
    if question_mix is None:
        return [TYPES[i % len(TYPES)] for i in range(n)]
    share = [n * w / sum(question_mix) for w in question_mix]
    counts = [int(s) for s in share]
    for k in sorted(range(len(TYPES)), key=lambda k: counts[k] - share[k])[:n - sum(counts)]:
        counts[k] += 1  # the largest remainders take what rounding down left over
    return [t for t, c in zip(TYPES, counts) for _ in range(c)]


def plan_split(rng, n, split, forbidden=frozenset(), sft_turns=5, object_mix=None, question_mix=None):
    """Decide layouts and questions for one split (cheap; rendering happens later). object_mix: the
    relative weights of 1, 2 and 3 objects per image (None: evenly); question_mix: of the first
    question's type (None: evenly)."""
    schedule = type_schedule(n, question_mix)
    rng.shuffle(schedule)
    plans = []
    for i, qtype in enumerate(schedule):
        n_obj = rng.choices((1, 2, 3), object_mix)[0] if object_mix else rng.randint(1, 3)
        for attempt in range(10000):
            if attempt == 200:  # all layouts of this size already used in train: allow another size
                n_obj = rng.randint(1, 3)
            objs = random_layout(rng, n_obj)
            qa = make_question(rng, objs, qtype)
            # A lone object's layout may repeat a training one: the world has only 648 of them (shape x
            # colour x cell x size) and 9000 training images show nearly all, so held to new ones the
            # held-out lone objects would be a handful of layouts, each asked about a hundred times.
            # Their pixels are new all the same (each image draws its own jitter).
            if qa and (n_obj == 1 or layout_signature(objs) not in forbidden):
                break
        else:
            raise RuntimeError("could not find a test layout unseen in train; lower --n_train")
        turns, types = [qa], [qtype]
        if split == "train":  # follow-ups: 196 image tokens are paid once for several answers
            turns, types = follow_ups(rng, objs, qtype, qa, sft_turns)
        name = f"{split}_{i + 1:06d}.png"
        plans.append(dict(name=name, objs=objs, turns=turns, types=types, type=qtype, seed=rng.getrandbits(64)))
    return plans


def generate(out_dir="dataset/demo", seed=0, n_train=3000, n_test=300, test_seed=None, verbose=True, sft_turns=5,
             caption_order="random", object_mix=None, question_mix=None, color_answers="sentence", workers=1):
    if caption_order not in ("random", "reading"):
        raise ValueError(f"caption_order is 'random' or 'reading', not {caption_order!r}")
    if color_answers not in COLOR_ANSWERS:
        raise ValueError(f"color_answers is one of {COLOR_ANSWERS}, not {color_answers!r}")
    if object_mix is not None and (len(object_mix) != 3 or min(object_mix) < 0 or sum(object_mix) <= 0):
        raise ValueError(f"object_mix is three weights, for 1, 2 and 3 objects, not {object_mix!r}")
    if question_mix is not None and (len(question_mix) != len(TYPES) or min(question_mix) < 0
                                     or sum(question_mix) <= 0):
        raise ValueError(f"question_mix is {len(TYPES)} weights, for {', '.join(TYPES)}, not {question_mix!r}")
    t0 = time.time()
    test_seed = seed + 1000 if test_seed is None else test_seed
    img_dir = os.path.join(out_dir, "images")
    os.makedirs(img_dir, exist_ok=True)
    for old in glob.glob(os.path.join(img_dir, "train_*.png")) + glob.glob(os.path.join(img_dir, "test_*.png")):
        os.remove(old)  # stale images from an earlier, larger run would silently linger
    train = plan_split(random.Random(seed), n_train, "train", sft_turns=sft_turns, object_mix=object_mix,
                       question_mix=question_mix)
    train_sigs = {layout_signature(p["objs"]) for p in train}
    test = plan_split(random.Random(test_seed), n_test, "test", forbidden=train_sigs)
    jobs = [(p["objs"], p["seed"], os.path.join(img_dir, p["name"])) for p in train + test]
    # Each image is a function of its layout and seed alone, so workers draw them in any order. They are
    # fresh processes (spawn), not forks: a fork of a process that has threads running (torch's, a test
    # runner's) can inherit a lock held by one of them and wait on it forever.
    spawn = multiprocessing.get_context("spawn")
    with spawn.Pool(workers) if workers > 1 else contextlib.nullcontext() as pool:
        for k, _ in enumerate(pool.imap_unordered(render_to, jobs, chunksize=50) if pool else map(render_to, jobs)):
            if verbose and (k + 1) % 500 == 0:
                print(f"  rendered {k + 1}/{len(jobs)} images", flush=True)
    cap_rng = random.Random(seed + 1)
    files = {
        "pretrain.jsonl": [sample(p["name"], [(cap_rng.choice(CAPTION_PROMPTS),
                                               caption(p["objs"], cap_rng if caption_order == "random" else None))])
                           for p in train],
        **{f"{split}.jsonl": [sample(p["name"], [(q, written(t, q, a, color_answers)) for (q, a), t in
                                                zip(p["turns"], p["types"])], p["type"]) for p in plans]
           for split, plans in (("sft", train), ("test", test))},
    }
    for fname, recs in files.items():
        with open(os.path.join(out_dir, fname), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in recs)
    summary = {
        "out_dir": out_dir, "train_images": len(train), "test_images": len(test),
        "sft_samples_by_type": dict(Counter(p["type"] for p in train)),
        "sft_questions_by_type": dict(Counter(t for p in train for t in p["types"])),
        "sft_multi_turn": sum(len(p["turns"]) > 1 for p in train),
        "train_images_by_objects": dict(sorted(Counter(len(p["objs"]) for p in train).items())),
        "test_by_type": dict(Counter(p["type"] for p in test)),
        "seconds": round(time.time() - t0, 1),
    }
    if verbose:
        print(json.dumps(summary, indent=2))
    return summary


def main():
    ap = make_parser("Generate the shapes-world demo dataset (MiniMind-V jsonl + images).")
    ap.add_argument("--out_dir", default="dataset/demo", help="output directory (gets images/ and *.jsonl)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training split")
    ap.add_argument("--n_train", type=int, default=3000, help="number of training images (1 caption + 1 SFT sample each)")
    ap.add_argument("--n_test", type=int, default=300, help="number of held-out test images/questions")
    ap.add_argument("--test_seed", type=int, default=None, help="seed of the test split (default: seed + 1000)")
    ap.add_argument("--sft_turns", type=int, default=5,
                    help="questions per SFT training image, all about different things (fewer where the "
                         "image offers fewer; test samples have one)")
    ap.add_argument("--caption_order", default="random", choices=["random", "reading"],
                    help="the order a caption lists its objects in: random makes writing it practise the "
                         "questions' look-ups (docs/demo-experiments.md)")
    ap.add_argument("--color_answers", default="sentence", choices=COLOR_ANSWERS,
                    help='a colour answer as "The star is red." (the shape named first), or as "red" '
                         "(docs/demo-experiments.md)")
    ap.add_argument("--object_mix", type=float, nargs=3, default=None, metavar=("ONE", "TWO", "THREE"),
                    help="relative weights of 1, 2 and 3 objects in a training image (default: even); "
                         "held-out images always draw them evenly")
    ap.add_argument("--question_mix", type=float, nargs=len(TYPES), default=None,
                    metavar=tuple(t.upper() for t in TYPES),
                    help="relative weights of the first question's type in training (default: even); "
                         "held-out questions are always even")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes drawing the images (default: one per core); the images are the same with any")
    a = ap.parse_args()
    try:
        generate(a.out_dir, a.seed, a.n_train, a.n_test, a.test_seed, sft_turns=a.sft_turns,
                 caption_order=a.caption_order, object_mix=a.object_mix, question_mix=a.question_mix,
                 color_answers=a.color_answers, workers=max(1, a.workers))
    except ValueError as e:  # a mix of weights that draws nothing
        sys.exit(f"error: {e}")
    except OSError as e:  # a read-only or full disk, a file where the folder should be
        sys.exit(f"error: cannot write the demo data to {a.out_dir}: {e.strerror or e}; pass another --out_dir")


if __name__ == "__main__":
    main()
