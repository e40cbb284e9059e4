"""Merge a LoRA adapter into its base weights: an ordinary .pth in the base's key format.

    python scripts/merge_lora.py --weight out/pretrain_vlm_512.pth \
        --lora out/sft_vlm_512_lora.safetensors --out out/sft_vlm_merged_512.pth

train_*_vlm.py --lora_rank R already writes the merged .pth beside the adapter; this is for an
adapter applied to other base weights (the released ones, say), or shared on its own. The
result loads anywhere a .pth does: eval_vlm.py, the web demo, the API, convert_model.py. No vision
tower is needed: the adapter's projector decides the projector's shape.
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import make_parser  # noqa: E402


def build_parser():
    ap = make_parser(__doc__)
    ap.add_argument("--weight", required=True, help="the base .pth the adapter was trained on")
    ap.add_argument("--lora", required=True, help="the adapter: {save_weight}_{dim}_lora.safetensors")
    ap.add_argument("--out", required=True, help="the merged .pth to write")
    return ap


if __name__ == "__main__":
    build_parser().parse_args()  # --help and a mistyped flag answer here, before torch loads (seconds)

from model.checkpoint import (check_state_dict, infer_config_from_state_dict, llm_state_dict, load_weights,  # noqa: E402
                              read_checkpoint)
from model.files import CheckpointError, atomic_save, non_finite_keys  # noqa: E402
from model.lora import adapter_projector, load_adapter, merge_lora  # noqa: E402
from model.paths import RunFiles  # noqa: E402
from model.model_vlm import MiniMindVLM, VLMConfig  # noqa: E402
from model.record import read_record, write_record  # noqa: E402


def projector_shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items() if k.startswith("vision_proj.")}  # the same names in both releases


def check_projector(weight, sd, lora):
    """The adapter brings the projector it trained, for the vision tower it trained with. Base weights
    whose own projector is of another kind or for another tower width were used with another tower:
    merged, the result would need the adapter's tower but record the base's. Only other base weights
    fix that (the model's loader would blame the tower, which this script does not take)."""
    ours, theirs = projector_shapes(sd), projector_shapes(adapter_projector(lora))
    if not ours or not theirs or ours == theirs:
        return
    key = min(k for k in ours.keys() | theirs.keys() if ours.get(k) != theirs.get(k))
    shape = {name: list(shapes[key]) if key in shapes else "absent" for name, shapes in (("a", theirs), ("w", ours))}
    base = read_record(RunFiles.from_file(lora, "adapter").weights) or {}  # the run that wrote the adapter
    example = (f", e.g. {base['trained_from']}, which its training run started from" if base.get("trained_from")
               else ", e.g. the .pth its training run started from (its --from_weight)")
    raise ValueError(f"--lora {lora} does not fit --weight {weight}: {key} is {shape['a']} in the adapter, "
                     f"{shape['w']} in the weights (a projector of another kind, or for another vision tower); pass "
                     f"as --weight base weights whose projector is like the adapter's{example}")


def merge(weight, lora, out):
    """base .pth + adapter file -> merged .pth at `out` (atomic). Raises CheckpointError/ValueError."""
    sd = check_state_dict(read_checkpoint(weight), weight)
    check_projector(weight, sd, lora)
    found = infer_config_from_state_dict({**sd, **adapter_projector(lora)}, weight)
    model = MiniMindVLM(VLMConfig(**found), load_tower=False)
    load_weights(model, sd, weight)
    merge_lora(load_adapter(model, lora))
    merged = llm_state_dict(model)  # the key format of the base's generation
    bad = non_finite_keys(merged)
    if bad:  # finite inputs can still overflow: nothing non-finite is written
        raise ValueError(f"--lora {lora} merged into {weight} gives NaN or inf in {bad[:3]}: {out} not written; "
                         f"use another adapter")
    atomic_save(merged, out)
    record = read_record(weight)
    if record:  # the same tokenizer and tower as the base
        write_record({**record, "trained_from": os.path.abspath(weight), "lora": os.path.abspath(lora)}, out)
    return out


def main(argv=None):
    a = build_parser().parse_args(argv)
    try:
        print(f"wrote {merge(a.weight, a.lora, a.out)}")
    except (CheckpointError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
