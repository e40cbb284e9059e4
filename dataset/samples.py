"""The one reader of training and benchmark data, for both released formats.

jsonl + image folder (the 2025 release, and the easy way to bring your own data), one sample per line:
    {"conversations": [{"role": "user", "content": "<image>\\nWhat is this?"},
                       {"role": "assistant", "content": "A cat."}],
     "image": "a.jpg, b.jpg"}
  or, for a video: "video": "clip.mp4" and one `<video>` tag (no `<image>` tags) in the text.
parquet with the images inside (the release since 2025-12), one sample per row:
    conversations  string: the same list of turns, as JSON
    image_bytes    binary (one encoded image) or list<binary> (several)
    type           optional string: the question type a benchmark reports per type
    video_bytes    optional binary: an encoded video (mp4, webm, ...) for the row's one `<video>` tag
A path ending in .parquet, a folder of *.parquet shards or a glob of them selects parquet.

Each `<image>` tag, in order, takes the next image. A `<video>` tag becomes one `<image>` per
frame (--frames of them, with their timestamps: dataset/video.py, model.chat.video_prompt). A parquet row without any tag is a text-only
sample: the release stores an 8x8 placeholder image in such rows, which is ignored.

Both readers give the same `Sample`s: messages, image sources (paths or bytes) and `where`
("file:line 12" or "file:row 7", 1-based lines, 0-based rows as any parquet tool shows them).
jsonl is validated line by line when opened. A parquet table stays in Arrow, memory-mapped: only
the checks Arrow can do column-wise (tag and image counts, nulls, lengths) run when it is
opened, and a row's JSON is parsed when the row is used (`get`), so a 3M-row file costs
seconds and a few MB of Python objects at start-up.
"""
import glob
import json
import os
from typing import NamedTuple

import numpy as np

from model.chat import IMAGE_TAG, VIDEO_TAG

from .video import DEFAULT_FRAMES
ROLES = ("system", "user", "assistant")


class SampleError(ValueError):
    """A sample that cannot be used; str() is "where: reason"."""


class Sample(NamedTuple):
    messages: list  # [{"role": ..., "content": ...}], images marked by <image> tags
    images: list  # one source per tag, in order: a file path (str) or the encoded bytes
    where: str  # "data.jsonl:12" or "data.parquet:row 7"
    type: str = "all"  # a benchmark's question type, if the data gives one
    video: object = None  # a video's path or bytes, for the conversation's one <video> tag (images is then empty)


def check_conversation(conv, n_images, has_video=False):
    """Raises ValueError saying what is wrong with a list of turns that should go with n_images
    (or, has_video, with one video and no images)."""
    if not isinstance(conv, list) or not conv:
        raise ValueError('empty or missing "conversations" list')
    for turn in conv:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError(f'each turn needs "role" (system/user/assistant) and string "content", got {turn!r:.80}')
    if not any(t["role"] == "assistant" and t["content"].strip() for t in conv):
        raise ValueError("no non-empty assistant turn: nothing to learn from")
    n_tags, n_video_tags = count_tags(conv), count_tags(conv, VIDEO_TAG)
    if has_video and (n_video_tags != 1 or n_tags or n_images):
        raise ValueError(f"a sample with a video needs one {VIDEO_TAG} tag and no images or {IMAGE_TAG} tags; "
                         f"found {n_video_tags} {VIDEO_TAG}, {n_tags} {IMAGE_TAG} tags and {n_images} images")
    if not has_video and n_video_tags:
        raise ValueError(f"{n_video_tags} {VIDEO_TAG} tags but no video")
    if n_tags != n_images:
        raise ValueError(f"{n_tags} {IMAGE_TAG} tags but {n_images} images")


def count_tags(conv, tag=IMAGE_TAG):
    return sum(t["content"].count(tag) for t in conv)


def length_estimate(conv_json_chars, n_images, image_token_count):
    """Cheap token count for length-grouped batching: ~1 token per 2 characters of the JSON text
    of the turns, plus the placeholders. The same formula for both formats, so a jsonl and its
    parquet conversion batch identically."""
    return conv_json_chars // 2 + n_images * image_token_count


def parse_line(line):
    """One jsonl line (str or bytes) -> (messages, image names, type, video name or None). Raises ValueError."""
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}): "
                             "save the file as UTF-8") from None
    try:
        sample = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise ValueError("not valid JSON (nested too deeply)") from None
    if not isinstance(sample, dict):
        raise ValueError('each line must be a JSON object with "conversations"')
    conv = sample.get("conversations")
    images = [s.strip() for s in str(sample.get("image") or "").split(",") if s.strip()]
    video = str(sample.get("video") or "").strip() or None
    check_conversation(conv, len(images), video is not None)
    return conv, images, str(sample.get("type") or "all"), video


