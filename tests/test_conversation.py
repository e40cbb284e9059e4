"""model.chat's conversation builder: what eval, the web demo and the API make of a user's text,
images and videos, and the limits they all check the same way."""
import pytest
from PIL import Image

from model.chat import IMAGE_TAG, Video, check_image_count, check_room, user_content


def test_parts_become_one_tag_per_picture_and_frame_in_order():
    red, blue = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    frames = [Image.new("RGB", (8, 8), c) for c in ("green", "black")]
    content, images = user_content([red, Video(frames, [0.5, 1.5]), "Compare them.", blue])
    assert content == "<image>\nFrame 1 at 0.5s: <image>\nFrame 2 at 1.5s: <image>\nCompare them.\n<image>"
    assert images == [red, *frames, blue]


def test_typed_tags_are_text_and_take_no_image_slot():
    content, images = user_content(["What does <image> mean, and <video>?"])
    assert IMAGE_TAG not in content and "<video>" not in content
    assert content == "What does [image] mean, and [video]?" and images == []


def test_empty_text_adds_no_line():
    image = Image.new("RGB", (8, 8))
    assert user_content([image, ""]) == ("<image>", [image])


def test_the_limits_name_the_numbers():
    check_image_count(3, 3)
    with pytest.raises(ValueError, match=r"^4 images in the conversation .*at most 3"):
        check_image_count(4, 3)
    check_room(100, 28, 128)
    with pytest.raises(ValueError, match="the prompt has 100 tokens; with 29 new tokens that exceeds the model's limit of 128"):
        check_room(100, 29, 128)


def test_every_front_end_builds_the_same_turn_from_the_same_input(tmp_path):
    """The API's parts and the web demo's upload + text give the same content and images."""
    import argparse
    import base64
    import io

    import serve_openai_api
    import web_demo_vlm
    image = Image.new("RGB", (16, 16), "red")
    path = tmp_path / "red.png"
    image.save(path)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    api_messages, api_images = serve_openai_api.parse_messages(
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                      {"type": "text", "text": "Is <image> red?"}]}], max_images=3)
    args = argparse.Namespace(max_images=3, frames=2, max_video_seconds=60)
    state = {"display": [], "images": []}
    web_content, web_images = web_demo_vlm.user_turn(args, state, {"text": "Is <image> red?", "files": [str(path)]})
    assert api_messages == [{"role": "user", "content": web_content}] and web_content == "<image>\nIs [image] red?"
    assert [im.tobytes() for im in api_images] == [im.tobytes() for im in web_images] == [image.tobytes()]
