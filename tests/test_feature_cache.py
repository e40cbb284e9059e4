"""Speed features that must not change results: the feature cache and torch.compile."""
import os
import time

import pytest
import torch
from dataset.feature_cache import FeatureCache, encode_with_cache, image_key, open_cache_for, tower_identity
from model.images import open_image, to_pixels
from model.model_vlm import MiniMindVLM, VLMConfig

from conftest import TINY_LLM, write_image


def pixels_of(processor, path):
    return to_pixels(processor, [open_image(path)])


def test_cached_features_equal_freshly_computed_ones(tiny_vlm, processor, tmp_path):
    write_image(tmp_path / "a.png", "red")
    path = str(tmp_path / "a.png")
    cache = open_cache_for(tiny_vlm.vision_encoder, processor, str(tmp_path / "cache"))
    px = pixels_of(processor, path)
    fresh = tiny_vlm.encode_images(px)[0]
    cold = encode_with_cache(tiny_vlm, cache, px, [image_key(path)], [None])  # encodes and stores
    reopened = open_cache_for(tiny_vlm.vision_encoder, processor, str(tmp_path / "cache"))  # a later run
    stored = reopened.lookup(image_key(path))
    assert stored is not None and len(reopened) == 1
    assert torch.equal(stored, fresh.half()) and torch.equal(cold[0], stored)
    warm = encode_with_cache(tiny_vlm, reopened, px[:0], [image_key(path)], [stored])
    assert torch.equal(warm, cold)


def test_a_changed_image_misses_the_cache(tiny_vlm, processor, tmp_path):
    path = str(tmp_path / "a.png")
    write_image(path, "red")
    cache = open_cache_for(tiny_vlm.vision_encoder, processor, str(tmp_path / "cache"))
    encode_with_cache(tiny_vlm, cache, pixels_of(processor, path), [image_key(path)], [None])
    assert cache.lookup(image_key(path)) is not None
    time.sleep(0.01)
    write_image(path, "blue", size=(60, 50))
    assert cache.lookup(image_key(path)) is None


def test_a_different_tower_has_a_different_identity(tiny_vlm, processor, tower_dir):
    ident = tower_identity(tiny_vlm.vision_encoder, processor)
    other = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))
    assert tower_identity(other.vision_encoder, processor) == ident  # same weights, same id
    with torch.no_grad():
        other.vision_encoder.post_layernorm.weight.add_(1.0)  # any weight change
    assert tower_identity(other.vision_encoder, processor) != ident


def test_two_writers_and_a_torn_index_line_never_corrupt_the_cache(tmp_path):
    a, b = FeatureCache(str(tmp_path), "t", 4, 2), FeatureCache(str(tmp_path), "t", 4, 2)
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"x" * (i + 1))
    a.add(image_key(str(tmp_path / "0.png")), torch.full((4, 2), 1.0))
    b.add(image_key(str(tmp_path / "1.png")), torch.full((4, 2), 2.0))
    a.add(image_key(str(tmp_path / "2.png")), torch.full((4, 2), 3.0))
    shard_a = a.writer[0]
    with open(os.path.join(a.dir, shard_a + ".idx"), "a") as f:
        f.write('{"key": "half-writ')  # a kill in the middle of an index line
    reader = FeatureCache(str(tmp_path), "t", 4, 2)
    assert len(reader) == 3 and len(os.listdir(a.dir)) == 4  # two shards, one per writer
    assert [float(reader.lookup(image_key(str(tmp_path / f"{i}.png")))[0, 0]) for i in range(3)] == [1.0, 2.0, 3.0]


def test_compiled_and_eager_losses_agree(tiny_vlm):
    torch.manual_seed(0)
    text = torch.randint(10, 6000, (2, 24))
    image = torch.full((2, 196), tiny_vlm.config.image_token_id)
    ids = torch.cat([text[:, :4], image, text[:, 4:]], 1)  # one image per row, as in training
    pixels = torch.randn(2, 3, 224, 224)
    eager = tiny_vlm(ids, labels=ids, pixel_values=pixels).loss
    tiny_vlm.compile_for_training()  # what --use_compile 1 does
    compiled = tiny_vlm(ids, labels=ids, pixel_values=pixels).loss
    assert torch.allclose(eager, compiled, rtol=1e-4)


