"""The one image pipeline (model/images.py): what every path of the repo turns a file or bytes into,
and how a bad image becomes a per-sample error."""
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from model.images import ImageError, open_image, to_pixels
from dataset.vlm_dataset import VLMDataset, collate_batch

from builders import exif_rotated_jpeg

IMG = 3


def bomb_png(path):
    """A few KB on disk, 100M pixels when decoded (PIL's limit is ~89M)."""
    Image.new("1", (10_000, 10_000)).save(path)


def write_jsonl(path, image_names):
    lines = [json.dumps({"conversations": [{"role": "user", "content": "<image>\nWhat is it?"},
                                           {"role": "assistant", "content": "a photo"}], "image": name})
             for name in image_names]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_exif_orientation_is_applied():
    buf = io.BytesIO()
    exif_rotated_jpeg(buf)
    im = open_image(buf.getvalue())
    assert im.size == (64, 32) and im.mode == "RGB"


def test_palette_alpha_and_greyscale_become_rgb_with_transparency_over_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent red
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert np.asarray(open_image(buf.getvalue()))[0, 0].tolist() == [255, 255, 255]
    for im in (Image.new("L", (4, 4), 100), Image.new("I;16", (4, 4), 100 * 256), Image.new("P", (4, 4)),
               Image.new("CMYK", (4, 4)), Image.new("LA", (4, 4), (100, 255))):
        buf = io.BytesIO()
        im.save(buf, format="TIFF" if im.mode in ("CMYK", "I;16") else "PNG")
        out = open_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (4, 4), im.mode
        if im.mode in ("L", "I;16", "LA"):
            assert np.asarray(out)[0, 0].tolist() == [100, 100, 100], im.mode


def test_bad_images_raise_a_readable_per_sample_error(tmp_path):
    bomb_png(tmp_path / "bomb.png")
    with pytest.raises(ImageError, match="bomb.png has too many pixels"):
        open_image(str(tmp_path / "bomb.png"))
    png = io.BytesIO()
    Image.new("RGB", (64, 64), "red").save(png, format="PNG")
    with pytest.raises(ImageError, match="corrupt or truncated"):
        open_image(png.getvalue()[:100])
    with pytest.raises(ImageError, match="not an image"):
        open_image(b"hello", name="notes.txt")
    with pytest.raises(ImageError, match="missing.png not found"):
        open_image(str(tmp_path / "missing.png"))
    assert isinstance(ImageError("x"), ValueError)  # callers that catch ValueError see it


def test_an_exif_rotated_photo_gives_the_same_pixels_in_training_eval_cache_and_serving(
        tmp_path, tower_dir, tokenizer, processor, tiny_vlm):
    import eval_vlm
    import trainer.build
    import trainer.distributed
    from builders import config
    from cache_features import Pixels
    from dataset.samples import open_source
    from model.inference import VLMChat
    upright = exif_rotated_jpeg(tmp_path / "phone.jpg")
    data = write_jsonl(tmp_path / "d.jsonl", ["phone.jpg"])
    reference = to_pixels(processor, [upright.convert("RGB")])  # what an upright file would give
    run = trainer.build.build_run(config(data_path=data, images_path=str(tmp_path), vision_model_path=tower_dir,
                                         dim=64, n_layers=2, num_workers=0, out_dir=str(tmp_path / "out"),
                                         tokenizer_path="model"),
                                  trainer.distributed.Cluster())
    training = run.loader.dataset[0]["pixel_values"]  # the trainer's own data pieces
    chat = VLMChat(tiny_vlm, tokenizer, processor)
    bench = chat.pixels(eval_vlm.load_images([str(tmp_path / "phone.jpg")]))  # eval_vlm.py --bench and folder mode
    cache_builder = Pixels(open_source(data, str(tmp_path)), [(0, 0, "d.jsonl:1")], processor)[0][None]
    serving = chat.pixels([open_image((tmp_path / "phone.jpg").read_bytes())])  # web demo and API: bytes in
    for pixels in (bench, cache_builder, serving):
        assert torch.equal(pixels, training)
    assert (training - reference).abs().mean() < 0.1  # upright, not sideways (JPEG rounding aside)
    sideways = to_pixels(processor, [Image.open(tmp_path / "phone.jpg").convert("RGB")])
    assert (training - sideways).abs().mean() > 5 * (training - reference).abs().mean()


