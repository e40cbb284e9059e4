"""Command-line conventions shared by every script.

Every script's --help lists its flags in groups, each with its default, and answers at once: a
parser is built from modules that load neither torch nor transformers nor gradio, which a script
imports only after its flags are parsed. This module is one of them.
"""
import argparse

from dataset.video import DEFAULT_FRAMES, MAX_FRAMES, MAX_VIDEO_SECONDS
from model.paths import DEFAULT_VISION_MODEL
from model.precision import DTYPES

DEVICE_HELP = "auto: cuda:0 where CUDA is available, else cpu; or a device such as cuda:1 or cpu"
# dataset.samples.default_images_path says why
IMAGES_PATH_DEFAULT = "the images/ folder beside the jsonl, else the jsonl's own folder"
DTYPE_HELP = ("auto: bfloat16 where the hardware computes it natively (CUDA from Ampere on; a CPU with AMX or "
              "AVX-512 BF16), else float16 on CUDA and float32 on CPU")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The description as written, and after each option's help its default: "(default: X)", or
    "(required)", or nothing where the help says "default: ..." in its own words (as it must for a
    default of None, which the script decides at run time)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required and action.option_strings:
            return text + " (required)"
        if "default:" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def make_parser(description):
    """A script's parser: add its flags in groups (parser.add_argument_group), see HelpFormatter."""
    return argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)


def switch(add_argument, name, default=0, help=""):
    """An on/off flag that accepts `--name`, `--name 1` and `--name 0` (bare means 1), as users type
    both forms. Its value is the int 0 or 1."""
    add_argument(name, type=int, choices=[0, 1], nargs="?", const=1, default=default, metavar="0|1",
                 help=(help + " " if help else "") + "(bare: 1)")


def old_spelling(add_argument, old, new, **kwargs):
    """`old`, a flag's former name, still sets flag `new` (users' scripts keep working) but is not
    listed in --help. kwargs: the flag's type, nargs..."""
    add_argument(old, dest=new.lstrip("-"), default=argparse.SUPPRESS, help=argparse.SUPPRESS, **kwargs)


def add_model_args(parser):
    """The flags that choose a trained model and how it runs, shared by eval_vlm.py, the web demo,
    the API and the demo's scoring (model.inference.InferenceConfig holds their values)."""
    a = parser.add_argument_group("model", "which weights, and how they run").add_argument
    a("--weight", default="sft_vlm", help="a .pth path, a name (out_dir/{weight}_{dim}[_moe].pth), or a "
                                          "transformers-format directory (scripts/convert_model.py)")
    a("--load", type=int, choices=[0, 1], default=None, help=argparse.SUPPRESS)  # old; the path tells now
    a("--out_dir", default="out", help="where named weights are looked up")
    a("--dim", type=int, default=512, help="checked against (and taken from) the checkpoint")
    a("--n_layers", type=int, default=8, help="checked against (and taken from) the checkpoint")
    switch(a, "--use_moe", 0, help="checked against (and taken from) the checkpoint")
    a("--vision_model_path", help="the vision tower's directory (CLIP or SigLIP); default: the one the weights' "
                                   "record names, else " + DEFAULT_VISION_MODEL)
    a("--tokenizer_path", help="the tokenizer's directory; default: the one the weights' record names (a .pth "
                               "without a record, as the released ones, needs it given)")
    switch(a, "--ignore_record", 0, help="use --tokenizer_path / --vision_model_path even where they differ from "
                                         "what the weights' record says they were trained with")
    a("--image_token_id", type=int, default=-1,
      help="placeholder id; -1 = <|image_pad|>, or '@' (34) with the released tokenizer")
    a("--device", default="auto", help=DEVICE_HELP)
    a("--dtype", default="auto", choices=DTYPES, help=DTYPE_HELP)
    switch(a, "--open_thinking", 0,
           help="let the model reason before answering, where the chat template supports it (the 2026 "
                "release's <think> block); answers are shown without the reasoning")
    a("--lora", metavar="PATH", help="a LoRA adapter (train_*_vlm.py --lora_rank writes "
                                     "{save_weight}_{dim}_lora.safetensors) applied to --weight, without merging "
                                     "(default: none)")
    a("--quantize", default="none", choices=["none", "int8"],
      help="int8: the LLM's linear layers get int8 weights (dynamic quantization, CPU only): about 1.5x "
           "faster decoding at batch 1, at the cost of answers that can differ slightly from full precision")
    return parser


def add_video_args(parser):
    """--frames and --max_video_seconds, for every script that reads videos."""
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"frames taken from a video, uniformly over its length (1-{MAX_FRAMES}); each is one "
                             f"image in the prompt, with its timestamp")
    parser.add_argument("--max_video_seconds", type=float, default=MAX_VIDEO_SECONDS,
                        help="longer videos are refused")
    return parser


def preparing_progress(path, done, total):
    """dataset.samples.open_source's progress, printed on one line while a parquet file is made
    randomly accessible (once)."""
    print(f"\rpreparing {path} for random access (once): {done}/{total} rows", end="\n" if done == total else "",
          flush=True)