def resolve_image(images_path, name, allow_outside=None, what="image"):
    """The path of an image name from a jsonl, which must stay inside images_path: a name like
    '../x.png' or '/etc/passwd', or a symlink in the folder leading out of it, is refused (a data file
    should not reach other files on disk). allow_outside: True lets it; False refuses, naming
    --allow_outside_images; None (the default, for the scripts without that flag) refuses without
    naming it."""
    path = os.path.normpath(os.path.join(images_path, name))
    if not allow_outside:
        root = os.path.realpath(images_path)  # links resolved on both sides, the folder's own too
        real = os.path.realpath(path)
        if os.path.isabs(name) or os.path.commonpath([real, root]) != root:
            link = f" (a link to {real})" if real != os.path.abspath(path) else ""
            raise ValueError(f"{what} name {name!r}{link} points outside --images_path {images_path} (use names "
                             "relative to that folder" + ("" if allow_outside is None else
                                                          ", or pass --allow_outside_images 1 if this is intended") + ")")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} not found (check --images_path)")
    return path


def default_images_path(data_path):
    """Where a jsonl's image names are looked up when no images_path is given: the `images` folder
    beside it (the layout of the demo's data, of eval's benchmarks and of what convert_data.py
    writes: one image folder beside the jsonl files that name its images), or, where there is
    none, the jsonl's own folder."""
    folder = os.path.dirname(data_path)
    images = os.path.join(folder, "images")
    return images if os.path.isdir(images) else folder


