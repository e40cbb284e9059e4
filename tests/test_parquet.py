"""Parquet with the images inside (the release's format since 2025-12): the same samples, pixels,
errors and guarantees as jsonl + image folder, through the one data layer."""
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dataset.vlm_dataset import VLMDataset, collate_batch
from dataset.samples import JsonlSource, ParquetSource, open_source

from conftest import assert_losses_match, flags, launch, make_toy_data, read_log

IMG = 3  # the placeholder id of our tokenizer


def convert(*argv):
    from convert_data import main
    main([str(a) for a in argv])


def jpeg_bytes(color, size=(32, 24)):
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


def turns(*texts):
    return json.dumps([{"role": r, "content": t} for r, t in zip(["user", "assistant"] * len(texts), texts)])


def write_parquet(path, rows, image_type=pa.binary(), extra=None):
    """rows: [(conversations JSON string or None, image_bytes value)]."""
    columns = {"conversations": pa.array([c for c, _ in rows], pa.string()),
               "image_bytes": pa.array([b for _, b in rows], image_type)}
    pq.write_table(pa.table({**columns, **(extra or {})}), path)
    return str(path)


def dataset(path, tokenizer, processor, images_path=None, **kw):
    return VLMDataset(path, images_path, tokenizer, processor, IMG, 196, **kw)


def test_jsonl_to_parquet_and_back_gives_the_same_samples_and_pixels(tmp_path, tokenizer, processor):
    jsonl, images = make_toy_data(tmp_path / "src")
    convert("--data_path", jsonl, "--images_path", images, "--out", tmp_path / "d.parquet")
    a, b = JsonlSource(jsonl, images), ParquetSource(str(tmp_path / "d.parquet"))
    assert len(a) == len(b) == 12 and b.n_text_only == 0
    for i in range(12):
        sa, sb = a.get(i), b.get(i)
        assert sa.messages == sb.messages and sb.where == f"{tmp_path / 'd.parquet'}:row {i}"
        assert [open(p, "rb").read() for p in sa.images] == sb.images  # the file's bytes, unchanged
    da, db = dataset(jsonl, tokenizer, processor, images), dataset(str(tmp_path / "d.parquet"), tokenizer, processor)
    assert (da.lengths == db.lengths).all()  # so both formats batch alike
    for i in range(12):
        assert torch.equal(da[i]["input_ids"], db[i]["input_ids"])
        assert torch.equal(da[i]["pixel_values"], db[i]["pixel_values"])
    convert("--data_path", tmp_path / "d.parquet", "--out", tmp_path / "back.jsonl", "--images_path", tmp_path / "im")
    back = JsonlSource(str(tmp_path / "back.jsonl"), str(tmp_path / "im"))
    assert [back.get(i).messages for i in range(12)] == [a.get(i).messages for i in range(12)]
    assert len(os.listdir(tmp_path / "im")) == 4  # 12 images of 4 distinct colours: each written once
    # Without --images_path both ways take the images/ folder beside the jsonl, where every reader looks.
    convert("--data_path", jsonl, "--out", tmp_path / "d2.parquet")
    assert ParquetSource(str(tmp_path / "d2.parquet")).get(5).images == b.get(5).images
    convert("--data_path", tmp_path / "d.parquet", "--out", tmp_path / "rt" / "back.jsonl")
    again = JsonlSource(str(tmp_path / "rt" / "back.jsonl"), None)
    assert [open(p, "rb").read() for p in again.get(5).images] == b.get(5).images
    assert os.path.dirname(again.get(5).images[0]) == str(tmp_path / "rt" / "images")


def test_multi_image_rows_text_only_rows_and_a_directory_of_shards(tmp_path, tokenizer, processor):
    shards = tmp_path / "shards"
    shards.mkdir()
    red, blue = jpeg_bytes("red"), jpeg_bytes("blue")
    write_parquet(shards / "a.parquet", [(turns("<image> vs <image>", "different"), [red, blue]),
                                         (turns("hello", "hi"), [jpeg_bytes("black", (8, 8))])],
                  pa.list_(pa.binary()))
    write_parquet(shards / "b.parquet", [(turns("x <image> y", "red"), red), (turns("no image", "ok"), b"\xff")])
    source = open_source(str(shards))
    assert len(source) == 4 and source.n_text_only == 2 and source.n_bad == 0
    assert source.get(0).images == [red, blue] and source.get(1).images == []  # the placeholder is ignored
    assert source.get(2).where.endswith("b.parquet:row 0") and source.get(2).images == [red]
    assert source.get(3).images == []  # text-only: even undecodable placeholder bytes are never opened
    ds = dataset(str(shards), tokenizer, processor)
    batch = collate_batch([ds[i] for i in range(4)])
    assert batch["pixel_values"].shape[0] == 3 and (batch["input_ids"] == IMG).sum() == 3 * 196
    means = batch["pixel_values"].mean((2, 3))
    assert means.argmax(1).tolist() == [0, 2, 0]  # red, blue, red: placeholder order across rows
    assert len(open_source(str(shards / "*.parquet"))) == 4  # a glob works too


