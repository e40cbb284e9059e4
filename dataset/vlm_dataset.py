"""Samples -> training tensors: chat rendering, the loss mask, images and batching.

The samples come from dataset/samples.py (jsonl + image folder, or parquet), their pixels from
model/images.py. Each `<image>` tag becomes `image_token_count` placeholder tokens whose
embeddings the model overwrites with that image's features. Only assistant content and its
end-of-turn token are supervised.
"""
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from model.chat import ChatEncoder, expand_video
from model.model_minimind import supervised_positions
from model.model_vlm import image_slot_error

from .feature_cache import image_key
from model.images import ImageError, open_image, to_pixels
from .samples import SampleError, open_source
from .video import DEFAULT_FRAMES, MAX_VIDEO_SECONDS, VideoError, check_frames, read_frames


def fit_length(ids, labels, is_image, max_seq_len):
    """A tokenized sample as training uses it: whole, or cut to max_seq_len; None when it has to be
    skipped. A cut must keep every image's slots whole (else features misalign) and leave something
    to predict: a sample is skipped, never silently mangled."""
    if len(ids) <= max_seq_len:
        return ids, labels, is_image
    if any(is_image[max_seq_len:]) or all(label == -100 for label in labels[1:max_seq_len]):
        return None
    return ids[:max_seq_len], labels[:max_seq_len], is_image[:max_seq_len]


class LengthCheck(NamedTuple):
    """What tokenizing the samples found (VLMDataset.check_lengths)."""
    checked: int  # samples tokenized: all, or an even spread over a large dataset
    of: int  # samples in the dataset
    lengths: list  # the token count of every checked sample that could be read
    too_long: list  # "where: N tokens" of those training skips: they do not fit max_seq_len
    bad: list  # "where: reason" of the bad ones (no answer, JSON that does not parse), with skip_bad_samples


class VLMDataset(Dataset):
    """Tokenized samples with their images' pixels (or cached features), from a jsonl + image
    folder or parquet (see dataset/samples.py). A bad sample stops with "where: reason" and the
    fix, or, with skip_bad_samples, is left out and counted: lines and rows the reader can check
    up front are dropped before training (`source.bad`); one that fails when used (an unreadable
    image, a row whose JSON does not parse) comes back as {"skip": reason}, which the collate
    function drops and counts."""

    def __init__(self, data_path, images_path, tokenizer, image_processor, image_token_id,
                 image_token_count=196, max_seq_len=640, skip_bad_samples=False, feature_cache=None,
                 allow_outside_images=False, source=None, frames=DEFAULT_FRAMES, max_video_seconds=MAX_VIDEO_SECONDS):
        self.source = source or open_source(data_path, images_path, allow_outside_images)
        self.path, self.max_seq_len = data_path, max_seq_len
        self.feature_cache = feature_cache  # a FeatureCache: return stored features instead of pixels
        self.processor, self.skip_bad_samples = image_processor, skip_bad_samples
        self.encoder = ChatEncoder(tokenizer, image_token_id, image_token_count)
        if self.source.n_bad and not skip_bad_samples:
            raise ValueError(f"{self.source.bad[0]}. Fix it, or pass --skip_bad_samples 1 to skip such samples"
                             + (f" ({self.source.n_bad} in all)" if self.source.n_bad > 1 else ""))
        if not len(self.source):
            raise ValueError(f"{data_path}: no usable samples" + (f": all {self.source.n_bad} are bad, e.g. "
                                                                  f"{self.source.bad[0]}" if self.source.n_bad else ""))
        self.frames, self.max_video_seconds = check_frames(frames), max_video_seconds  # per <video>
        self.lengths = self.source.lengths(image_token_count, frames)  # for length-grouped batching

    @property
    def bad(self):
        return self.source.bad

    def __len__(self):
        return len(self.source)

    def _fail(self, message):
        if not self.skip_bad_samples:
            raise ValueError(f"{message}. Fix it, or pass --skip_bad_samples 1 to skip such samples.")
        return {"skip": message}

    def __getitem__(self, i):
        """A dict, or a dict with "skip" giving the reason when the sample cannot be used."""
        try:
            sample = self.source.get(i)
        except SampleError as e:
            return self._fail(str(e))
        cache = self.feature_cache is not None
        messages, media = sample.messages, sample.images  # media: image paths or bytes, or a video's frames
        keys = [image_key(src) if cache else None for src in media]
        if sample.video is not None:  # decoded first: the frames' timestamps are part of the text
            try:
                media, times = read_frames(sample.video, self.frames, self.max_video_seconds)
            except VideoError as e:
                return self._fail(f"{sample.where}: cannot read video: {e}")
            messages = expand_video(messages, times)
            keys = [f"{image_key(sample.video)}#t={t}" if cache else None for t in times]
        encoded = self.encoder.encode(messages)
        fitted = fit_length(*encoded, self.max_seq_len)
        if fitted is None:
            return {"skip": f"{sample.where}: {len(encoded[0])} tokens do not fit --max_seq_len {self.max_seq_len}"}
        ids, labels, is_image = fitted
        cached = [self.cached_features(k) for k in keys]
        try:
            images = [m if sample.video is not None else open_image(m, name=f"image {n + 1}")
                      for n, (m, f) in enumerate(zip(media, cached)) if f is None]
        except ImageError as e:
            return self._fail(f"{sample.where}: cannot read image: {e}")
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
                "image_mask": torch.tensor(is_image, dtype=torch.bool),  # the image slots, not typed '@'s
                "pixel_values": to_pixels(self.processor, images),  # [M, 3, H, W], the uncached images only
                "image_keys": keys, "cached": cached, "where": sample.where}  # where: "file:line" or "file:row N"

    def check_lengths(self, max_checked=2000):
        """Which samples would training skip for not fitting max_seq_len, or as bad? Tokenizes them as
        __getitem__ does, all of them or max_checked spread evenly over a larger dataset (2000 take
        about a second), without opening an image or a video (a video counts as `frames` frames).
        `lengths`, the sampler's index, cannot answer this: it estimates from the text's size, good
        enough for batching, but a character can be a token or a third of one. -> LengthCheck.
        A bad sample is an error as in training, unless skip_bad_samples."""
        n = len(self)
        picks = range(n) if n <= max_checked else np.linspace(0, n - 1, max_checked).round().astype(int)
        lengths, too_long, bad = [], [], []
        for i in picks:
            try:
                sample = self.source.get(int(i))
            except SampleError as e:
                self._fail(str(e))  # raises, unless bad samples are skipped
                bad.append(str(e))
                continue
            messages = sample.messages
            if sample.video is not None:  # the frames' lines, timed as if one a second
                messages = expand_video(messages, [float(t) for t in range(self.frames)])
            encoded = self.encoder.encode(messages)
            lengths.append(len(encoded[0]))
            if fit_length(*encoded, self.max_seq_len) is None:
                too_long.append(f"{sample.where}: {len(encoded[0])} tokens")
        return LengthCheck(len(picks), n, lengths, too_long, bad)

    def cached_features(self, key):
        if self.feature_cache is None:
            return None
        features = self.feature_cache.lookup(key)
        if features is None:  # maybe the main process encoded it since this worker last looked
            self.feature_cache.refresh()
            features = self.feature_cache.lookup(key)
        return features


