"""Tests for the shapes-world demo dataset generator and the demo vision tower."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import importlib.util
import json
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT_DIR = Path(__file__).resolve().parent.parent


def _load(name):
    folder = "dev" if name == "probe_tower" else "demo"
    spec = importlib.util.spec_from_file_location(name, ROOT_DIR / folder / f"{name}.py")
    mod = sys.modules[name] = importlib.util.module_from_spec(spec)  # as imported: its workers find its functions
    spec.loader.exec_module(mod)
    return mod


shapes = _load("make_shapes_data")
tower = _load("make_demo_vision_tower")

N_TRAIN, N_TEST = 150, 50
FILES = ("pretrain.jsonl", "sft.jsonl", "test.jsonl")


def _read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    shapes.generate(str(out), seed=0, n_train=N_TRAIN, n_test=N_TEST, verbose=False)
    return out


def test_deterministic_and_seed_sensitive_whatever_the_number_of_drawing_processes(data_dir, tmp_path):
    again = tmp_path / "again"
    shapes.generate(str(again), seed=0, n_train=N_TRAIN, n_test=N_TEST, verbose=False, workers=2)
    for f in FILES:
        assert (data_dir / f).read_text() == (again / f).read_text(), f
    names = sorted(os.listdir(data_dir / "images"))
    assert names == sorted(os.listdir(again / "images"))
    assert len(names) == N_TRAIN + N_TEST
    for n in names:
        assert (data_dir / "images" / n).read_bytes() == (again / "images" / n).read_bytes(), n

    other = tmp_path / "other"
    shapes.generate(str(other), seed=1, n_train=N_TRAIN, n_test=N_TEST, verbose=False)
    assert (other / "sft.jsonl").read_text() != (data_dir / "sft.jsonl").read_text()
    assert (other / "images" / "train_000001.png").read_bytes() != (data_dir / "images" / "train_000001.png").read_bytes()


def test_held_out_layouts_of_two_or_three_objects_are_new_and_lone_objects_are_many_layouts():
    # Use the planning step directly so the layouts are known without parsing captions.
    import random
    train = shapes.plan_split(random.Random(0), 9000, "train")
    sigs = {shapes.layout_signature(p["objs"]) for p in train}
    test = shapes.plan_split(random.Random(1000), 1500, "test", forbidden=sigs)
    assert not {p["name"] for p in train} & {p["name"] for p in test}
    several = [p for p in test if len(p["objs"]) > 1]
    assert several and not any(shapes.layout_signature(p["objs"]) in sigs for p in several)
    # 9000 training images show nearly every one of the 648 lone-object layouts; the held-out lone
    # objects are still a third of the images, spread over many layouts, not the handful left unseen.
    lone = [shapes.layout_signature(p["objs"]) for p in test if len(p["objs"]) == 1]
    assert len({s for s in sigs if len(s) == 1}) > 600
    assert 400 < len(lone) < 600 and len(set(lone)) > 250


def test_layout_signature_is_order_independent():
    a = [("circle", "red", "top", "small"), ("star", "blue", "left", "large")]
    assert shapes.layout_signature(a) == shapes.layout_signature(a[::-1])
    assert shapes.layout_signature(a) != shapes.layout_signature([a[0]])


def test_released_format(data_dir):
    train_names, test_names = set(), set()
    for f in FILES:
        recs = _read(data_dir / f)
        assert len(recs) == (N_TEST if f == "test.jsonl" else N_TRAIN)
        for r in recs:
            conv = r["conversations"]
            assert isinstance(conv, list) and len(conv) >= 2 and len(conv) % 2 == 0
            for k, turn in enumerate(conv):
                assert set(turn) == {"role", "content"}
                assert turn["role"] == ("user" if k % 2 == 0 else "assistant")
                assert isinstance(turn["content"], str) and turn["content"].strip()
            assert conv[0]["content"].startswith("<image>\n")
            images = r["image"].split(",")
            assert sum(t["content"].count("<image>") for t in conv) == len(images)
            for name in images:
                path = data_dir / "images" / name.strip()
                assert path.exists(), path
                with Image.open(path) as im:
                    assert im.size == (224, 224) and im.mode == "RGB"
            if f == "test.jsonl":
                assert len(conv) == 2 and r["type"] in shapes.TYPES
                test_names.add(r["image"])
            else:
                train_names.add(r["image"])
            if f == "sft.jsonl":
                assert r["type"] in shapes.TYPES
    assert not train_names & test_names
    assert all(n.startswith("train_") for n in train_names) and all(n.startswith("test_") for n in test_names)
    assert any(len(r["conversations"]) > 2 for r in _read(data_dir / "sft.jsonl"))


def test_types_and_answers(data_dir):
    for f in ("sft.jsonl", "test.jsonl"):
        recs = _read(data_dir / f)
        counts = Counter(r["type"] for r in recs)
        assert set(counts) == set(shapes.TYPES)
        assert max(counts.values()) - min(counts.values()) <= 1  # balanced schedule
        for r in recs:
            # the first answer belongs to the recorded type; follow-ups must be valid for some type
            assert r["conversations"][1]["content"] in shapes.ANSWERS[r["type"]]
            for turn in r["conversations"][3::2]:
                assert any(turn["content"] in a for a in shapes.ANSWERS.values())
    # pretrain captions mention every object; check the object count is stated
    for r in _read(data_dir / "pretrain.jsonl"):
        assert r["conversations"][1]["content"].startswith("There ")
    # exists answers are roughly balanced (over a larger plan for a stable ratio)
    import random
    plans = shapes.plan_split(random.Random(3), 1000, "train")
    answers = Counter(a for p in plans for t, (_, a) in zip(p["types"], p["turns"]) if t == "exists")
    assert 0.4 < answers["yes"] / (answers["yes"] + answers["no"]) < 0.6


def test_a_caption_reads_back_to_its_objects_and_a_caption_missing_one_is_refused():
    rng = random.Random(0)
    for _ in range(500):
        objs = shapes.random_layout(rng, rng.randint(1, 3))
        assert sorted(shapes.parse_caption(shapes.caption(objs))) == sorted(objs)
    with pytest.raises(ValueError, match="read 1 objects"):
        shapes.parse_caption("There are 2 shapes: a small red star at the top left.")


def test_captions_list_their_objects_in_a_random_order_unless_reading_order_is_asked_for():
    rng, orders = random.Random(0), Counter()
    for _ in range(300):
        objs = shapes.random_layout(rng, 3)
        reading = sorted(objs, key=lambda o: shapes.CELLS.index(o[2]))
        assert shapes.caption(objs) == shapes.caption(reading)  # no rng: reading order
        text = shapes.caption(objs, rng)
        assert sorted(shapes.parse_caption(text)) == sorted(objs)
        said = shapes.parse_caption(text)  # in the order the caption says them
        orders[tuple(reading.index(o) for o in said)] += 1
    assert len(orders) == 6 and min(orders.values()) > 20  # every order of three objects, about evenly


def test_a_colour_answer_names_the_shape_asked_about_first_unless_words_are_asked_for(tmp_path):
    summary = shapes.generate(str(tmp_path / "s"), seed=1, n_train=40, n_test=20, verbose=False)
    words = shapes.generate(str(tmp_path / "w"), seed=1, n_train=40, n_test=20, verbose=False, color_answers="word")
    assert summary["sft_questions_by_type"] == words["sft_questions_by_type"]  # the same questions
    for f in ("sft.jsonl", "test.jsonl"):
        for sentence, word in zip(_read(tmp_path / "s" / f), _read(tmp_path / "w" / f)):
            for q, a, w in zip(sentence["conversations"][::2], sentence["conversations"][1::2],
                               word["conversations"][1::2]):
                if "color" in q["content"]:
                    shape = q["content"].rstrip("?").split()[-1]
                    assert w["content"] in shapes.COLORS and a["content"] == f"The {shape} is {w['content']}."
                else:
                    assert a == w
    with pytest.raises(ValueError, match="color_answers"):
        shapes.generate(str(tmp_path / "x"), n_train=4, n_test=2, verbose=False, color_answers="shout")


def test_questions_only_about_unique_subjects():
    import random
    rng = random.Random(0)
    objs = [("circle", "red", "top", "small"), ("circle", "blue", "left", "large")]
    # both objects are circles -> "What color is the circle?" is ambiguous and must not be asked
    assert shapes.make_question(rng, objs, "color") is None
    q, a = shapes.make_question(rng, objs, "shape")
    assert a == "circle"
    same = [("circle", "red", "top", "small"), ("circle", "red", "left", "large")]
    assert shapes.make_question(rng, same, "position") is None
    for _ in range(50):
        q, a = shapes.make_question(rng, objs, "exists")
        named = tuple(q.rstrip("?").split()[-2:])  # (colour, shape)
        assert (a == "yes") == ((named[1], named[0]) in {(o[0], o[1]) for o in objs})


def test_more_sft_turns_ask_more_questions_never_the_same_thing_twice():
    import random
    for plan in shapes.plan_split(random.Random(5), 300, "train", sft_turns=10):
        subjects = [shapes.subject(t, q) for t, (q, _) in zip(plan["types"], plan["turns"])]
        assert len(subjects) == len(set(subjects))  # "What color is the star?" is asked once, in any wording
        assert len(plan["turns"]) >= 4 and plan["types"].count("count") == 1
    # three objects usually offer enough to ask about for all ten turns
    three = [p for p in shapes.plan_split(random.Random(5), 300, "train", sft_turns=10) if len(p["objs"]) == 3]
    assert sum(len(p["turns"]) == 10 for p in three) > 0.6 * len(three)


def test_with_four_turns_the_question_left_out_is_count_which_the_captions_state():
    plans = shapes.plan_split(random.Random(5), 600, "train", sft_turns=4)
    lone = [plan for plan in plans if len(plan["objs"]) == 1 and plan["type"] != "count"]
    assert lone and all(sorted(plan["types"]) == sorted(set(shapes.TYPES) - {"count"}) for plan in lone)
    # (where other types run out of things to ask, as with two purple squares, count does follow up)
    asked = Counter(t for plan in plans for t in plan["types"])
    assert asked["count"] < 0.4 * min(asked[t] for t in shapes.TYPES if t != "count")


def test_the_object_mix_weights_training_images_while_held_out_ones_stay_even(tmp_path):
    summary = shapes.generate(str(tmp_path), seed=0, n_train=200, n_test=60, verbose=False, object_mix=(0, 1, 3))
    assert set(summary["train_images_by_objects"]) == {2, 3}
    assert summary["train_images_by_objects"][3] > 2 * summary["train_images_by_objects"][2]
    held_out = Counter(len(p["objs"]) for p in shapes.plan_split(random.Random(1000), 60, "test"))
    assert set(held_out) == {1, 2, 3}  # the held-out split is planned without the mix
    with pytest.raises(ValueError, match="three weights"):
        shapes.generate(str(tmp_path), object_mix=(0, 0, 0), verbose=False)


def test_the_question_mix_weights_the_first_question_of_training_images_while_held_out_ones_stay_even(tmp_path):
    summary = shapes.generate(str(tmp_path), seed=0, n_train=100, n_test=50, verbose=False,
                              question_mix=(3, 0, 1, 0, 1))
    assert summary["sft_samples_by_type"] == {"color": 60, "position": 20, "exists": 20}
    assert summary["test_by_type"] == {t: 10 for t in shapes.TYPES}
    assert Counter(shapes.type_schedule(7, (1, 1, 1, 1, 3))) == {"exists": 3, "color": 1, "shape": 1,
                                                                 "position": 1, "count": 1}
    with pytest.raises(ValueError, match="5 weights"):
        shapes.generate(str(tmp_path), question_mix=(1, 1), verbose=False)


def _pixels(d):
    from model.images import load_processor
    proc = load_processor(d)
    img = Image.new("RGB", (224, 224), (240, 240, 240))
    x = proc(images=img, return_tensors="pt")["pixel_values"]
    assert x.shape == (1, 3, 224, 224)
    return x


def test_demo_vision_tower(tmp_path):
    from transformers import CLIPVisionModel
    d = tmp_path / "tower"
    n = tower.build_vision_tower(str(d), hidden_size=32, num_layers=1, num_heads=2, verbose=False)
    assert n > 0
    model = CLIPVisionModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        h = model(pixel_values=_pixels(str(d))).last_hidden_state
    assert h.shape == (1, 197, 32)

    # deterministic given the seed
    d2 = tmp_path / "tower2"
    tower.build_vision_tower(str(d2), hidden_size=32, num_layers=1, num_heads=2, verbose=False)
    m2 = CLIPVisionModel.from_pretrained(str(d2))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), m2.state_dict().values()))

    # full CLIP directory: loads as a vision model with the same vision weights
    full = tmp_path / "full"
    tower.build_vision_tower(str(full), hidden_size=32, num_layers=1, num_heads=2, full_clip=True, verbose=False)
    assert json.loads((full / "config.json").read_text())["model_type"] == "clip"
    mf = CLIPVisionModel.from_pretrained(str(full)).eval()
    with torch.no_grad():
        hf = mf(pixel_values=_pixels(str(full))).last_hidden_state
    assert hf.shape == (1, 197, 32)
    assert torch.allclose(h, hf)


def test_the_demo_tower_takes_its_image_size_and_patch_into_its_processor_and_token_count(tmp_path):
    from model.images import load_processor, to_pixels
    from model.model_vlm import load_vision_tower, tower_token_count
    d = tmp_path / "tower"
    tower.build_vision_tower(str(d), hidden_size=32, num_layers=1, num_heads=2, patch_size=32, image_size=96,
                             verbose=False)
    pixels = to_pixels(load_processor(str(d)), [Image.new("RGB", (224, 224), (240, 240, 240))])
    assert pixels.shape == (1, 3, 96, 96)
    model = load_vision_tower(str(d))
    assert tower_token_count(model) == 9  # one token per cell of the 3x3 grid


def test_the_demo_and_both_tower_scripts_refuse_an_image_size_that_its_patches_do_not_tile(capsys, monkeypatch):
    from demo import parse_args  # demo/demo.py (conftest puts demo/ on the path)
    from train_demo_tower import parse_args as train_tower_args
    assert parse_args(["--image_size", "96", "--patch_size", "32"]).image_size == 96
    assert train_tower_args(["--image_size", "96", "--patch_size", "32"]).image_size == 96
    monkeypatch.setattr(sys, "argv", ["make_demo_vision_tower.py", "--image_size", "100", "--patch_size", "32"])
    for refuse in (lambda: parse_args(["--image_size", "100", "--patch_size", "32"]),
                   lambda: train_tower_args(["--image_size", "100", "--patch_size", "32"]), tower.main):
        with pytest.raises(SystemExit):
            refuse()
        assert "--image_size 100 is not a multiple of --patch_size 32" in capsys.readouterr().err


def test_both_tower_scripts_run_alone_build_the_towers_depth_that_the_demo_builds(capsys, monkeypatch):
    from demo import parse_args  # demo/demo.py
    from train_demo_tower import parse_args as train_tower_args
    depth = parse_args([]).tower_layers
    assert train_tower_args([]).num_layers == depth
    monkeypatch.setattr(sys, "argv", ["make_demo_vision_tower.py", "--help"])
    with pytest.raises(SystemExit):
        tower.main()
    assert re.search(rf"--num_layers NUM_LAYERS\s+transformer layers \(real ViT-B/16: 12\) \(default: {depth}\)",
                     capsys.readouterr().out)


@pytest.mark.slow
def test_building_and_training_the_demo_tower_prints_only_its_own_lines(data_dir, tmp_path):
    """No deepspeed "Setting accelerator to CPU" (save_pretrained's unwrapping of distributed
    wrappers imported deepspeed) and no transformers note about torchvision, at transformers'
    default verbosity, which the tests otherwise lower (conftest.py)."""
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_VERBOSITY"}
    small = ["--hidden_size", "32", "--num_layers", "1", "--num_heads", "2"]
    build = subprocess.run([sys.executable, "demo/make_demo_vision_tower.py", "--out_dir", str(tmp_path / "t"), *small],
                           cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0 and build.stderr == "", build.stderr
    assert build.stdout.startswith("saved random-init CLIPVisionModel") and build.stdout.count("\n") == 1
    train = subprocess.run([sys.executable, "demo/train_demo_tower.py", "--data_dir", str(data_dir), "--out_dir",
                            str(tmp_path / "trained"), "--steps", "2", "--batch_size", "4", *small],
                           cwd=ROOT_DIR, env=env, capture_output=True, text=True, timeout=300)
    assert train.returncode == 0 and train.stderr == "", train.stderr
    assert "trained the tower" in train.stdout and (tmp_path / "trained" / "model.safetensors").is_file()


def test_the_tower_stage_fills_the_trainers_feature_cache_with_the_features_training_computes(data_dir, tmp_path):
    """The tower stage ends by writing its tower's features where the trainers look them up, from the
    pixels it kept: what the trainer would compute for the same image, to bf16 rounding."""
    from dataset.feature_cache import image_key, open_cache_for
    from model.images import load_processor, open_image, to_pixels
    from model.model_vlm import load_vision_tower, tower_features
    from train_demo_tower import cache_features, read_captions, save_tower, train_tower
    items, kept = read_captions(str(data_dir)), {}
    trained, processor, _ = train_tower(items, 3, 4, dtype=torch.bfloat16, log=lambda line: None, kept=kept,
                                        hidden_size=32, num_layers=1, num_heads=2, patch_size=32)
    assert kept and trained.config._attn_implementation == "sdpa"  # trained with the plain one, handed back as it was
    save_tower(trained, processor, str(tmp_path / "tower"))
    paths = [path for path, _ in items]
    assert cache_features(str(tmp_path / "tower"), paths, str(tmp_path / "cache"), torch.bfloat16, kept) == N_TRAIN
    assert cache_features(str(tmp_path / "tower"), paths, str(tmp_path / "cache"), torch.bfloat16) == 0  # all there

    tower = load_vision_tower(str(tmp_path / "tower")).to(torch.bfloat16)  # as the trainer loads it
    cache = open_cache_for(tower, load_processor(str(tmp_path / "tower")), str(tmp_path / "cache"))
    assert len(cache) == N_TRAIN
    for path in (paths[0], paths[-1]):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            fresh = tower_features(tower, to_pixels(processor, [open_image(path)]))[0].half()
        assert torch.allclose(cache.lookup(image_key(path)), fresh, atol=0.05, rtol=0.02)


def test_an_unreadable_image_ends_the_tower_stage_with_one_line_naming_it_and_the_fix(data_dir, tmp_path, monkeypatch):
    import shutil
    import train_demo_tower
    broken = tmp_path / "data"
    shutil.copytree(data_dir, broken)
    (broken / "images" / "train_000007.png").write_bytes(b"not a png")
    monkeypatch.setattr(sys, "argv", ["train_demo_tower.py", "--data_dir", str(broken), "--out_dir", str(tmp_path / "t"),
                                      "--steps", "1", "--batch_size", str(N_TRAIN), "--hidden_size", "32",
                                      "--num_layers", "1", "--num_heads", "2"])
    with pytest.raises(SystemExit) as stop:
        train_demo_tower.main()
    message = str(stop.value.code)
    assert message.startswith("error: ") and str(broken / "images" / "train_000007.png") in message
    assert "is not an image" in message and "make_shapes_data.py" in message


def test_demo_tower_patch_tokens_say_where_they_are(tmp_path):
    """With the library's 0.02 init the position signal drowns in the patch content; the demo
    tower's position embeddings are as strong as the content, so a flat image's patch tokens
    differ by position about as much as tokens of different content do."""
    import torch
    from transformers import CLIPVisionModel
    from make_demo_vision_tower import build_vision_tower
    stds = {}
    for std in (0.02, 1.0):
        build_vision_tower(str(tmp_path / str(std)), hidden_size=64, num_layers=1, num_heads=2, position_std=std,
                           verbose=False)
        tower = CLIPVisionModel.from_pretrained(str(tmp_path / str(std)))
        with torch.no_grad():
            blank = torch.full((1, 3, 224, 224), 1.5)  # a flat light background, after CLIP normalisation
            tokens = tower(pixel_values=blank).last_hidden_state[0, 1:]
        stds[std] = tokens.std(0).mean().item()  # how much tokens vary across the 196 positions
    assert stds[1.0] > 10 * stds[0.02]


def test_tower_probe_reads_the_one_object_captions_and_scores_a_linear_probe(data_dir):
    probe = _load("probe_tower")
    items = probe.one_object_images(str(data_dir), limit=1000)
    captions = [r["conversations"][1]["content"] for r in _read(data_dir / "pretrain.jsonl")]
    assert len(items) == sum(c.startswith("There is 1 shape") for c in captions) > 20
    for path, colour, shape, cell in items:
        assert os.path.isfile(path) and colour in shapes.COLORS and shape in shapes.SHAPES and cell in shapes.CELLS
    # the probe itself: separable classes score ~1, labels unrelated to the features score ~chance
    torch.manual_seed(0)
    labels = [i % 3 for i in range(300)]
    separable = torch.randn(300, 16) + 4 * torch.nn.functional.one_hot(torch.tensor(labels), 16)
    assert probe.probe_accuracy(separable, labels) > 0.95
    assert probe.probe_accuracy(torch.randn(300, 16), labels) < 0.6


def test_a_captions_length_gives_its_object_count_so_the_demo_trains_in_shuffled_batches(data_dir):
    """Batches grouped by length would each hold one number of objects (one kind of scene), and
    the look-ups the questions need then stall near 0.70 (docs/demo-experiments.md)."""
    by_count = {}
    for rec in _read(data_dir / "pretrain.jsonl"):
        caption = rec["conversations"][-1]["content"]
        by_count.setdefault(len(shapes.parse_caption(caption)), []).append(len(caption))
    # Every 3-object caption is longer than every 2-object one, and those than every 1-object one.
    assert max(by_count[1]) < min(by_count[2]) and max(by_count[2]) < min(by_count[3])
    demo = _load("demo")
    args = demo.train_args(demo.parse_args([]), "pretrain")  # its defaults
    assert args[args.index("--group_by_length") + 1] == "0"


def test_the_demo_gives_pretraining_its_head_layout_and_questions_take_the_checkpoints():
    demo = _load("demo")
    default = demo.train_args(demo.parse_args([]), "pretrain")
    assert "--n_heads" not in default and default[default.index("--head_dim") + 1] == "64"  # 8 heads, 64 wide
    assert default[default.index("--n_layers") + 1] == "3"  # the LLM's depth of the README's table
    assert "--head_dim" not in demo.train_args(demo.parse_args(["--generation", "minimind2"]), "pretrain")
    wide = demo.parse_args(["--n_heads", "4", "--n_kv_heads", "2", "--head_dim", "48"])
    pretrain = demo.train_args(wide, "pretrain")
    flags = ("n_heads", "n_kv_heads", "head_dim")
    assert [pretrain[pretrain.index(f"--{flag}") + 1] for flag in flags] == ["4", "2", "48"]
    sft = demo.train_args(wide, "sft")
    assert "--n_heads" not in sft and "--head_dim" not in sft  # SFT starts from the pretrained weights, their layout


@pytest.mark.slow
def test_the_tower_stage_teaches_a_tower_the_shapes_that_heads_on_a_random_one_do_not_read(tmp_path):
    """The tower stage's fast proxy, at a tenth of its cost (a tower half as wide with 2 layers, 300 steps
    of 32 out of 1200 images): linear heads read the shape of each held-out cell's object off the trained
    tower at about 0.5, and off the random tower it starts from, the heads trained alone, at about 0.25,
    which is chance among four shapes. The demo's own tower stage reads 0.98."""
    from model.precision import resolve_dtype
    from train_demo_tower import read_captions, train_tower
    shapes.generate(str(tmp_path), seed=0, n_train=1200, n_test=10, verbose=False, workers=2)
    items = read_captions(str(tmp_path))
    small = dict(lr=1e-3, dtype=resolve_dtype("auto", "cpu")[0], log=lambda line: None, hidden_size=128,
                 num_layers=2, num_heads=4, patch_size=32, image_size=224)
    heads_on_random = train_tower(items, 300, frozen=True, **small)[2]
    trained = train_tower(items, 300, **small)[2]
    assert heads_on_random["shape"] < 0.4 < trained["shape"]
    assert trained["colour"] > 0.95
