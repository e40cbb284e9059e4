"""MiniMind-V: the MiniMind LLM plus a frozen CLIP vision tower and a linear projection.

Each image becomes `image_token_count` (196) patch features from the tower's last encoder layer
(CLS dropped). A linear layer maps them to the LLM width and they overwrite the embeddings of the
image placeholder tokens, in order: one boolean mask and one masked_scatter for the whole batch.
The tower is never trained and never saved in our checkpoints.
"""
import os

import torch
from torch import nn

from .model_minimind import MiniMindConfig, MiniMindForCausalLM

VISION_HELP = ("Download CLIP ViT-B/16 into it, e.g. `git clone https://huggingface.co/openai/clip-vit-base-patch16 "
               "model/vision_model/clip-vit-base-patch16`, or build the offline demo tower with "
               "`python scripts/make_demo_vision_tower.py`.")


class VLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(self, vision_model_path="model/vision_model/clip-vit-base-patch16", image_token_id=3,
                 image_token_count=196, proj_bias=False, vision_hidden_size=768, **kwargs):
        self.vision_model_path = vision_model_path
        self.image_token_id = image_token_id  # 3 = <|image_pad|> in our tokenizer; 34 = '@' in the released one
        self.image_token_count = image_token_count
        self.proj_bias = proj_bias  # the released checkpoints have a bias, ours do not
        self.vision_hidden_size = vision_hidden_size  # replaced by the tower's width once it is loaded
        super().__init__(**kwargs)


class VisionProj(nn.Module):
    # Nested Sequential only to keep the released key name `vision_proj.vision_proj.0.weight`.
    def __init__(self, in_dim, out_dim, bias):
        super().__init__()
        self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias))

    def forward(self, x):
        return self.vision_proj(x)


def load_vision_tower(path):
    """A frozen CLIPVisionModel from a local directory holding a full CLIP or a vision-only one."""
    from transformers import CLIPVisionModel
    from transformers.utils import logging
    logging.disable_progress_bar()  # a per-tensor loading bar on every start is noise
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No CLIP vision model at '{path}' (set --vision_model_path). {VISION_HELP}")
    tower = CLIPVisionModel.from_pretrained(path)
    tower.requires_grad_(False)
    return tower.eval()


@torch.no_grad()
def tower_features(tower, pixel_values):
    """The frozen tower's last-layer patch tokens, CLS dropped: [N, 3, 224, 224] -> [N, 196, C]."""
    tower_dtype = next(tower.parameters()).dtype
    return tower(pixel_values=pixel_values.to(tower_dtype)).last_hidden_state[:, 1:]


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig, vision_tower=None, load_tower=True):
        if vision_tower is None and load_tower:
            vision_tower = load_vision_tower(config.vision_model_path)
        if vision_tower is not None:
            config.vision_hidden_size = vision_tower.config.hidden_size
        super().__init__(config)
        self.vision_proj = VisionProj(config.vision_hidden_size, config.dim, config.proj_bias)
        # Attached after the base class initialised its weights, so pretrained CLIP is left untouched.
        self.vision_encoder = vision_tower  # a submodule so .to() moves it; its keys are never saved

    def train(self, mode=True):
        super().train(mode)
        if self.vision_encoder is not None:
            self.vision_encoder.eval()  # frozen: no dropout, whatever mode the LLM is in
        return self

    def compile_for_training(self):
        super().compile_for_training()
        if self.vision_encoder is not None:
            self.vision_encoder.compile(dynamic=True)  # the batch's count of uncached images varies

    def encode_images(self, pixel_values):
        """[N, 3, 224, 224] -> patch features [N, 196, C], in the tower's dtype (it follows the model)."""
        if self.vision_encoder is None:
            raise RuntimeError(f"This model has no vision tower. {VISION_HELP}")
        return tower_features(self.vision_encoder, pixel_values)

    def embed(self, input_ids, pixel_values=None, image_features=None, **_):
        """Token embeddings with image features written over the placeholder tokens. [B, T, D]

        pixel_values [N, 3, H, W] (or precomputed image_features [N, 196, C]) hold every image of
        the batch, consumed in placeholder order: row 0's images first, then row 1's, ...
        """
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        is_image = input_ids == self.config.image_token_id  # [B, T]
        if image_features is None and pixel_values is not None and len(pixel_values):
            image_features = self.encode_images(pixel_values)
        n_images = 0 if image_features is None else len(image_features)
        per_row = is_image.sum(1)
        n_per_image = self.config.image_token_count
        if per_row.sum() != n_images * n_per_image or (per_row % n_per_image).any():
            raise ValueError(
                f"{per_row.tolist()} image placeholder tokens (id {self.config.image_token_id}) per row, but "
                f"{n_images} images: each image needs exactly {n_per_image} consecutive placeholders")
        if n_images:
            feats = self.vision_proj(image_features.to(self.vision_proj.vision_proj[0].weight.dtype))  # [N, 196, D]
            h = h.masked_scatter(is_image[..., None], feats.to(h.dtype))
        elif self.training:
            # A batch without images still touches the projection, so DDP finds a gradient for it
            # on every rank instead of hanging.
            h = h + 0.0 * sum(p.sum() for p in self.vision_proj.parameters()).to(h.dtype)
        return h