def test_a_folder_of_shards_takes_regular_files_only(tmp_path):
    import threading
    shards = tmp_path / "shards"
    shards.mkdir()
    write_parquet(shards / "a.parquet", [(turns("hi", "ok"), b"")])
    os.mkfifo(shards / "b.parquet")  # reading it would wait for a writer forever
    errors = []

    def open_shards():
        try:
            open_source(str(shards))
        except ValueError as e:
            errors.append(str(e))
    opening = threading.Thread(target=open_shards, daemon=True)
    opening.start()
    opening.join(30)
    if opening.is_alive():  # stuck on the FIFO: give it a writer so the thread ends, then fail
        os.close(os.open(shards / "b.parquet", os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail("the shard scan opened the FIFO")
    assert errors == [f"{shards / 'b.parquet'} is not a regular file (a FIFO, socket, device or folder): move it "
                      f"out of the folder, or give a glob that leaves it out"]
    assert len(open_source(str(shards / "a*.parquet"))) == 1


BAD_ROWS = {
    "unparsable conversations": (('[{"role": "user"', b"x"), "row 1: 'conversations' is not valid JSON"),
    "null conversations": ((None, b"x"), "row 1: 'conversations' is null"),
    "empty conversation": (("[]", b"x"), 'row 1: empty or missing "conversations"'),
    "no answer": ((json.dumps([{"role": "user", "content": "<image>"}]), "IMG"), "row 1: no non-empty assistant"),
    "tags without images": ((turns("<image><image>", "a"), "IMG"), "row 1: 2 <image> tags but 1 images"),
    "undecodable image": ((turns("<image>", "a"), b"not a jpeg"), "row 1: cannot read image: .* not an image"),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_name_file_and_row_or_are_skipped_and_counted(tmp_path, tokenizer, processor, case):
    (conv, image), message = BAD_ROWS[case]
    good = (turns("<image>what?", "red"), jpeg_bytes("red"))
    path = write_parquet(tmp_path / "d.parquet", [good, (conv, jpeg_bytes("red") if image == "IMG" else image), good])
    with pytest.raises(ValueError, match=f"d.parquet:{message}.*--skip_bad_samples"):
        ds = dataset(path, tokenizer, processor)
        [ds[i] for i in range(len(ds))]
    ds = dataset(path, tokenizer, processor, skip_bad_samples=True)
    batch = collate_batch([ds[i] for i in range(len(ds))])
    skipped = batch["skipped"] + ds.bad
    assert batch["n_samples"] == 2 and len(skipped) == 1 and "d.parquet:row 1: " in skipped[0]


def test_rows_without_an_answer_stop_training_before_its_first_step(tmp_path, tokenizer, processor):
    import trainer.build
    no_answer = (json.dumps([{"role": "user", "content": "<image>what?"}]), jpeg_bytes("red"))
    path = write_parquet(tmp_path / "d.parquet", [no_answer] * 3)  # only a row's use parses its JSON
    with pytest.raises(ValueError, match=r"d.parquet:row 0: no non-empty assistant turn.*--skip_bad_samples 1"):
        trainer.build.check_lengths(dataset(path, tokenizer, processor), is_main=False)
    with pytest.raises(ValueError, match=r"d.parquet: no usable samples: all 3 are bad, e.g. .*row 0: no non-empty"):
        trainer.build.check_lengths(dataset(path, tokenizer, processor, skip_bad_samples=True), is_main=False)


def test_a_file_without_the_conversations_column_is_refused_by_name(tmp_path, tokenizer, processor):
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["hi"]}), path)
    with pytest.raises(ValueError, match="d.parquet: no 'conversations' column .*image_bytes"):
        dataset(str(path), tokenizer, processor)
    with pytest.raises(FileNotFoundError, match="no parquet files at"):
        dataset(str(tmp_path / "missing.parquet"), tokenizer, processor)


def test_a_million_rows_open_without_a_python_object_per_row(tmp_path):
    # The per-row bookkeeping is numpy arrays; rows are parsed only when used.
    n = 200_000
    conv = pa.array([turns("<image>q", f"a{i % 10}") for i in range(n)], pa.string())
    pq.write_table(pa.table({"conversations": conv, "image_bytes": pa.array([b"j"] * n, pa.binary())}),
                   tmp_path / "big.parquet", row_group_size=50_000)
    source = ParquetSource(str(tmp_path / "big.parquet"))
    assert len(source) == n and isinstance(source.rows, np.ndarray)
    assert source.lengths(196)[0] == len(turns("<image>q", "a0")) // 2 + 196
    assert source.get(n - 1).messages[1]["content"] == "a9"
    again = ParquetSource(str(tmp_path / "big.parquet"))  # the Arrow copy is made once and reused
    assert len(os.listdir(tmp_path / ".arrow_cache")) == 2  # the copy and its lock file
    assert again.get(7).where.endswith("big.parquet:row 7")


