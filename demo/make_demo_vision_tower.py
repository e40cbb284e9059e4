"""Build a randomly initialised, CLIP-shaped vision tower for the offline demo.

The real CLIP ViT-B/16 cannot be downloaded in an offline sandbox. This script
saves a stand-in with the same interface: ViT-B/16 geometry (224x224 input,
16x16 patches, so 196 patch tokens + CLS) but a smaller width and depth. It is
written as ``save_pretrained`` writes it, next to a standard ``CLIPImageProcessor``, so
``CLIPVisionModel.from_pretrained(dir)`` and ``AutoImageProcessor.from_pretrained(dir)``
load it just like a real CLIP checkpoint.

This script's tower is untrained (`demo/demo.py --tower_steps 0`, and the tests' stand-in);
`demo/train_demo_tower.py` starts from it and teaches it the demo's world. A frozen random ViT still
passes on each 16x16 patch almost linearly, so colour and position survive in the patch tokens, but
the shape of an object, spread over the edges of several patches, is readable only nonlinearly.
Keep it shallow (the default is 2 layers): every extra random layer mixes the tokens a bit more.

``build_vision_tower(..., full_clip=True)`` saves a full ``CLIPModel`` (vision tower plus a tiny
text tower) instead, so the tests can check the loader against both kinds of directory.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import make_parser  # noqa: E402

# The standard OpenAI CLIP normalisation constants.
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
# The demo tower's depth, here and in train_demo_tower.py and demo.py: with 2 layers a run's tower
# reads an object's shape less surely (docs/demo-experiments.md, "a tower of three layers").
TOWER_LAYERS = 3


def geometry_problem(image_size, patch_size):
    """Why a tower of this image and patch size would not see the whole image, or None."""
    if image_size % patch_size:
        return (f"--image_size {image_size} is not a multiple of --patch_size {patch_size}: the patches would "
                f"leave a strip of every image unseen")
    return None


def make_vision_tower(hidden_size=256, num_layers=TOWER_LAYERS, num_heads=4, intermediate_size=None, seed=0,
                      position_std=1.0, patch_size=16, image_size=224):
    """A random-init CLIPVisionModel of ViT-B/16 geometry and the standard CLIP image processor."""
    import torch  # here: the --help of this script and of train_demo_tower.py answers without torch
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from model.images import clip_processor
    torch.manual_seed(seed)  # same seed -> same weights
    model = CLIPVisionModel(CLIPVisionConfig(**vision_config(hidden_size, num_layers, num_heads, intermediate_size,
                                                                  patch_size, image_size)))
    # The default init (std 0.02) makes the position embeddings ~40x smaller than a patch's content
    # embedding (~0.9 here), so identical background patches would look the same wherever they are.
    # A trained ViT's position embeddings are of the same order as the content; match that, so
    # the patch tokens say where they are and "top left" is learnable.
    with torch.no_grad():
        getattr(model, "vision_model", model).embeddings.position_embedding.weight.normal_(0.0, position_std)
    # The same preprocessing as real CLIP (at its 224 px): resize the short side, centre-crop a square, normalise.
    processor = clip_processor(size={"shortest_edge": image_size},
                               crop_size={"height": image_size, "width": image_size},
                               do_resize=True, do_center_crop=True, do_normalize=True,
                               image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)  # 3 = bicubic
    return model.eval(), processor


def vision_config(hidden_size, num_layers, num_heads, intermediate_size=None, patch_size=16, image_size=224):
    return dict(hidden_size=hidden_size, intermediate_size=intermediate_size or 4 * hidden_size,
                num_hidden_layers=num_layers, num_attention_heads=num_heads,
                image_size=image_size, patch_size=patch_size, num_channels=3, projection_dim=hidden_size)


def build_vision_tower(out_dir, hidden_size=256, num_layers=TOWER_LAYERS, num_heads=4,
                       intermediate_size=None, seed=0, full_clip=False, verbose=True, position_std=1.0,
                       patch_size=16, image_size=224):
    """Save a random-init CLIP vision tower (or full CLIP model) and its processor to out_dir.

    Returns the number of parameters of the vision tower.
    """
    model, processor = make_vision_tower(hidden_size, num_layers, num_heads, intermediate_size, seed, position_std,
                                         patch_size, image_size)
    n_params = sum(p.numel() for p in model.parameters())
    if full_clip:
        from transformers import CLIPConfig, CLIPModel
        text_cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                        vocab_size=1000, max_position_embeddings=77, projection_dim=hidden_size,
                        bos_token_id=0, eos_token_id=1, pad_token_id=1)
        full = CLIPModel(CLIPConfig(text_config=text_cfg, projection_dim=hidden_size,
                                    vision_config=vision_config(hidden_size, num_layers, num_heads, intermediate_size,
                                                                patch_size, image_size)))
        # Same vision weights as the vision-only tower of this seed, so both layouts give identical features.
        # (transformers 5 flattened CLIPVisionModel; older versions wrap it in .vision_model.)
        full.vision_model.load_state_dict(getattr(model, "vision_model", model).state_dict())
        model = full.eval()
    write_tower(model, processor, out_dir)
    if verbose:
        kind = "full CLIPModel" if full_clip else "CLIPVisionModel"
        print(f"saved random-init {kind} (hidden {hidden_size}, {num_layers} layers, {num_heads} heads) "
              f"to {out_dir}; vision tower parameters: {n_params:,} ({n_params / 1e6:.2f}M)")
    return n_params


def write_tower(model, processor, out_dir):
    """What model.save_pretrained and processor.save_pretrained write (config.json, model.safetensors,
    preprocessor_config.json), without the former's unwrapping of distributed wrappers, which imports
    deepspeed where it is installed (and so prints its accelerator warning) for a model it never wraps."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.config.dtype = next(model.parameters()).dtype
    model.config.save_pretrained(out_dir)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    processor.save_pretrained(out_dir)


def main():
    ap = make_parser("Save a random-init CLIP ViT-B/16-geometry vision tower for the demo.")
    add = ap.add_argument
    add("--out_dir", default="model/vision_model/demo-clip-vit-b16", help="where to save model + processor")
    for flag, default, what in (("--hidden_size", 256, "token width (real ViT-B/16: 768)"),
                                ("--num_layers", TOWER_LAYERS, "transformer layers (real ViT-B/16: 12)"),
                                ("--num_heads", 4, "attention heads (must divide hidden_size)"),
                                ("--intermediate_size", None, "MLP width (default: 4 * hidden_size)"),
                                ("--patch_size", 16, "16: 196 tokens per image (ViT-B/16); 32: 49 (ViT-B/32)"),
                                ("--image_size", 224, "the side the processor resizes images to (CLIP: 224)"),
                                ("--seed", 0, "torch seed for the random weights")):
        add(flag, type=int, default=default, help=what)
    a = ap.parse_args()
    if problem := geometry_problem(a.image_size, a.patch_size):
        ap.error(problem)
    build_vision_tower(a.out_dir, a.hidden_size, a.num_layers, a.num_heads, a.intermediate_size, a.seed,
                       patch_size=a.patch_size, image_size=a.image_size)


if __name__ == "__main__":
    main()
