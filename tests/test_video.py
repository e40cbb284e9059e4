"""Videos as frames: which frames, in what order, with what times; the same prompt text in training
and inference; and a clear refusal of every kind of bad video."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, frame_index, make_video, script_flags
from dataset.video import VideoError, read_frames
from model.chat import expand_video, video_prompt


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return make_video(tmp_path_factory.mktemp("video") / "clip.mp4")  # 40 frames at 10 fps: 4 s


# 1. Sampling.

def test_frames_are_spread_uniformly_in_time_order_with_their_times(clip):
    frames, times = read_frames(clip, 8)
    assert len(frames) == 8 and all(im.mode == "RGB" and im.size == (64, 48) for im in frames)
    # the frame on screen at the middle of each eighth of the 4 s: 0.25 s, 0.75 s, ... -> frames 2, 7, 12, ...
    assert times == pytest.approx([0.2, 0.7, 1.2, 1.7, 2.2, 2.7, 3.2, 3.7])
    assert [frame_index(im) for im in frames] == [2, 7, 12, 17, 22, 27, 32, 37]


def test_a_clip_shorter_than_the_frame_count_gives_each_frame_once(tmp_path):
    frames, times = read_frames(make_video(tmp_path / "short.mp4", n_frames=3), 8)
    assert times == pytest.approx([0.0, 0.1, 0.2]) and [frame_index(im) for im in frames] == [0, 1, 2]


def test_bytes_and_paths_give_the_same_frames(clip):
    with open(clip, "rb") as f:
        data = f.read()
    assert read_frames(data, 4)[1] == read_frames(clip, 4)[1]


@pytest.mark.slow  # scans every live object after each decoded frame
def test_a_stream_without_a_duration_is_spread_over_in_one_pass_holding_at_most_twice_the_frames_asked(
        tmp_path, monkeypatch):
    import gc

    import av
    from PIL import Image
    raw = make_video(tmp_path / "raw.m4v", n_frames=20, format="m4v")  # 5x the frames asked: halved twice
    assert av.open(raw).duration is None
    held, open_video = [], av.open

    def alive():
        return sum(type(o) in (av.VideoFrame, Image.Image) for o in gc.get_objects())

    class Counted:  # the container, counting the frames and pictures alive after each decoded frame
        def __init__(self, *args, **kwargs):
            self.container = open_video(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.container, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.container.__exit__(*exc)

        def decode(self, *args, **kwargs):
            for frame in self.container.decode(*args, **kwargs):
                yield frame
                held.append(alive() - before)

    before = alive()
    with open_video(raw) as container:  # what decoding alone keeps alive (the frame, the decoder's own)
        decoding = max(alive() - before for _ in container.decode(video=0))
    monkeypatch.setattr(av, "open", Counted)
    frames, times = read_frames(raw, 4)
    assert len(held) == 20 and max(held) <= 2 * 4 + decoding
    # in time order, each from its quarter of the 20 frames, and its time is its frame's
    assert [frame_index(im) // 5 for im in frames] == [0, 1, 2, 3]
    assert times == pytest.approx([frame_index(im) / 10 for im in frames])


def test_a_raw_stream_shorter_than_the_frame_count_gives_each_frame_once(tmp_path):
    frames, times = read_frames(make_video(tmp_path / "short.m4v", n_frames=3, format="m4v"), 8)
    assert times == pytest.approx([0.0, 0.1, 0.2]) and [frame_index(im) for im in frames] == [0, 1, 2]


@pytest.mark.parametrize("format", [None, "m4v"])
def test_a_video_whose_frames_have_more_pixels_than_an_image_may_is_refused_in_one_line(tmp_path, monkeypatch,
                                                                                        format):
    import dataset.video
    video = make_video(tmp_path / "big.mp4", n_frames=3, format=format)  # 64x48 = 3072 pixels a frame
    monkeypatch.setattr(dataset.video, "MAX_IMAGE_PIXELS", 3071)
    with pytest.raises(VideoError, match=r"^big.mp4 has 64x48 frames, over the 3,071 pixels an image may have: "
                                         r"scale it down first \(e.g. ffmpeg .*\)$"):
        read_frames(video, 2)
    monkeypatch.setattr(dataset.video, "MAX_IMAGE_PIXELS", 3072)
    assert len(read_frames(video, 2)[0]) == 2


# 2. The prompt.

def test_a_video_tag_becomes_one_image_line_per_frame_with_its_time():
    assert video_prompt([0.25, 1.5]) == "Frame 1 at 0.2s: <image>\nFrame 2 at 1.5s: <image>"
    messages = expand_video([{"role": "user", "content": "<video>\nWhat happens?"}], [0.5, 2.0])
    assert messages == [{"role": "user", "content": "Frame 1 at 0.5s: <image>\nFrame 2 at 2.0s: <image>\nWhat happens?"}]
    with pytest.raises(ValueError, match="exactly one <video>"):
        expand_video([{"role": "user", "content": "no tag"}], [0.5])


# 3. Bad videos: a clear reason each.

@pytest.mark.parametrize("case, message", [
    ("text", "not a video FFmpeg can read"),
    ("empty", "not a video FFmpeg can read"),
    ("truncated", "not a video FFmpeg can read, or is truncated"),
    ("still", "is a still image"),
    ("corrupt", "is a corrupt or truncated video"),
    ("too_long", "over the limit of 2 s"),
])
def test_bad_videos_are_refused_with_the_reason(clip, tmp_path, case, message):
    from PIL import Image
    with open(clip, "rb") as f:
        data = f.read()
    source, limit = {"text": b"hello, not a video", "empty": b"", "truncated": data[:len(data) // 2]}.get(case), 3600
    if case == "still":
        source = str(tmp_path / "x.png")
        Image.new("RGB", (8, 8)).save(source)
    elif case == "corrupt":  # the container is intact, the frames' data zeroed
        at = data.find(b"mdat")
        size = int.from_bytes(data[at - 4:at], "big")
        source = data[:at + 4] + bytes(size - 8) + data[at - 4 + size:]
    elif case == "too_long":
        source, limit = clip, 2
    with pytest.raises(VideoError, match=message):
        read_frames(source, 8, max_seconds=limit)


# 4. Training data that names a video, in both formats.

def video_data(root, clip, bad=False):
    """A jsonl of one video sample and one image sample (+ a corrupt video, with bad=True)."""
    from PIL import Image
    os.makedirs(root / "media", exist_ok=True)
    Image.new("RGB", (32, 32), "red").save(root / "media" / "red.png")
    with open(clip, "rb") as src, open(root / "media" / "clip.mp4", "wb") as dst:
        dst.write(src.read())
    rows = [{"conversations": [{"role": "user", "content": "<video>\nWhat colour does it end on?"},
                               {"role": "assistant", "content": "pink"}], "video": "clip.mp4"},
            {"conversations": [{"role": "user", "content": "<image>\nColour?"},
                               {"role": "assistant", "content": "red"}], "image": "red.png"}]
    if bad:
        (root / "media" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 broken")
        rows.append({"conversations": [{"role": "user", "content": "<video>\nAnd this?"},
                                       {"role": "assistant", "content": "?"}], "video": "broken.mp4"})
    path = root / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path), str(root / "media")


def dataset(path, images, tokenizer, processor, frames=4, **kw):
    from dataset.vlm_dataset import VLMDataset
    return VLMDataset(path, images, tokenizer, processor, image_token_id=3, image_token_count=196,
                      max_seq_len=2048, frames=frames, **kw)


def test_a_video_sample_trains_on_its_frames_and_their_times_in_jsonl_and_parquet(tmp_path, clip, tokenizer,
                                                                                     processor):
    from convert_data import to_parquet
    from dataset.samples import open_source
    path, media = video_data(tmp_path, clip)
    parquet = str(tmp_path / "data.parquet")
    to_parquet(open_source(path, media), parquet)
    items = []
    for ds in (dataset(path, media, tokenizer, processor), dataset(parquet, None, tokenizer, processor)):
        assert list(ds.lengths)[0] > 4 * 196  # the length estimate counts the frames
        item = ds[0]
        assert item["pixel_values"].shape[0] == 4 and int((item["input_ids"] == 3).sum()) == 4 * 196
        text = tokenizer.decode([t for t in item["input_ids"].tolist() if t != 3])
        assert "Frame 1 at 0.5s:" in text and "Frame 4 at 3.5s:" in text and "pink" in text
        items.append(item)
    assert torch.equal(items[0]["input_ids"], items[1]["input_ids"])
    assert torch.equal(items[0]["pixel_values"], items[1]["pixel_values"])


def test_a_bad_video_stops_training_or_is_skipped_and_counted(tmp_path, clip, tokenizer, processor):
    path, media = video_data(tmp_path, clip, bad=True)
    with pytest.raises(ValueError, match=r"data.jsonl:3: cannot read video: .*--skip_bad_samples 1"):
        dataset(path, media, tokenizer, processor)[2]
    skipped = dataset(path, media, tokenizer, processor, skip_bad_samples=True)[2]
    assert "data.jsonl:3: cannot read video" in skipped["skip"]


def test_a_video_tag_without_a_video_is_a_bad_line(tmp_path, tokenizer, processor):
    from dataset.samples import open_source
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"conversations": [{"role": "user", "content": "<video>\nWhat?"},
                                                  {"role": "assistant", "content": "x"}]}) + "\n")
    source = open_source(str(path), str(tmp_path))
    assert source.n_bad == 1 and "1 <video> tags but no video" in source.bad[0]


# 5. Through the scripts.

@pytest.mark.slow
def test_sft_on_video_data_then_eval_video_answers(tmp_path, clip, tower_dir, capsys):
    import eval_vlm
    path, media = video_data(tmp_path, clip)
    out = tmp_path / "out"
    flags = script_flags((path, media), tower_dir, str(out), from_weight="none", freeze_llm=0, epochs=1, frames=2,
                         max_seq_len=1024, dtype="float32")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "train_sft_vlm.py"), *flags], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    ask = ["--weight", str(out / "sft_vlm_64.pth"), "--vision_model_path", tower_dir, "--dim", "64", "--n_layers", "2",
           "--video", clip, "--frames", "3", "--max_new_tokens", "4", "--prompt", "What happens?"]
    eval_vlm.main(ask)  # eval_vlm.py's entry, in this process
    assert "[clip.mp4: 3 frames at 0.6, 2.0, 3.3 s] What happens?" in capsys.readouterr().out
    with open(tmp_path / "notes.txt", "w") as f:
        f.write("not a video")
    # a message for the user, not a traceback: sys.exit with it, which the script ends with exit code 1
    with pytest.raises(SystemExit) as stop:
        eval_vlm.main(ask[:-8] + ["--video", str(tmp_path / "notes.txt")])
    assert isinstance(stop.value.code, str) and stop.value.code.startswith("error: ")
    assert "notes.txt is not a video" in stop.value.code