class JsonlSource:
    """Samples of a jsonl file whose image names are relative to images_path (None: see
    default_images_path). Every line is checked here; bad ones are listed in `bad` ("where:
    reason") and left out of the samples."""

    def __init__(self, path, images_path, allow_outside_images=None, path_flag="--data_path"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"data file {path} not found" + (f" (set {path_flag})" if path_flag else ""))
        if images_path is None:
            images_path = default_images_path(path)
        self.path, self.bad, self.n_text_only = path, [], 0  # bad: "where: reason", one per bad line
        self.samples, lengths = [], []
        with open(path, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    conv, names, kind, video = parse_line(line)
                    paths = [resolve_image(images_path, n, allow_outside_images) for n in names]
                    video = video and resolve_image(images_path, video, allow_outside_images, "video")
                except ValueError as e:
                    self.bad.append(f"{where}: {e}")
                    continue
                self.n_text_only += not paths and not video
                self.samples.append(Sample(conv, paths, where, kind, video))
                lengths.append(len(json.dumps(conv, ensure_ascii=False)))
        self.json_chars = np.array(lengths, dtype=np.int64)
        self.n_bad = len(self.bad)

    def __len__(self):
        return len(self.samples)

    def get(self, i):
        return self.samples[i]

    def lengths(self, image_token_count, frames=DEFAULT_FRAMES):
        n_images = np.array([frames if s.video else len(s.images) for s in self.samples], dtype=np.int64)
        return length_estimate(self.json_chars, n_images, image_token_count)


def parquet_files(spec, path_flag="--data_path"):
    """A .parquet file, a folder of them, or a glob -> sorted file list. path_flag: the argument the
    caller took `spec` from, for the error to name (None: a positional one, left unnamed)."""
    if os.path.isdir(spec):
        files = sorted(glob.glob(os.path.join(spec, "*.parquet")))
    elif any(c in spec for c in "*?["):
        files = sorted(glob.glob(spec))
    else:
        files = [spec] if os.path.isfile(spec) else []
    if not files:
        raise FileNotFoundError(f"no parquet files at {spec} ({f'set {path_flag} to ' if path_flag else 'give '}a "
                                "parquet file, a folder of them, or a glob like 'data/*.parquet')")
    odd = [f for f in files if not os.path.isfile(f)]  # reading a FIFO would wait for a writer forever
    if odd:
        raise ValueError(f"{odd[0]} is not a regular file (a FIFO, socket, device or folder)"
                         + (f", nor are {len(odd) - 1} more of the files at {spec}" if len(odd) > 1 else "")
                         + ": move it out of the folder, or give a glob that leaves it out")
    return files


def is_parquet(spec):
    return spec.endswith(".parquet") or os.path.isdir(spec) or (any(c in spec for c in "*?[")
                                                                and ".parquet" in spec)


KEEP_COLUMNS = ("conversations", "image_bytes", "type", "video_bytes")  # what the reader uses


def arrow_copy(path, cache_dir=None, progress=None):
    """A memory-mapped Arrow table of a parquet file's columns. Parquet cannot read one row without
    decompressing its whole row group (the release's hold ~1M rows), so the file is rewritten
    once, batch by batch, as an uncompressed Arrow IPC file that any row can be read from directly;
    later runs and other processes reuse it. It lives in `.arrow_cache/` beside the data (or
    cache_dir) and is named by the file's size and mtime, so an edited file is copied again.
    `progress(done_rows, total_rows)` is called as it goes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from filelock import FileLock
    st = os.stat(path)
    folder = cache_dir or os.path.join(os.path.dirname(os.path.abspath(path)), ".arrow_cache")
    target = os.path.join(folder, f"{os.path.basename(path)}.{st.st_size}-{st.st_mtime_ns}.arrow")
    if not os.path.isfile(target):
        os.makedirs(folder, exist_ok=True)
        with FileLock(target + ".lock"):  # DDP ranks and parallel runs: one writes, the others wait
            if not os.path.isfile(target):
                try:
                    # Streamed page by page: by default a whole row group (GBs in the release) is read at once.
                    pf = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
                except Exception as e:
                    raise ValueError(f"{path}: not a readable parquet file ({e})") from None
                columns = [c for c in KEEP_COLUMNS if c in pf.schema_arrow.names]
                if "conversations" not in columns:
                    raise ValueError(f"{path}: no 'conversations' column (it has {pf.schema_arrow.names}); the "
                                     "released schema is conversations (JSON string) + image_bytes (binary)")
                tmp, done, total = f"{target}.tmp{os.getpid()}", 0, pf.metadata.num_rows
                schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
                with pa.OSFile(tmp, "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
                    for batch in pf.iter_batches(batch_size=2048, columns=columns):
                        writer.write_batch(batch)
                        done += batch.num_rows
                        if progress:
                            progress(done, total)
                os.replace(tmp, target)
    return pa.ipc.open_file(pa.memory_map(target)).read_all()


class ParquetSource:
    """Samples of one or more parquet files in the released schema, read from memory-mapped Arrow."""

    def __init__(self, spec, cache_dir=None, progress=None, path_flag="--data_path"):
        self.files = parquet_files(spec, path_flag)
        self.path, self.bad, self.n_bad, self.n_text_only = spec, [], 0, 0
        self.conv_chunks, self.image_chunks, self.type_chunks, self.video_chunks = [], [], [], []  # Arrow arrays
        chunk_starts, file_starts, rows, n_images, json_chars, has_video = [0], [], [], [], [], []
        for path in self.files:
            table = arrow_copy(path, cache_dir, progress and (lambda d, t, p=path: progress(p, d, t)))
            file_starts.append(chunk_starts[-1])
            tags, counts, chars, vtags, video = self._add_table(path, table, chunk_starts)
            # A text-only row (no tag) ignores its images, and so does a video row.
            bad_images = ~video & (tags > 0) & (tags != counts)
            bad_video = (video & ((vtags != 1) | (tags != 0))) | (~video & (vtags > 0))
            bad = (tags < 0) | bad_images | bad_video
            for row in np.flatnonzero(bad)[:100]:
                self.bad.append(f"{path}:row {row}: " + (
                    "'conversations' is null" if tags[row] < 0 else
                    f"{tags[row]} {IMAGE_TAG} tags but {counts[row]} images" if bad_images[row] else
                    f"a video needs one {VIDEO_TAG} tag and no {IMAGE_TAG} tags, found {vtags[row]} and {tags[row]}"
                    if video[row] else f"{vtags[row]} {VIDEO_TAG} tags but no video_bytes"))
            self.n_bad += int(bad.sum())
            keep = np.flatnonzero(~bad)
            self.n_text_only += int(((tags[keep] == 0) & ~video[keep]).sum())
            rows.append(keep + file_starts[-1])
            n_images.append(tags[keep])
            json_chars.append(chars[keep])
            has_video.append(video[keep])
        self.chunk_starts, self.file_starts = np.array(chunk_starts), np.array(file_starts)
        self.rows = np.concatenate(rows)  # [N] global row of each usable sample: numbers, not objects
        self.n_images, self.json_chars = np.concatenate(n_images), np.concatenate(json_chars)
        self.has_video = np.concatenate(has_video)

    def _add_table(self, path, table, chunk_starts):
        """Keeps the table's column chunks; -> per row: <image> tag count (-1: null), image count, JSON
        length, <video> tag count, whether it has a video."""
        import pyarrow as pa
        import pyarrow.compute as pc
        conv = table.column("conversations")
        if not (pa.types.is_string(conv.type) or pa.types.is_large_string(conv.type)):
            raise ValueError(f"{path}: column 'conversations' is {conv.type}, expected a JSON string")
        images = table.column("image_bytes") if "image_bytes" in table.column_names else None
        kinds = table.column("type") if "type" in table.column_names else None
        videos = table.column("video_bytes") if "video_bytes" in table.column_names else None
        if videos is not None and not (pa.types.is_binary(videos.type) or pa.types.is_large_binary(videos.type)):
            raise ValueError(f"{path}: column 'video_bytes' is {videos.type}, expected binary")
        if images is None:
            counts = np.zeros(len(table), dtype=np.int64)
        elif pa.types.is_list(images.type) or pa.types.is_large_list(images.type):
            counts = pc.fill_null(pc.list_value_length(images), 0).to_numpy()
        elif pa.types.is_binary(images.type) or pa.types.is_large_binary(images.type):
            counts = pc.fill_null(pc.cast(pc.greater(pc.binary_length(images), 0), pa.int64()), 0).to_numpy()
        else:
            raise ValueError(f"{path}: column 'image_bytes' is {images.type}, expected binary or list<binary>")
        # One row range per chunk; the three columns of an IPC file are chunked alike (by record batch).
        for k, chunk in enumerate(conv.chunks):
            self.conv_chunks.append(chunk)
            self.image_chunks.append(images.chunk(k) if images is not None else None)
            self.type_chunks.append(kinds.chunk(k) if kinds is not None else None)
            self.video_chunks.append(videos.chunk(k) if videos is not None else None)
            chunk_starts.append(chunk_starts[-1] + len(chunk))
        tags = pc.fill_null(pc.count_substring(conv, IMAGE_TAG), -1).to_numpy()
        chars = pc.fill_null(pc.utf8_length(conv), 0).to_numpy()
        vtags = pc.fill_null(pc.count_substring(conv, VIDEO_TAG), 0).to_numpy()
        video = (pc.fill_null(pc.greater(pc.binary_length(videos), 0), False).to_numpy(zero_copy_only=False)
                 if videos is not None else np.zeros(len(table), dtype=bool))
        return tags, counts, chars, vtags, video

    def __len__(self):
        return len(self.rows)

    def _locate(self, row):
        c = int(np.searchsorted(self.chunk_starts, row, side="right")) - 1
        return c, row - int(self.chunk_starts[c])

    def where(self, row):
        f = int(np.searchsorted(self.file_starts, row, side="right")) - 1
        return f"{self.files[f]}:row {row - int(self.file_starts[f])}"

    def get(self, i):
        row = int(self.rows[i])
        c, j = self._locate(row)
        where = self.where(row)
        try:
            conv = json.loads(self.conv_chunks[c][j].as_py())
        except (json.JSONDecodeError, RecursionError) as e:
            reason = e.msg if isinstance(e, json.JSONDecodeError) else "nested too deeply"
            raise SampleError(f"{where}: 'conversations' is not valid JSON ({reason})") from None
        n, video = int(self.n_images[i]), None
        images = []
        if self.has_video[i]:
            video = self.video_chunks[c][j].as_py()
        elif n:
            value = self.image_chunks[c][j].as_py()
            images = value if isinstance(value, list) else [value]
        try:
            check_conversation(conv, len(images), video is not None)
        except ValueError as e:
            raise SampleError(f"{where}: {e}") from None
        kinds = self.type_chunks[c]
        kind = kinds[j].as_py() if kinds is not None else None
        return Sample(conv, images, where, str(kind or "all"), video)

    def lengths(self, image_token_count, frames=DEFAULT_FRAMES):
        n_images = np.where(self.has_video, frames, self.n_images)
        return length_estimate(self.json_chars, n_images, image_token_count)


def open_source(data_path, images_path=None, allow_outside_images=None, cache_dir=None, progress=None,
                path_flag="--data_path"):
    """The reader for data_path: parquet (by extension, folder or glob) or jsonl. Its errors name the
    flags a caller has: path_flag, the argument data_path came from (None: a positional one), and
    --allow_outside_images unless allow_outside_images is None (see resolve_image)."""
    if data_path and is_parquet(data_path):
        return ParquetSource(data_path, cache_dir, progress, path_flag)
    return JsonlSource(data_path, images_path, allow_outside_images, path_flag)