def collate_batch(items, pad_id=0, pad_to=0, image_token_count=None):
    """Pads to the longest sample of *this* batch (right padding), or to `pad_to` if that is longer
    (fixed shapes), and stacks every image of the batch in placeholder order. Skipped samples are
    dropped and counted; an all-skipped batch becomes one unsupervised pad token so every rank
    still runs a step (no DDP hang). Also what the training step needs from the batch as indices
    and counts, found here on the CPU, in the loader's workers: on a GPU each would make the host
    wait (see supervised_positions). With image_token_count, a sample whose placeholders do not
    fit its images is a ValueError naming both counts and, for a VLMDataset's item, its file and
    line (or parquet row)."""
    skipped = [it["skip"] for it in items if "skip" in it]
    items = [it for it in items if "skip" not in it]
    if not items:
        items = [{"input_ids": torch.tensor([pad_id]), "labels": torch.tensor([-100]),
                  "image_mask": torch.tensor([False]), "pixel_values": None, "image_keys": [], "cached": []}]
    if image_token_count is not None:
        check_image_slots(items, image_token_count)
    T = max(pad_to, *(len(it["input_ids"]) for it in items))
    pixels = [it["pixel_values"] for it in items if it["pixel_values"] is not None]
    pixels = torch.cat(pixels) if pixels else torch.zeros(0, 3, 1, 1)  # an all-skipped batch has no images
    input_ids = torch.full((len(items), T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((len(items), T), -100, dtype=torch.long)
    attention_mask = torch.zeros((len(items), T), dtype=torch.long)
    image_mask = torch.zeros((len(items), T), dtype=torch.bool)
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        input_ids[row, :n], labels[row, :n], attention_mask[row, :n] = it["input_ids"], it["labels"], 1
        image_mask[row, :n] = it["image_mask"]
    supervised = supervised_positions(labels)  # [n] flat indices into [B*T]
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "image_mask": image_mask,
            "pixel_values": pixels,  # [M, 3, H, W]: the M <= N images not found in the feature cache
            "image_keys": [k for it in items for k in it["image_keys"]],  # N feature-cache keys, placeholder order
            "cached": [f for it in items for f in it["cached"]],  # N cached features or None
            "image_slots": image_mask.reshape(-1).nonzero().squeeze(1),  # [N * image_token_count] into [B*T]
            "supervised": supervised, "n_supervised": len(supervised),  # the loss's positions, its token count
            "n_tokens": int(attention_mask.sum()),  # real (unpadded) tokens, for throughput
            "n_samples": sum(1 for it in items if (it["labels"] != -100).any()), "skipped": skipped}


def check_image_slots(items, image_token_count):
    """Each sample needs image_token_count placeholder slots per image, or its images' features would
    land on the wrong tokens: the model's rule (image_slot_error), checked here, sample by sample,
    rather than in the model, where the counts live on the GPU."""
    for it in items:
        error = image_slot_error([int(it["image_mask"].sum())], len(it["cached"]), image_token_count)
        if error and "where" in it:  # a VLMDataset item: its <image> tags and its images were counted alike
            raise ValueError(f"{it['where']}: the sample has {error}. Its <image> tags match its images, so the "
                             "tokenizer's chat template did not render each tag once (one that leaves out or "
                             "repeats a turn's text, e.g. the system turn): use a template that renders every "
                             "turn's content as it is")
        if error:
            raise ValueError(f"a sample has {error}")
