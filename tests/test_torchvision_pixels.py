"""Pixels do not depend on torchvision. transformers 5 picks the torchvision form of an image
processor wherever torchvision is installed (most GPU machines), and that form computes other
pixels. Every entry point here asks for the PIL form, so training, the feature cache, eval, the web
demo, the API and the exported chat() see the same tensor with and without torchvision, and a
feature cache built on one machine is hit on the other.

The second environment is a virtualenv with torchvision whose python MINIMIND_TORCHVISION_PYTHON
names (.ci/run builds it); without it these tests are skipped."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, TINY_LLM, read_log, script_flags

TORCHVISION_PYTHON = os.environ.get("MINIMIND_TORCHVISION_PYTHON")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not TORCHVISION_PYTHON, reason="MINIMIND_TORCHVISION_PYTHON (a python with torchvision; .ci/run sets it) unset")]


def hostile_images(folder):
    """The four kinds that go wrong when a pipeline skips a step: an EXIF-rotated JPEG, a palette
    PNG with a transparent colour, a 16-bit greyscale PNG and a CMYK JPEG."""
    from skimage import data
    os.makedirs(folder)
    photo = Image.fromarray(data.astronaut()).resize((96, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: "rotate 90 clockwise to view"
    photo.transpose(Image.Transpose.ROTATE_90).save(os.path.join(folder, "exif.jpg"), exif=exif, quality=90)
    palette = photo.quantize(16)
    palette.info["transparency"] = 0
    palette.save(os.path.join(folder, "palette.png"), transparency=0)
    grey16 = (np.asarray(Image.fromarray(data.camera()).resize((80, 80)), dtype=np.uint16) * 257)
    Image.fromarray(grey16).save(os.path.join(folder, "grey16.png"))
    photo.convert("CMYK").save(os.path.join(folder, "cmyk.jpg"), quality=90)
    return sorted(os.listdir(folder))


@pytest.fixture(scope="module")
def setup(tower_dir, tmp_path_factory):
    from convert_model import export_hf
    from model.checkpoint import llm_state_dict
    from model.model_vlm import MiniMindVLM, VLMConfig
    from model.record import make_record, write_record
    root = tmp_path_factory.mktemp("pixels")
    names = hostile_images(str(root / "images"))
    with open(root / "data.jsonl", "w") as f:
        for name in names:
            f.write(json.dumps({"image": name, "conversations": [
                {"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "a photo"}]})
                + "\n")
    os.symlink(tower_dir, root / "tower")
    torch.manual_seed(0)
    config = VLMConfig(vision_model_path=tower_dir, **TINY_LLM)
    torch.save(llm_state_dict(MiniMindVLM(config)), root / "w.pth")
    write_record(make_record(config, os.path.join(ROOT, "model"), tower_dir), str(root / "w.pth"))
    export_hf(str(root / "w.pth"), str(root / "hf"), os.path.join(ROOT, "model"), tower_dir)
    return root, names


def run(python, *args):
    proc = subprocess.run([python, *map(str, args)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def pixels(setup):
    """{"without": ..., "with": ...}: what tests/pixel_paths.py saved in each environment."""
    root, _ = setup
    out = {}
    for env, python in (("without", sys.executable), ("with", TORCHVISION_PYTHON)):
        run(python, os.path.join(ROOT, "tests", "pixel_paths.py"), root, root / f"{env}.pt")
        out[env] = torch.load(root / f"{env}.pt")
    return out


def test_the_second_environment_has_torchvision_and_its_default_processor_computes_other_pixels(pixels, setup):
    _, names = setup
    assert pixels["without"]["torchvision"] is None and pixels["with"]["torchvision"]
    assert pixels["with"]["default_processor"] != pixels["without"]["default_processor"]
    # so the comparison below can fail: left to transformers, the two machines disagree
    assert any(not torch.equal(pixels["with"]["default"][n], pixels["without"]["default"][n]) for n in names)


@pytest.mark.parametrize("name", ["exif.jpg", "palette.png", "grey16.png", "cmyk.jpg"])
def test_every_entry_point_gives_the_same_pixels_with_and_without_torchvision(pixels, name):
    reference = pixels["without"]["pixels"][name]["training"]
    assert reference.shape == (1, 3, 224, 224)
    for env in ("without", "with"):
        for entry, tensor in pixels[env]["pixels"][name].items():
            assert torch.equal(tensor, reference), f"{entry} ({env} torchvision)"


def test_a_cache_built_without_torchvision_is_hit_by_training_with_it(setup, tower_dir, tmp_path):
    root, names = setup
    cache = tmp_path / "cache"
    run(sys.executable, os.path.join(ROOT, "scripts", "cache_features.py"), "--data_path", root / "data.jsonl",
        "--images_path", root / "images", "--cache_dir", cache, "--vision_model_path", tower_dir,
        "--dtype", "float32", "--num_workers", 0)

    def rows():
        (tower_id,) = os.listdir(cache)  # one tower identity: the same processor settings on both
        return sum(len(open(cache / tower_id / f).readlines()) for f in os.listdir(cache / tower_id)
                   if f.endswith(".idx"))
    assert rows() == len(names)
    data = (str(root / "data.jsonl"), str(root / "images"))
    proc = run(TORCHVISION_PYTHON, os.path.join(ROOT, "train_pretrain_vlm.py"),
               *script_flags(data, tower_dir, tmp_path / "out", from_weight="none", epochs=2, batch_size=2,
                             dtype="float32", tokenizer_path="model"), "--cache_features", cache)
    assert f"{len(names)} images cached" in proc.stdout
    assert rows() == len(names)  # every image of both epochs came from the cache: nothing was added
    assert len(read_log(tmp_path / "out" / "pretrain_vlm_64_log.jsonl")) >= 4  # 2 epochs of 2 steps, logged
