"""A disk cache of frozen vision-tower features, so each image is encoded once, ever.

The tower is frozen and preprocessing is deterministic, so an image's [image_token_count, C] patch features
never change. They are stored in fp16 (~300 KB per image at C=768) in append-only shard files
that are memory-mapped for reading:

    {cache_dir}/{tower_id}/{shard}.bin     raw float16 rows of [image_token_count, C]
    {cache_dir}/{tower_id}/{shard}.idx     one JSON line per row: {"key": ..., "row": n}

`tower_id` hashes the tower's config, weights and image-processor settings, so a different tower
never reads stale features. An image file's key is its absolute path + size + mtime, so an edited
image misses and is re-encoded; an image embedded in parquet has no path, so its key is a hash
of its bytes (the same picture in the pretrain and the SFT file is encoded once). Every writer (process) appends to its own shard, so two DDP ranks
or two runs never write the same file; a row counts only once its index line is complete, so a
kill mid-write loses at most that row.

Reading is strict where the cache cannot be trusted and lenient where it can: an index line that is
not one this module writes is a ValueError naming the file and line (delete the folder to rebuild
it), while a line whose row is missing from its .bin (a copy cut short) is a miss, encoded again,
and listed in `lost`.
"""
import hashlib
import json
import os
import socket
import uuid

import numpy as np
import torch


def tower_identity(tower, processor):
    h = hashlib.blake2b(digest_size=12)
    h.update(tower.config.to_json_string().encode())
    h.update(processor.to_json_string().encode())
    for name, p in sorted(tower.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def image_key(source):
    """The cache key of an image source: a file path, or the encoded bytes themselves."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "blake2b:" + hashlib.blake2b(source, digest_size=16).hexdigest()
    st = os.stat(source)
    return f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}"


class FeatureCache:
    def __init__(self, cache_dir, tower_id, n_tokens, width):
        self.dir = os.path.join(cache_dir, tower_id)
        os.makedirs(self.dir, exist_ok=True)
        self.row_shape, self.row_bytes = (n_tokens, width), n_tokens * width * 2
        self.index = {}  # key -> (shard name, row)
        self.read_offsets, self.maps = {}, {}  # read_offsets: shard -> (bytes, lines) of its index read so far
        self.lost = []  # where an index line names a row its .bin does not hold
        self.writer = None
        self.refresh()

    def refresh(self):
        """Read index lines appended since the last call (by this or any other process)."""
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".idx"):
                continue
            shard, path = name[:-4], os.path.join(self.dir, name)
            offset, line_no = self.read_offsets.get(shard, (0, 0))
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]  # a half-written last line is read next time
            n_rows = self.rows_on_disk(shard)  # after the index: a row is written before its line
            for line in complete.split(b"\n")[:-1]:
                line_no += 1
                if line.strip():
                    key, row = self.index_entry(path, line_no, line)
                    if row < n_rows:
                        self.index[key] = (shard, row)
                    else:
                        self.lost.append(f"{path}:{line_no}: row {row}")
            self.read_offsets[shard] = (offset + len(complete), line_no)
            self.maps.pop(shard, None)  # the shard may have grown: remap on next read

    def index_entry(self, path, line_no, line):
        """An index line -> (key, row), or a ValueError naming it: a line this module did not write
        means the files were damaged or replaced, and then no row of them can be trusted."""
        try:
            entry = json.loads(line)
        except ValueError:
            problem = "not JSON"
        else:
            problem = ("not a JSON object" if not isinstance(entry, dict) else
                       'no "key" string' if not isinstance(entry.get("key"), str) else
                       'no "row" number' if type(entry.get("row")) is not int or entry["row"] < 0 else None)
        if problem:
            raise ValueError(f"{path}:{line_no}: {problem}, not a line of a feature-cache index: delete the folder "
                             f"{self.dir}, and the features are encoded and cached again")
        return entry["key"], entry["row"]

    def rows_on_disk(self, shard):
        try:
            return os.path.getsize(os.path.join(self.dir, shard + ".bin")) // self.row_bytes
        except FileNotFoundError:
            return 0

    def lost_note(self):
        """What the scripts say about `lost` rows, or an empty string."""
        if not self.lost:
            return ""
        return (f"{len(self.lost)} cached rows are not in their .bin file, cut short? (e.g. {self.lost[0]}); "
                f"those images are encoded again")

    def __len__(self):
        return len(self.index)

    def lookup(self, key):
        """Cached features [n_tokens, C] (float16) for an image_key, or None."""
        if key not in self.index:
            return None
        shard, row = self.index[key]
        rows = self.maps.get(shard)
        if rows is None or row >= len(rows):
            path = os.path.join(self.dir, shard + ".bin")
            n_rows = self.rows_on_disk(shard)
            if row >= n_rows:  # the .bin was cut short after its index was read: a miss
                del self.index[key]
                self.lost.append(f"{path}: row {row}")
                return None
            rows = self.maps[shard] = np.memmap(path, dtype=np.float16, mode="r", shape=(n_rows, *self.row_shape))
        return torch.from_numpy(np.array(rows[row]))

    def add(self, key, features):
        """Append one image's features [n_tokens, C] to this process's own shard."""
        if self.writer is None:
            shard = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # one writer per shard
            self.writer = (shard, open(os.path.join(self.dir, shard + ".bin"), "ab"),
                           open(os.path.join(self.dir, shard + ".idx"), "a"))
            self.writer_rows = 0
        shard, bin_f, idx_f = self.writer
        bin_f.write(features.detach().to(torch.float16).cpu().contiguous().numpy().tobytes())
        bin_f.flush()  # the row is on disk before the index line that makes it visible
        idx_f.write(json.dumps({"key": key, "row": self.writer_rows}) + "\n")
        idx_f.flush()
        self.index[key] = (shard, self.writer_rows)
        self.maps.pop(shard, None)
        self.writer_rows += 1

    def disk_bytes(self):
        return sum(os.path.getsize(os.path.join(self.dir, f)) for f in os.listdir(self.dir))


def open_cache_for(tower, processor, cache_dir):
    """The cache that belongs to this vision tower (in the dtype it runs in): its rows are the
    tower's patch tokens, [(image_size / patch_size)^2, hidden_size]."""
    n_tokens = (tower.config.image_size // tower.config.patch_size) ** 2
    return FeatureCache(cache_dir, tower_identity(tower, processor), n_tokens, tower.config.hidden_size)


def encode_with_cache(model, cache, pixel_values, image_keys, cached):
    """Image features [N, image_token_count, C] (float16) for a batch: rows the loader found in the cache, the
    rest encoded now and appended to it. Fresh features are rounded to fp16 like cached ones, so a
    run computes the same thing whether the cache was cold or warm.

    cached: N tensors-or-None as the dataset returned them; pixel_values holds only the images
    whose entry is None, in order.
    """
    if not cached:
        return None
    fresh = model.encode_images(pixel_values).to(torch.float16) if any(f is None for f in cached) else None
    out, j = None, 0
    for i, f in enumerate(cached):
        if f is None:
            if image_keys[i] not in cache.index:  # the same picture twice in one batch is stored once
                cache.add(image_keys[i], fresh[j])
            f, j = fresh[j], j + 1
        if out is None:  # filled row by row: torch.stack of fp16 is refused under CPU autocast
            out = torch.empty(len(cached), *f.shape, dtype=torch.float16, device=pixel_values.device)
        # A cached row is on the host, pinned by the loader on CUDA: queued, not waited for (a plain
        # assignment would make the host wait for each image's copy).
        out[i].copy_(f, non_blocking=True)
    return out  # [N, image_token_count, C]
