"""MiniMind-V: the MiniMind LLM plus a frozen vision tower and a projector.

Each image becomes `image_token_count` patch features from the tower's last layer: 196 x 768 for
CLIP ViT-B/16 at 224 px (its CLS token dropped), 64 x 768 for SigLIP2 P32 at 256 px (which has no
CLS). Both numbers come from the tower when it is loaded. The projector maps the features to the
LLM width and they overwrite the embeddings of the image placeholder tokens, in order: one
index_copy for the whole batch. The tower is never trained and never saved in
our checkpoints.
"""
import os
import pickle

import torch
from torch import nn

from .model_minimind import MiniMindConfig, MiniMindForCausalLM
from .paths import DEFAULT_VISION_MODEL, local_path


def vision_help(path):
    """How to put a vision tower in `path`, the folder that was looked in: the commands write there,
    so what failed works as it was after either."""
    return (f"Get CLIP ViT-B/16 with `git clone https://huggingface.co/openai/clip-vit-base-patch16 {path}` (or the "
            f"SigLIP2 tower of the 2026 weights, siglip2-base-p32-256-ve), or, to try the code without a download, "
            f"write a random stand-in there with `python demo/make_demo_vision_tower.py --out_dir {path}` (remove it "
            f"before getting the real one).")


class VLMConfig(MiniMindConfig):
    model_type = "minimind-v"

    def __init__(self, vision_model_path=DEFAULT_VISION_MODEL, image_token_id=3,
                 image_token_count=196, projector="linear", proj_bias=False, vision_hidden_size=768, **kwargs):
        if projector not in ("linear", "mlp"):
            raise ValueError(f"projector must be 'linear' or 'mlp', not {projector!r}")
        self.vision_model_path = vision_model_path
        self.image_token_id = image_token_id  # 3 = <|image_pad|> in our tokenizer; 34 = '@' in the released one
        # Placeholders per image and the features' width. The defaults are the 2025 release's tower
        # (CLIP ViT-B/16); loading a tower replaces both by its own, so they only matter without one.
        self.image_token_count = image_token_count
        self.vision_hidden_size = vision_hidden_size
        self.projector = projector  # "linear": our design and the 2025 release; "mlp": the 2026 release
        self.proj_bias = proj_bias  # linear only: the 2025 released checkpoints have a bias, ours do not
        super().__init__(**kwargs)


class VisionProj(nn.Module):
    """Image features [N, n, C] -> [N, n, D]. Each kind under the key names of the release that has it:
    linear: one Linear, nested only to keep the 2025 key `vision_proj.vision_proj.0.weight`;
    mlp: LayerNorm, Linear, GELU (exact), Linear, keys `vision_proj.mlp.{0,1,3}.*` (2026 release)."""

    def __init__(self, in_dim, out_dim, kind="linear", bias=False):
        super().__init__()
        if kind == "mlp":
            self.mlp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim), nn.GELU(),
                                     nn.Linear(out_dim, out_dim))
        else:
            self.vision_proj = nn.Sequential(nn.Linear(in_dim, out_dim, bias=bias))

    def forward(self, x):
        return next(self.children())(x)  # the one Sequential this holds