def test_compiled_blocks_are_one_graph_each_across_batch_shapes():
    """--use_compile 1 compiles each block with fullgraph=True (a graph break raises) and dynamic
    shapes. Driven as the trainer drives it (image features spliced in, or a batch without images),
    batches of other sizes and lengths neither break a graph nor recompile one, and all blocks share
    one graph. The first batch has n supervised == dim (64) and the second B == head_dim (8): equal
    sizes must not tie a batch dimension to a width."""
    # compile_for_training sets this process-wide flag; patch() puts back what was there. (A pytest
    # monkeypatch deletes the entry on undo, which hides the flag from every later compile.)
    with torch.fx.experimental._config.patch(use_duck_shape=True):
        assert_one_graph_per_block()


def assert_one_graph_per_block():
    from torch._dynamo.utils import counters
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    config = VLMConfig(**TINY_LLM, image_token_count=16, vision_hidden_size=32)
    model = MiniMindVLM(config, load_tower=False).train()  # the trainer runs the tower itself
    model.compile_for_training()
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises, naming the failed guard
        for B, T, images in ((2, 33, True), (8, 40, True), (3, 47, False), (4, 61, True)):
            ids = torch.randint(10, 6000, (B, T))
            features = None
            if images:
                ids[:, 4:4 + config.image_token_count] = config.image_token_id
                features = torch.randn(B, config.image_token_count, config.vision_hidden_size)
            model(ids, labels=ids, image_features=features).loss.backward()
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 2  # one for every block, one for the head with its loss


# A damaged cache: a line it did not write stops with the fix; a row its .bin lost is encoded again.

def cache_of_three(tmp_path):
    """A cache holding keys a, b, c (rows 0-2 of one shard, each filled with its row number + 1) -> (cache, shard)."""
    cache = FeatureCache(str(tmp_path), "t", 4, 2)
    for i, key in enumerate("abc"):
        cache.add(key, torch.full((4, 2), i + 1.0))
    return cache, os.path.join(cache.dir, cache.writer[0])


@pytest.mark.parametrize("line, problem", [('{"key": "d", "ro', "not JSON"), ('["d", 3]', "not a JSON object"),
                                           ('{"row": 0}', 'no "key" string'), ('{"key": "d", "row": -1}', 'no "row" number'),
                                           (b'\xff\xfe{"key"', "not JSON")])
def test_an_index_line_the_cache_did_not_write_names_the_file_line_and_the_folder_to_delete(tmp_path, line, problem):
    cache, shard = cache_of_three(tmp_path)
    with open(shard + ".idx", "ab") as f:
        f.write((line.encode() if isinstance(line, str) else line) + b"\n" + b'{"key": "e", "row": 2}\n')
    with pytest.raises(ValueError) as error:
        FeatureCache(str(tmp_path), "t", 4, 2)
    assert str(error.value) == (f"{shard}.idx:4: {problem}, not a line of a feature-cache index: delete the folder "
                                f"{cache.dir}, and the features are encoded and cached again")


def test_rows_missing_from_a_truncated_bin_are_misses_that_are_encoded_again(tmp_path):
    _, shard = cache_of_three(tmp_path)
    with open(shard + ".bin", "r+b") as f:
        f.truncate(4 * 2 * 2 + 5)  # row 0 and a few bytes of row 1: a copy cut short
    with open(shard + ".idx", "a") as f:
        f.write('{"key": "d", "row": 99}\n')  # a row past the end, even of the whole file
    cache = FeatureCache(str(tmp_path), "t", 4, 2)
    assert float(cache.lookup("a")[0, 0]) == 1.0 and [cache.lookup(k) for k in "bcd"] == [None] * 3
    assert cache.lost == [f"{shard}.idx:{n}: row {row}" for n, row in ((2, 1), (3, 2), (4, 99))]
    assert cache.lost_note().startswith(f"3 cached rows are not in their .bin file, cut short? (e.g. {shard}.idx:2")
    cache.add("b", torch.full((4, 2), 2.0))  # as encode_with_cache stores a miss
    assert float(FeatureCache(str(tmp_path), "t", 4, 2).lookup("b")[0, 0]) == 2.0


def test_a_bin_cut_short_while_the_cache_is_open_is_a_miss(tmp_path):
    cache, shard = cache_of_three(tmp_path)
    reader = FeatureCache(str(tmp_path), "t", 4, 2)
    os.truncate(shard + ".bin", 4 * 2 * 2)
    assert reader.lookup("c") is None and "c" not in reader.index and float(reader.lookup("a")[0, 0]) == 1.0