def test_training_and_the_exported_chat_read_the_same_pixels_as_eval_whatever_backend_transformers_picks(
        tmp_path, tower_dir, tokenizer, monkeypatch):
    """transformers picks its torchvision form of an image processor wherever torchvision is installed,
    and it computes other pixels than the PIL form. Stand in for that form (a processor that
    normalises differently); training and the exported chat() must still see eval's pixels."""
    import transformers
    import trainer.build
    import trainer.distributed
    from convert_model import export_hf
    from model.images import load_processor
    from builders import config, make_checkpoint
    real = transformers.AutoImageProcessor.from_pretrained.__func__

    def backend_of_the_machine(cls, path, *args, **kwargs):
        if kwargs.get("backend") == "pil" or kwargs.get("use_fast") is False:
            return real(cls, path, *args, **kwargs)
        return real(cls, path, *args, image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])
    monkeypatch.setattr(transformers.AutoImageProcessor, "from_pretrained", classmethod(backend_of_the_machine))

    exif_rotated_jpeg(tmp_path / "phone.jpg")
    eval_pixels = to_pixels(load_processor(tower_dir), [open_image(str(tmp_path / "phone.jpg"))])
    data = write_jsonl(tmp_path / "d.jsonl", ["phone.jpg"])
    run = trainer.build.build_run(config(data_path=data, images_path=str(tmp_path), vision_model_path=tower_dir,
                                         dim=64, n_layers=2, num_workers=0, out_dir=str(tmp_path / "out"),
                                         tokenizer_path="model"),
                                  trainer.distributed.Cluster())
    assert torch.equal(run.loader.dataset[0]["pixel_values"], eval_pixels)

    make_checkpoint(tower_dir, str(tmp_path / "w.pth"))
    exported = transformers.AutoModelForCausalLM.from_pretrained(
        export_hf(str(tmp_path / "w.pth"), str(tmp_path / "hf"), tokenizer.name_or_path, tower_dir),
        trust_remote_code=True, dtype=torch.float32)
    seen = {}

    def generate(ids, pixel_values=None, **kwargs):
        seen["pixels"] = pixel_values
        return ids
    monkeypatch.setattr(exported, "generate", generate)
    for image in (str(tmp_path / "phone.jpg"), Image.open(tmp_path / "phone.jpg")):  # a path, or a PIL image
        exported.chat(image, "What is it?")
        assert torch.equal(seen["pixels"], eval_pixels)


def test_a_decompression_bomb_in_training_data_is_skipped_with_the_flag_and_stops_without(
        tmp_path, tokenizer, processor):
    bomb_png(tmp_path / "bomb.png")
    Image.new("RGB", (8, 8), "red").save(tmp_path / "ok.png")
    data = write_jsonl(tmp_path / "d.jsonl", ["ok.png", "bomb.png"])
    strict = VLMDataset(data, str(tmp_path), tokenizer, processor, IMG, 196)
    with pytest.raises(ValueError, match=r"d.jsonl:2: cannot read image: .*too many pixels.*--skip_bad_samples"):
        strict[1]
    lenient = VLMDataset(data, str(tmp_path), tokenizer, processor, IMG, 196, skip_bad_samples=True)
    batch = collate_batch([lenient[0], lenient[1]])
    assert batch["n_samples"] == 1 and "d.jsonl:2: cannot read image" in batch["skipped"][0]


def test_a_decompression_bomb_in_a_benchmark_names_its_line(tmp_path, tiny_vlm, tokenizer, processor):
    from eval_vlm import run_benchmark
    from model.inference import VLMChat
    bomb_png(tmp_path / "bomb.png")
    data = write_jsonl(tmp_path / "d.jsonl", ["bomb.png"])
    with pytest.raises(ValueError, match=r"d.jsonl:1: cannot read image: .*too many pixels"):
        run_benchmark(VLMChat(tiny_vlm, tokenizer, processor), data, str(tmp_path), progress=False)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/ABS/outside.png"])
