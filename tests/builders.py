"""Builders that several test files share: a training config and a ready tiny run, a checkpointer, a
saved tiny checkpoint, an EXIF-rotated photo, random weights in the 2026 release's key format, and a
tokenizer laid out like the released MiniMind2-V one. Test files import these from here and fixtures
and the like from conftest, never from each other; this is a plain module, not collected by pytest."""
import json
import math
import os

import torch
from PIL import Image

import trainer.build
import trainer.checkpoints
import trainer.config
import trainer.distributed
from conftest import ROOT, TINY_LLM, make_toy_data
from model.checkpoint import llm_state_dict
from model.model_vlm import MiniMindVLM, VLMConfig
from model.paths import RunFiles
from trainer.engines import TorchEngine


# --- training: a config, a tiny run, a checkpointer ---------------------------------------------------

def config(**overrides):
    """A TrainConfig as main() builds it: the parser's defaults, then these flags."""
    defaults = dict(epochs=1, batch_size=2, learning_rate=1e-3, max_seq_len=640, from_weight="none", save_weight="unit",
                    freeze_llm=0, device="cpu", dtype="float32")
    parser = trainer.config.build_parser("test", **{**defaults, **overrides})
    return trainer.config.TrainConfig(**vars(parser.parse_args([])))


def tiny_run(tower_dir, tmp_path, **flags):
    """A run of the tiny model on 12 toy samples, ready for train_step."""
    data, images = make_toy_data(tmp_path / "data")
    cfg = config(data_path=data, images_path=images, vision_model_path=tower_dir, num_workers=0,
                 tokenizer_path=os.path.join(ROOT, "model"), out_dir=str(tmp_path / "out"), **TINY_LLM, **flags)
    run = trainer.build.build_run(cfg, trainer.distributed.Cluster())
    run.model.train()
    run.sampler.set_epoch(0, 0)
    return run


def checkpointer(model, cfg, out):
    params = [p for p in model.parameters() if p.requires_grad]
    files = RunFiles(str(out / "unit_64"))
    engine = TorchEngine(model, params, "cpu", files.resume, learning_rate=cfg.learning_rate, dtype=cfg.dtype,
                         grad_clip=cfg.grad_clip)
    return trainer.checkpoints.Checkpointer(engine, files, cfg, trainer.distributed.Cluster(),
                                            record={"format": "unit"})


# --- a saved tiny checkpoint, a sideways phone photo --------------------------------------------------

def make_checkpoint(tower_dir, path, proj_bias=False, seed=0, **kw):
    torch.manual_seed(seed)
    model = MiniMindVLM(VLMConfig(vision_model_path=tower_dir, proj_bias=proj_bias, **{**TINY_LLM, **kw})).eval()
    if proj_bias:
        torch.nn.init.normal_(model.vision_proj.vision_proj[0].bias, std=0.5)
    torch.save(llm_state_dict(model), path)
    return model


def exif_rotated_jpeg(path):
    """A 64x32 photo stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"), as phones do."""
    from skimage import data
    upright = Image.fromarray(data.astronaut()).resize((64, 32))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 32x64 on disk
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(path, format="JPEG", exif=exif, quality=95)
    return upright


# --- the 2026 release's checkpoint format -------------------------------------------------------------

DIM, LAYERS, HEADS, KV_HEADS, VOCAB = 128, 2, 8, 4, 6400
HEAD_DIM, FFN = DIM // HEADS, math.ceil(DIM * math.pi / 64) * 64  # 16, 448


def spec_2026_state_dict(moe=False, projector_width=None, seed=0):
    """Random weights under exactly the spec's keys and shapes, fp16 like the release. Norm weights
    are far from 1 and differ per dimension, so a norm or a RoPE pairing applied to the wrong
    dimensions changes the logits."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).half()

    def norm(n):
        return (1 + 0.5 * torch.randn(n, generator=g)).half()

    sd = {"model.embed_tokens.weight": w(VOCAB, DIM)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, DIM),
                   p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, DIM),
                   p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, DIM),
                   p + "self_attn.o_proj.weight": w(DIM, HEADS * HEAD_DIM),
                   p + "self_attn.q_norm.weight": norm(HEAD_DIM), p + "self_attn.k_norm.weight": norm(HEAD_DIM),
                   p + "input_layernorm.weight": norm(DIM), p + "post_attention_layernorm.weight": norm(DIM)})
        ffns = [f"{p}mlp.experts.{e}." for e in range(4)] if moe else [f"{p}mlp."]
        if moe:
            sd[p + "mlp.gate.weight"] = w(4, DIM)
        for f in ffns:
            sd.update({f + "gate_proj.weight": w(FFN, DIM), f + "up_proj.weight": w(FFN, DIM),
                       f + "down_proj.weight": w(DIM, FFN)})
    sd["model.norm.weight"] = norm(DIM)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # tied: the same tensor
    if projector_width:
        sd.update({"vision_proj.mlp.0.weight": norm(projector_width), "vision_proj.mlp.0.bias": w(projector_width),
                   "vision_proj.mlp.1.weight": w(DIM, projector_width), "vision_proj.mlp.1.bias": w(DIM),
                   "vision_proj.mlp.3.weight": w(DIM, DIM), "vision_proj.mlp.3.bias": w(DIM)})
    return sd


# --- the released MiniMind2-V tokenizer ---------------------------------------------------------------

SYSTEM = "你是 MiniMind，是一个有用的人工智能助手。"
# Renders exactly the spec's text; the generation prompt only when asked for.
SPEC_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ '<s>system\\n' + messages[0]['content'] + '</s>\\n' }}"
    "{% else %}{{ '<s>system\\n" + SYSTEM + "</s>\\n' }}{% endif %}"
    "{% for message in messages %}{% if message['role'] != 'system' %}"
    "{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}")
AT = 34  # '@' in the released tokenizer


def write_released_tokenizer(path, chat_template):
    """A small byte-level BPE laid out like the release: tokenizer.json + tokenizer_config.json.
    No training text contains '@', so no merge ever includes it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What is in the picture? A cat on a mat, red and blue.", SYSTEM,
                             "system user assistant describe the image"] * 20, trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    special = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])}
    config = {"add_bos_token": False, "add_eos_token": False, "added_tokens_decoder": special,
              "additional_special_tokens": [], "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>",
              "unk_token": "<unk>", "clean_up_tokenization_spaces": False, "legacy": True,
              "model_max_length": 32768, "spaces_between_special_tokens": False,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": chat_template}
    with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    return path
