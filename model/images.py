"""The one way an image becomes pixels: training, benchmark, feature cache, web demo, API and the
exported model's chat() all call `open_image`, then `to_pixels` with the processor `load_processor`
gives, so a model sees the same pixels wherever an image comes from and whether or not torchvision
is installed. It lives beside the model because it is part of what a model is: an export carries it.

open_image: a path, bytes or file object -> RGB PIL image
  - EXIF orientation applied (a phone photo is upright in training as in serving);
  - palette, greyscale, CMYK and alpha converted to RGB; transparent pixels become white, not
    whatever colour happens to be stored under them;
  - at most MAX_IMAGE_SIDE on its longest side (the tower resizes to 224 or 256 anyway, and a JPEG is
    then decoded at a reduced scale straight away);
  - a decompression bomb, a truncated or corrupt file, or a file that is not an image raises
    ImageError (a ValueError) with a readable reason, so callers treat it as a per-sample error.
"""
import io
import os
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_IMAGE_SIDE = 1024
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own limit (~89M); larger is refused, not decoded


class ImageError(ValueError):
    """An image that cannot be used; the message says why (no traceback needed)."""


def refuse_special_file(source, label, error):
    """A path to a FIFO, socket, device or folder is refused by name: opening a FIFO waits for a
    writer forever."""
    if isinstance(source, (str, os.PathLike)) and os.path.exists(source) and not os.path.isfile(source):
        raise error(f"{label} is not a regular file (a FIFO, socket, device or folder)")


def open_image(source, name=None, max_side=MAX_IMAGE_SIDE):
    label = name or (os.path.basename(source) if isinstance(source, (str, os.PathLike)) else "the image")
    refuse_special_file(source, label, ImageError)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; both are refused here.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(fp) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(im.size)
                im.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale straight away
                im = from_pil(im, max_side)  # decodes the whole image: errors show here
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{label} has too many pixels (at most {MAX_IMAGE_PIXELS:,}): "
                         "a decompression bomb, or an image to shrink first") from None
    except FileNotFoundError:
        raise ImageError(f"{label} not found") from None
    except Image.UnidentifiedImageError:
        raise ImageError(f"{label} is not an image (use a JPEG, PNG, WebP, GIF or BMP picture)") from None
    except Exception as e:  # PIL raises many kinds for bad bytes (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"{label} is a corrupt or truncated image ({type(e).__name__}: {e})") from None
    return im


def from_pil(im, max_side=MAX_IMAGE_SIDE):
    """A PIL image (decoded or not) -> what open_image gives: upright, RGB, at most max_side."""
    return shrink(to_rgb(ImageOps.exif_transpose(im)), max_side)


def shrink(im, max_side=MAX_IMAGE_SIDE):
    """At most max_side pixels on the longest side (aspect kept, bicubic): also a video's frames."""
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
    return im


def to_rgb(im):
    """Any PIL mode -> RGB; alpha (also a palette's transparent colour) is composited over white."""
    if im.mode == "RGB":
        return im
    if im.mode == "P" and "transparency" in im.info or im.mode in ("LA", "PA", "La", "RGBa"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    if im.mode.startswith("I;16") or im.mode == "I":  # 16-bit greyscale (PNG): keep the high byte
        im = Image.fromarray((np.asarray(im, dtype=np.int64).clip(0, 65535) >> 8).astype(np.uint8))
    return im.convert("RGB")


def load_processor(path):
    """The tower's image processor, from its directory, always in its PIL/numpy form: the same
    pixels on every machine, whether or not torchvision (the fast form's backend) is installed."""
    import transformers
    from transformers import AutoImageProcessor
    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(path, backend="pil")
    return AutoImageProcessor.from_pretrained(path, use_fast=False)


def clip_processor(**settings):
    """A CLIP image processor made from its settings, in the same PIL/numpy form (transformers 5 names
    that form CLIPImageProcessorPil; its plain name there wants torchvision and warns without it).
    It saves as a CLIPImageProcessor, which load_processor reads back."""
    try:
        from transformers import CLIPImageProcessorPil as processor_class
    except ImportError:  # transformers 4: the plain class is the PIL one
        from transformers import CLIPImageProcessor as processor_class
    return processor_class(**settings)


def to_pixels(processor, images):
    """RGB PIL images -> the tower's input [N, 3, H, W] (float32), through its image processor.
    No images gives [0, 3, H, W], so a batch can always concatenate its images."""
    if not images:
        return empty_pixels(processor)
    return processor(images=list(images), return_tensors="pt")["pixel_values"]


def empty_pixels(processor):
    """[0, 3, H, W] in the processor's output size, learned once by running it on a blank image (so it
    holds for any CLIP or SigLIP processor, whatever its resize and crop settings)."""
    shape = getattr(processor, "_pixel_shape", None)
    if shape is None:
        shape = processor(images=[Image.new("RGB", (8, 8))], return_tensors="pt")["pixel_values"].shape[1:]
        processor._pixel_shape = shape
    import torch  # only here: scripts load this module before parsing their flags (--help without torch)
    return torch.zeros(0, *shape)
