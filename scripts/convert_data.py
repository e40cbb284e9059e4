"""Convert training data between the two released formats.

    # jsonl + image folder -> parquet with the images inside (the release's schema)
    python scripts/convert_data.py --data_path my_data.jsonl --images_path my_images --out my_data.parquet
    # parquet -> jsonl + image folder (to look at the images, or edit the data by hand)
    python scripts/convert_data.py --data_path sft_i2t.parquet --out sft.jsonl   # images to images/ beside it

The parquet schema is the release's: `conversations` (the turns as a JSON string) and
`image_bytes` (the encoded image, byte for byte as it was on disk). A text-only sample gets the
release's 8x8 black placeholder image. When a sample has several images, `image_bytes` is a
list of binaries in every row instead. A per-sample `type` (benchmark data) becomes a column, and
a sample's `video` file its `video_bytes` (a video row keeps the placeholder image too).
Going back, each distinct image is written once, named by a hash of its bytes.
"""
import hashlib
import io
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dataset.samples import JsonlSource, SampleError, is_parquet, open_source  # noqa: E402
from cli import IMAGES_PATH_DEFAULT, make_parser, switch  # noqa: E402

BATCH_ROWS = 1024  # rows per parquet row group / write


def placeholder_jpeg():
    """The release's image for a text-only row: 8x8 black (no <image> tag points at it)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    return buf.getvalue()


class Progress:
    def __init__(self, total, what):
        self.total, self.what, self.t0, self.last = total, what, time.time(), 0.0

    def __call__(self, done):
        now = time.time()
        if now - self.last < 0.5 and done < self.total:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        print(f"\r{self.what}: {done}/{self.total} rows, {rate:.0f} rows/s, eta {(self.total - done) / max(rate, 1e-9):.0f}s",
              end="\n" if done == self.total else "", flush=True)


def to_parquet(source, out):
    import pyarrow as pa
    import pyarrow.parquet as pq
    samples = [source.get(i) for i in range(len(source))]
    multi = any(len(s.images) > 1 for s in samples)
    typed = any(s.type != "all" for s in samples)
    videos = any(s.video for s in samples)
    blank = placeholder_jpeg()
    fields = [("conversations", pa.string()), ("image_bytes", pa.list_(pa.binary()) if multi else pa.binary())]
    schema = pa.schema(fields + ([("type", pa.string())] if typed else [])
                       + ([("video_bytes", pa.binary())] if videos else []))
    n_images, seen, progress = 0, set(), Progress(len(samples), f"writing {out}")
    tmp = f"{out}.tmp{os.getpid()}"
    with pq.ParquetWriter(tmp, schema) as writer:
        for start in range(0, len(samples), BATCH_ROWS):
            rows = {"conversations": [], "image_bytes": [], "type": [], "video_bytes": []}
            for s in samples[start:start + BATCH_ROWS]:
                images = []
                for path in s.images:
                    with open(path, "rb") as f:
                        images.append(f.read())
                n_images += len(images)
                seen.update(hashlib.blake2b(b, digest_size=16).digest() for b in images)
                rows["conversations"].append(json.dumps(s.messages, ensure_ascii=False))
                rows["image_bytes"].append(images if multi else (images[0] if images else blank))
                rows["type"].append(s.type)
                if s.video:
                    with open(s.video, "rb") as f:
                        rows["video_bytes"].append(f.read())
                else:
                    rows["video_bytes"].append(None)
            writer.write_table(pa.table({k: rows[k] for k in schema.names}, schema=schema))
            progress(start + len(rows["conversations"]))
    os.replace(tmp, out)
    return len(samples), n_images, len(seen)


def to_jsonl(source, out, images_path, skip_bad):
    from PIL import Image
    os.makedirs(images_path, exist_ok=True)
    n_images, rows_written, written, progress = 0, 0, set(), Progress(len(source), f"writing {out}")
    with open(f"{out}.tmp{os.getpid()}", "w", encoding="utf-8") as f:
        for i in range(len(source)):
            try:
                s = source.get(i)  # a row's JSON is parsed here: it can still be bad
            except SampleError as e:
                if not skip_bad:
                    raise ValueError(f"{e}. Fix it, or pass --skip_bad_samples 1 to leave such samples out") from None
                source.bad.append(str(e))
                source.n_bad += 1
                continue
            names = []
            for data in s.images:
                digest = hashlib.blake2b(data, digest_size=12).hexdigest()
                try:
                    ext = (Image.open(io.BytesIO(data)).format or "bin").lower().replace("jpeg", "jpg")
                except Exception:
                    ext = "bin"  # training will report it as unreadable, naming its row
                name = f"{digest}.{ext}"
                if name not in written:
                    with open(os.path.join(images_path, name), "wb") as img:
                        img.write(data)
                    written.add(name)
                names.append(name)
            n_images += len(names)
            record = {"conversations": s.messages}
            if names:
                record["image"] = ", ".join(names)
            if s.video:
                record["video"] = f"{hashlib.blake2b(s.video, digest_size=12).hexdigest()}.video"
                with open(os.path.join(images_path, record["video"]), "wb") as vid:
                    vid.write(s.video)
            if s.type != "all":
                record["type"] = s.type
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            rows_written += 1
            progress(i + 1)
    os.replace(f"{out}.tmp{os.getpid()}", out)
    return rows_written, n_images, len(written)


def disk_size(*paths):
    total = 0
    for p in paths:
        if os.path.isdir(p):
            total += sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(p) for n in names)
        elif os.path.isfile(p):
            total += os.path.getsize(p)
    return total


def main(argv=None):
    p = make_parser(__doc__)
    p.add_argument("--data_path", required=True, help="a .jsonl (-> parquet) or parquet file/folder/glob (-> jsonl)")
    p.add_argument("--images_path", help="the jsonl's image folder: read from (to parquet; default: "
                                         f"{IMAGES_PATH_DEFAULT}) or written to (to jsonl; default: the images/ "
                                         "folder beside --out, where the trainers will look for them)")
    p.add_argument("--out", required=True, help="the .parquet or .jsonl file to write")
    switch(p.add_argument, "--skip_bad_samples", 0,
           help="leave out (and count) bad lines or rows instead of stopping at the first")
    args = p.parse_args(argv)
    parquet_in = is_parquet(args.data_path)
    if parquet_in == args.out.endswith(".parquet"):
        sys.exit("error: convert jsonl -> .parquet or parquet -> .jsonl: --out must be of the other format")
    if parquet_in and not args.images_path:
        args.images_path = os.path.join(os.path.dirname(args.out), "images")
    try:
        source = open_source(args.data_path, args.images_path) if parquet_in else JsonlSource(args.data_path,
                                                                                                args.images_path)
        if source.n_bad and not args.skip_bad_samples:
            raise ValueError(f"{source.bad[0]}. Fix it, or pass --skip_bad_samples 1 to leave such samples out")
        if parquet_in:
            rows, n_images, unique = to_jsonl(source, args.out, args.images_path, args.skip_bad_samples)
        else:
            rows, n_images, unique = to_parquet(source, args.out)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    written = [args.out] + ([args.images_path] if parquet_in else [])
    print(f"wrote {rows} rows with {n_images} images ({unique} distinct) to {' and '.join(written)}: "
          f"{disk_size(*written) / 2**20:.1f} MB on disk"
          + (f"; left out {source.n_bad} bad samples, e.g. {source.bad[0]}" if source.n_bad else ""))


if __name__ == "__main__":
    main()