@pytest.mark.slow  # two trainings
def test_training_on_parquet_equals_training_on_its_jsonl(tmp_path, tower_dir):
    jsonl, images = make_toy_data(tmp_path / "src")
    convert("--data_path", jsonl, "--images_path", images, "--out", tmp_path / "d.parquet")
    launch("train_pretrain_vlm.py", flags((jsonl, images), tower_dir, tmp_path / "a", epochs=1))
    launch("train_pretrain_vlm.py", flags((str(tmp_path / "d.parquet"), "unused"), tower_dir, tmp_path / "b", epochs=1))
    a, b = (read_log(tmp_path / d / "pretrain_vlm_64_log.jsonl") for d in "ab")
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 3


@pytest.fixture(scope="module")
def parquet_data(mixed_toy_data, tmp_path_factory):
    """conftest's mixed_toy_data (12 samples, 10 with an image and 2 text-only), as jsonl and as parquet."""
    path, images = mixed_toy_data
    parquet = tmp_path_factory.mktemp("pq") / "d.parquet"
    convert("--data_path", path, "--images_path", images, "--out", parquet)
    return (path, images), (str(parquet), "unused")


@pytest.mark.slow
def test_two_process_pretrain_and_a_resumed_run_from_parquet_match_the_one_process_jsonl_run(
        parquet_data, tower_dir, one_process_reference, tmp_path):
    _, parquet = parquet_data
    ref = read_log(one_process_reference / "pretrain_vlm_64_log.jsonl")  # the jsonl, 1 process, batch 4
    launch("train_pretrain_vlm.py", flags(parquet, tower_dir, tmp_path / "ddp", batch_size=2), nproc=2,
           launcher="torchrun")
    assert_losses_match(read_log(tmp_path / "ddp" / "pretrain_vlm_64_log.jsonl"), ref)
    first = launch("train_pretrain_vlm.py", flags(parquet, tower_dir, tmp_path / "res", stop_after_steps=2))
    assert "2 of them text-only" in first.stdout
    launch("train_pretrain_vlm.py", flags(parquet, tower_dir, tmp_path / "res", batch_size=2, from_resume=1),
           nproc=2, launcher="torchrun")  # resumed mid-epoch, and on two processes
    assert_losses_match(read_log(tmp_path / "res" / "pretrain_vlm_64_log.jsonl"), ref)


@pytest.mark.slow
def test_the_feature_cache_keys_embedded_images_by_content_and_encodes_each_once(parquet_data, tower_dir, tmp_path):
    _, (parquet, _) = parquet_data
    cache = tmp_path / "cache"
    run = launch("train_pretrain_vlm.py", flags((parquet, "x"), tower_dir, tmp_path / "a", epochs=2,
                                                cache_features=cache))
    assert ": 0 images cached" in run.stdout
    rows = lambda: sum(p.stat().st_size for p in cache.rglob("*.bin")) // (196 * 32 * 2)  # noqa: E731
    assert rows() == 4  # 10 images of 4 distinct colours, over two epochs: each encoded once
    sft = launch("train_sft_vlm.py", flags((parquet, "x"), tower_dir, tmp_path / "b", epochs=1,
                                           cache_features=cache, from_weight="none"))
    assert ": 4 images cached" in sft.stdout and rows() == 4  # the same images in another file: nothing new


def test_inspect_data_shows_samples_as_the_model_sees_them(tmp_path, capsys):
    from inspect_data import main
    path = write_parquet(tmp_path / "d.parquet", [(turns("<image>\nWhat color?", "red"), jpeg_bytes("red", (40, 30))),
                                                  ("not json", b"x")])
    main([path, "--n", "5"])
    out = capsys.readouterr().out
    main(["--data_path", path, "--n", "5"])  # the other scripts' name for it
    assert capsys.readouterr().out == out
    assert "d.parquet: 2 samples" in out and "d.parquet:row 0: " in out
    assert "image 1 (" in out and ": 40x30, placeholders at tokens 4..199" in out
    assert "<image x196>\nWhat color?" in out and "[[red<|im_end|>]]" in out  # only the answer is supervised
    assert "BAD: " in out and "d.parquet:row 1: 'conversations' is not valid JSON" in out


@pytest.mark.slow
def test_cache_features_script_reads_parquet_and_encodes_each_distinct_image_once(parquet_data, tower_dir, tmp_path,
                                                                                   capsys):
    import cache_features
    _, (parquet, _) = parquet_data
    build = ["--data_path", parquet, "--cache_dir", str(tmp_path / "cache"), "--vision_model_path", tower_dir,
             "--num_workers", "0"]
    cache_features.main(build)  # the script's entry, in this process: an error would end it with SystemExit
    first = capsys.readouterr().out
    assert "4 images in" in first and "4 to encode" in first  # 10 embedded images, 4 distinct
    cache_features.main(build)
    again = capsys.readouterr().out
    assert "4 already cached" in again and "0 to encode" in again
