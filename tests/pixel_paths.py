"""Run by test_torchvision_pixels.py, once in the test environment and once in one with torchvision:
the pixels every entry point makes of each image in DIR/images, saved to OUT.

    python tests/pixel_paths.py DIR OUT

DIR holds images/, data.jsonl (one sample per image, in order), tower/, w.pth (with its record)
and hf/ (its transformers export). OUT gets {"torchvision": version or None, "default_processor":
the class AutoImageProcessor picks here, "pixels": {image: {entry: [1, 3, H, W]}}, "default": {image:
the pixels of that default processor}}.
"""
import base64
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts")]


def main(root, out):
    import transformers
    import eval_vlm
    import serve_openai_api
    import trainer.build
    import trainer.config
    import trainer.distributed
    import web_demo_vlm
    from cache_features import Pixels
    from dataset.samples import open_source
    from model.images import open_image, to_pixels
    from model.inference import InferenceConfig, VLMChat, load_model
    try:
        import torchvision
        tv = torchvision.__version__
    except ImportError:
        tv = None
    names = sorted(os.listdir(os.path.join(root, "images")))
    data, images, tower = (os.path.join(root, p) for p in ("data.jsonl", "images", "tower"))

    cfg = trainer.config.TrainConfig(**vars(trainer.config.build_parser(
        "pixels", epochs=1, batch_size=2, learning_rate=1e-3, max_seq_len=640, from_weight="none",
        save_weight="pixels", freeze_llm=1).parse_args(["--data_path", data, "--images_path", images, "--vision_model_path", tower, "--tokenizer_path", "model",
         "--dim", "64", "--n_layers", "2", "--num_workers", "0", "--device", "cpu", "--dtype", "float32",
         "--out_dir", os.path.join(out + ".run")])))
    training = trainer.build.build_run(cfg, trainer.distributed.Cluster()).loader.dataset
    model, tokenizer, processor = load_model(InferenceConfig(weight=os.path.join(root, "w.pth"), device="cpu",
                                                             dtype="float32"))
    chat = VLMChat(model, tokenizer, processor)
    web_args = web_demo_vlm.parse_args(["--weight", os.path.join(root, "w.pth")])
    cache_builder = Pixels(open_source(data, images), [(i, 0, f"line {i + 1}") for i in range(len(names))],
                           processor)
    exported = transformers.AutoModelForCausalLM.from_pretrained(os.path.join(root, "hf"), trust_remote_code=True,
                                                                 dtype=torch.float32)
    seen = []
    exported.vision_encoder.register_forward_pre_hook(lambda module, args, kwargs: seen.append(
        kwargs.get("pixel_values", args[0] if args else None)), with_kwargs=True)
    default = transformers.AutoImageProcessor.from_pretrained(tower)

    result = {"torchvision": tv, "default_processor": type(default).__name__, "pixels": {}, "default": {}}
    for i, name in enumerate(names):
        path = os.path.join(images, name)
        with open(path, "rb") as f:
            url = "data:image/png;base64," + base64.b64encode(f.read()).decode()
        seen.clear()
        exported.chat(path, "What is it?", max_new_tokens=1)
        result["pixels"][name] = {
            "training": training[i]["pixel_values"],
            "cache": cache_builder[i][None],
            "eval": chat.pixels(eval_vlm.load_images([path])),
            "web demo": chat.pixels([web_demo_vlm.read_upload(web_args, path)]),
            "api": chat.pixels([serve_openai_api.decode_image(url, "messages[0].content[0]")]),
            "exported chat()": seen[0].float(),
        }
        result["default"][name] = to_pixels(default, [open_image(path)])
    torch.save(result, out)


if __name__ == "__main__":
    main(*sys.argv[1:])