def load_vision_tower(path):
    """A frozen vision model from a local directory: CLIP or SigLIP, vision-only or the full model
    (its vision half is taken). The class is the one transformers maps the directory's vision config to."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_MAPPING
    from transformers.utils import logging
    logging.disable_progress_bar()  # a per-tensor loading bar on every start is noise
    path = local_path(path)  # the default is named relative to the repository
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"No vision model at '{path}' (set --vision_model_path). "
                                f"{vision_help(path or DEFAULT_VISION_MODEL)}")
    config = AutoConfig.from_pretrained(path)
    vision_config = getattr(config, "vision_config", config)  # a full CLIP/SigLIP holds a text tower too
    if not hasattr(vision_config, "patch_size") or type(vision_config) not in MODEL_MAPPING:
        raise ValueError(f"'{path}' holds a {config.model_type} model, not a vision tower (CLIP or SigLIP): set "
                         f"--vision_model_path to a tower's folder")
    cls = MODEL_MAPPING[type(vision_config)]  # CLIPVisionConfig -> CLIPVisionModel, SiglipVisionConfig -> ...
    try:  # transformers reads a pytorch_model.bin with torch.load(weights_only=True)
        tower = cls.from_pretrained(path) if vision_config is config else _vision_half(cls, path, config)
    except pickle.UnpicklingError:
        weights = os.path.join(path, "pytorch_model.bin")
        raise ValueError(f"vision tower {weights if os.path.isfile(weights) else path} was refused: it holds more than "
                         f"tensors (objects whose loading could run code), or is damaged; get the tower again, "
                         f"as model.safetensors where it is offered") from None
    tower.requires_grad_(False)
    return tower.eval()


def _vision_half(cls, path, config):
    """The vision model of a full CLIP/SigLIP directory. transformers would list every key of the
    text half as "unexpected" in a load report; those keys (the full model's outside `vision_model.`)
    are skipped on purpose, so the report is held back and anything else it had to say is logged."""
    from transformers import AutoModel
    from transformers.utils import logging
    with torch.device("meta"):  # shapes only, no memory
        skipped = {k for k in AutoModel.from_config(config).state_dict() if not k.startswith("vision_model.")}
    log = logging.get_logger("transformers.modeling_utils")
    hold_back = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731
    log.addFilter(hold_back)
    try:
        tower, info = cls.from_pretrained(path, config=config.vision_config, output_loading_info=True)
    finally:
        log.removeFilter(hold_back)
    info["unexpected_keys"] = sorted(set(info["unexpected_keys"]) - skipped)
    problems = {kind: keys for kind, keys in info.items() if keys}
    if problems:
        log.warning(f"vision tower {path}: {problems}")
    return tower


def tower_token_count(tower):
    """Patch tokens per image: (image_size / patch_size)^2 of the tower's config."""
    return (tower.config.image_size // tower.config.patch_size) ** 2


def image_slot_error(per_row, n_images, n_per_image):
    """The rule for image placeholder slots, checked by training's collate (dataset/vlm_dataset.py)
    and by the model when it finds the slots itself: each row holds a whole number of images' runs
    of n_per_image slots, and the rows together those of the n_images images. per_row: each row's
    slot count, as Python ints (so checking reads no device). -> None when they fit, else what is wrong."""
    if sum(per_row) == n_images * n_per_image and not any(n % n_per_image for n in per_row):
        return None
    counts = f"{per_row[0]} image placeholder tokens" if len(per_row) == 1 else \
        f"{per_row} image placeholder tokens per row"
    return f"{counts} for {n_images} images: each image needs exactly {n_per_image}"


def tower_features(tower, pixel_values):
    """The tower's last-layer patch tokens: [N, 3, H, W] -> [N, n_patches, C]. CLIP puts a CLS
    token before the patches, which is dropped; SigLIP has none, so every token is kept. (SigLIP's
    last_hidden_state is after its post-layernorm, CLIP's before: each as its release used it.)
    A frozen tower runs without autograd; one with trainable parameters (the demo trains its own) with."""
    tower_dtype = next(tower.parameters()).dtype
    trainable = torch.is_grad_enabled() and any(p.requires_grad for p in tower.parameters())
    with torch.set_grad_enabled(trainable):
        tokens = tower(pixel_values=pixel_values.to(tower_dtype)).last_hidden_state  # [N, n_prefix + n_patches, C]
    return tokens[:, tokens.shape[1] - tower_token_count(tower):]


class MiniMindVLM(MiniMindForCausalLM):
    config_class = VLMConfig

    def __init__(self, config: VLMConfig, vision_tower=None, load_tower=True):
        if vision_tower is None and load_tower:
            vision_tower = load_vision_tower(config.vision_model_path)
        if vision_tower is not None:  # the tower decides what an image is: how many tokens, how wide
            config.vision_hidden_size = vision_tower.config.hidden_size
            config.image_token_count = tower_token_count(vision_tower)
        super().__init__(config)
        self.vision_proj = VisionProj(config.vision_hidden_size, config.dim, config.projector, config.proj_bias)
        # Attached after the base class initialised its weights, so the pretrained tower is left untouched.
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
        """[N, 3, H, W] -> patch features [N, image_token_count, C], in the tower's dtype (it follows the model)."""
        if self.vision_encoder is None:
            raise RuntimeError(f"This model has no vision tower. {vision_help(self.config.vision_model_path)}")
        return tower_features(self.vision_encoder, pixel_values)

    def embed(self, input_ids, pixel_values=None, image_features=None, image_mask=None, image_slots=None, **_):
        """Token embeddings with image features written over the image slots. [B, T, D]

        pixel_values [N, 3, H, W] (or precomputed image_features [N, image_token_count, C]) hold every
        image of the batch, consumed in slot order: row 0's images first, then row 1's, ...
        image_slots [N * image_token_count] are the slots as flat indices into [B*T], in that order:
        the trainer's collate finds and checks them on the CPU (dataset/vlm_dataset.py), so that no
        count here makes the host wait for a GPU. Without them they come from image_mask [B, T]
        (bool), as model/chat.py encoded them, so that the placeholder id typed in text stays text;
        without that, every placeholder id is a slot.
        """
        h = self.tok_embeddings(input_ids)  # [B, T, D]
        if image_features is None and pixel_values is not None and len(pixel_values):
            image_features = self.encode_images(pixel_values)
        if image_features is None:
            # No images, so no placeholders: every id is text, the placeholder's too (a typed '@' of
            # the released tokenizer, or one the model generates while decoding, where this runs
            # once per token without a check).
            if self.training:
                # A batch without images still touches the projection, so DDP finds a gradient for
                # it on every rank instead of hanging.
                h = h + 0.0 * sum(p.sum() for p in self.vision_proj.parameters()).to(h.dtype)
            return h
        if image_slots is None:
            image_slots = self.image_slots(input_ids, image_mask, len(image_features))
        n_images, n_per_image = image_features.shape[:2]
        if len(image_slots) != n_images * n_per_image:  # shapes only: no device read
            raise ValueError(f"{len(image_slots)} image slots for {n_images} images of {n_per_image} features each")
        proj_dtype = next(self.vision_proj.parameters()).dtype
        feats = self.vision_proj(image_features.to(proj_dtype))  # [N, image_token_count, D]
        # Written in place into h's own storage, so the blocks get h itself, not a view of a [B*T, D]
        # tensor: a compiled block guards on an input view's base, and only the first block's input
        # would be one, so every later block would miss the first one's graph and compile another.
        D = h.shape[-1]
        h.view(-1, D).index_copy_(0, image_slots, feats.reshape(-1, D).to(h.dtype))
        return h

    def image_slots(self, input_ids, image_mask, n_images):
        """The slots of image_mask [B, T] (or of every placeholder id) as flat indices into [B*T],
        checked against the images: each row needs a whole number of images' placeholders, and all
        rows together those of `n_images`. Reads the device (once per prompt when decoding)."""
        is_image = input_ids == self.config.image_token_id if image_mask is None else image_mask.bool()  # [B, T]
        error = image_slot_error(is_image.sum(1).tolist(), n_images, self.config.image_token_count)
        if error:
            raise ValueError(f"{error} (placeholder id {self.config.image_token_id})")
        return is_image.reshape(-1).nonzero().squeeze(1)
