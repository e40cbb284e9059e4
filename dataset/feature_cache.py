"""A disk cache of frozen vision-tower features, so each image is encoded once, ever.

The tower is frozen and preprocessing is deterministic, so an image's [196, C] patch features
never change. They are stored in fp16 (~300 KB per image at C=768) in append-only shard files
that are memory-mapped for reading:

    {cache_dir}/{tower_id}/{shard}.bin     raw float16 rows of [196, C]
    {cache_dir}/{tower_id}/{shard}.idx     one JSON line per row: {"key": ..., "row": n}

`tower_id` hashes the tower's config, weights and image-processor settings, so a different tower
never reads stale features. An image file's key is its absolute path + size + mtime, so an edited
image misses and is re-encoded; an image embedded in parquet has no path, so its key is a hash
of its bytes (the same picture in the pretrain and the SFT file is encoded once). Every writer (process) appends to its own shard, so two DDP ranks
or two runs never write the same file; a row counts only once its index line is complete, so a
kill mid-write loses at most that row.
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
        self.read_offsets, self.maps = {}, {}
        self.writer = None
        self.refresh()

    def refresh(self):
        """Read index lines appended since the last call (by this or any other process)."""
        for name in sorted(os.listdir(self.dir)):
            if not name.endswith(".idx"):
                continue
            shard = name[:-4]
            with open(os.path.join(self.dir, name), "rb") as f:
                f.seek(self.read_offsets.get(shard, 0))
                data = f.read()
            complete = data[:data.rfind(b"\n") + 1]  # a half-written last line is read next time
            for line in complete.splitlines():
                entry = json.loads(line)
                self.index[entry["key"]] = (shard, entry["row"])
            self.read_offsets[shard] = self.read_offsets.get(shard, 0) + len(complete)
            self.maps.pop(shard, None)  # the shard may have grown: remap on next read

    def __len__(self):
        return len(self.index)

    def lookup(self, key):
        """Cached features [n_tokens, C] (float16) for an image_key, or None."""
        if key not in self.index:
            return None
        shard, row = self.index[key]
        if shard not in self.maps:
            n_rows = os.path.getsize(os.path.join(self.dir, shard + ".bin")) // self.row_bytes
            self.maps[shard] = np.memmap(os.path.join(self.dir, shard + ".bin"), dtype=np.float16, mode="r",
                                         shape=(n_rows, *self.row_shape))
        return torch.from_numpy(np.array(self.maps[shard][row]))

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
    """Image features [N, 196, C] (float16) for a batch: rows the loader found in the cache, the
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
        out[i] = f
    return out  # [N, 196, C]