def test_image_names_that_leave_the_image_folder_are_refused(tmp_path, tokenizer, processor, name):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    name = name.replace("/ABS", str(tmp_path))
    data = write_jsonl(tmp_path / "d.jsonl", [name])
    with pytest.raises(ValueError, match=r"d.jsonl:1: image name .* points outside --images_path"):
        VLMDataset(data, str(images), tokenizer, processor, IMG, 196)
    allowed = VLMDataset(data, str(images), tokenizer, processor, IMG, 196, allow_outside_images=True)
    assert allowed[0]["pixel_values"].shape[0] == 1


@pytest.mark.parametrize("name", ["out.png", "up/outside.png"])
def test_a_symlink_in_the_image_folder_that_leads_out_of_it_is_refused_like_a_dotdot_name(tmp_path, tokenizer,
                                                                                        processor, name):
    import os
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", images / "out.png")  # a file link
    os.symlink(tmp_path, images / "up")  # a folder link
    data = write_jsonl(tmp_path / "d.jsonl", [name])
    with pytest.raises(ValueError, match=rf"d.jsonl:1: image name '{name}' \(a link to {tmp_path / 'outside.png'}\) "
                                         rf"points outside --images_path {images} .*--allow_outside_images 1"):
        VLMDataset(data, str(images), tokenizer, processor, IMG, 196)
    allowed = VLMDataset(data, str(images), tokenizer, processor, IMG, 196, allow_outside_images=True)
    assert allowed[0]["pixel_values"].shape[0] == 1


def test_symlinks_that_stay_inside_the_image_folder_are_taken(tmp_path, tokenizer, processor):
    import os
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8), "red").save(images / "sub" / "red.png")
    os.symlink("sub/red.png", images / "in.png")
    os.symlink(images, tmp_path / "alias")  # the folder itself named through a link
    data = write_jsonl(tmp_path / "d.jsonl", ["in.png", "sub/red.png"])
    for folder in (images, tmp_path / "alias"):
        ds = VLMDataset(data, str(folder), tokenizer, processor, IMG, 196)
        assert [ds[i]["pixel_values"].shape[0] for i in range(2)] == [1, 1]


def test_scripts_without_allow_outside_images_refuse_such_names_without_offering_that_flag(tmp_path):
    import eval_vlm
    Image.new("RGB", (8, 8), "red").save(tmp_path / "outside.png")
    (tmp_path / "images").mkdir()
    data = write_jsonl(tmp_path / "d.jsonl", ["../outside.png"])
    with pytest.raises(ValueError) as error:  # eval_vlm.py --bench, as convert_data.py and cache_features.py read it
        eval_vlm.read_questions(data, str(tmp_path / "images"))
    assert "points outside --images_path" in str(error.value) and "--allow_outside_images" not in str(error.value)


def test_a_missing_data_file_is_named_with_the_argument_each_script_took_it_from(tmp_path):
    import eval_vlm
    import inspect_data
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"data file .*nope.jsonl not found \(set --bench\)$"):
        eval_vlm.read_questions(missing)
    with pytest.raises(SystemExit) as stop:
        inspect_data.main([missing])  # a positional argument: no flag to name
    assert str(stop.value.code) == f"error: data file {missing} not found"
    with pytest.raises(SystemExit) as stop:
        inspect_data.main([str(tmp_path / "shards/*.parquet")])
    assert "--data_path" not in str(stop.value.code) and "give a parquet file" in str(stop.value.code)


def test_an_image_or_video_path_that_is_a_fifo_is_refused_by_name_without_waiting_for_a_writer(tmp_path):
    from dataset.video import VideoError, read_frames
    fifo = tmp_path / "photo.png"
    os.mkfifo(fifo)
    # Opening a FIFO for reading blocks until a writer comes; the check must answer before any open.
    # A writer that turns up after 10 s turns a hang into a failure (an empty read, another message).
    import threading
    guard = threading.Timer(10, lambda: open(fifo, "wb").close())
    guard.daemon = True
    guard.start()
    for read, error in ((open_image, ImageError), (read_frames, VideoError)):
        with pytest.raises(error, match="photo.png is not a regular file"):
            read(str(fifo))
    with pytest.raises(ImageError, match="is not a regular file"):
        open_image(str(tmp_path))  # a folder
    guard.cancel()
