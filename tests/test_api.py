"""scripts/serve_openai_api.py: the real script in a subprocess on 127.0.0.1 with a tiny model, used
through the official openai client (and raw httpx for requests a client would never send)."""
import base64
import io
import os
import sys
import threading

import pytest
import torch
from PIL import Image

from model.model_vlm import MiniMindVLM, VLMConfig
from model.checkpoint import llm_state_dict

from conftest import ROOT, TINY_LLM, api_server, make_video

pytestmark = pytest.mark.slow  # a live server, one of them the real script in a subprocess

openai = pytest.importorskip("openai", reason="pip install openai")
httpx = pytest.importorskip("httpx", reason="pip install httpx")
MAX_MB = 2


def data_url(image, fmt="PNG"):
    buf = io.BytesIO()
    image.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buf.getvalue()).decode()}"


@pytest.fixture(scope="module")
def photo_url():
    from skimage import data
    return data_url(Image.fromarray(data.astronaut()).resize((256, 256)))


@pytest.fixture(scope="module")
def server(tower_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    torch.manual_seed(0)
    pth = str(root / "sft_vlm_64.pth")
    torch.save(llm_state_dict(MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM))), pth)
    with api_server(["--weight", pth, "--vision_model_path", tower_dir, "--tokenizer_path", "model",
                     "--device", "cpu", "--dtype", "float32", "--max_request_mb", MAX_MB, "--max_images", 2,
                     "--frames", 2], root / "server.log") as (base, http, proc):
        yield {"base": base, "http": http, "proc": proc}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["base"] + "/v1", api_key="unused", max_retries=0,
                         http_client=httpx.Client(trust_env=False, timeout=60))


def image_question(url, text="What is in the picture?"):
    return [{"role": "user", "content": [{"type": "text", "text": text},
                                         {"type": "image_url", "image_url": {"url": url}}]}]


def test_models_endpoint(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["sft_vlm_64"]
    assert server["http"].get("/health").json() == {"status": "ok"}


def test_completion_with_an_image(client, photo_url):
    r = client.chat.completions.create(model="sft_vlm_64", messages=image_question(photo_url), max_tokens=12,
                                       temperature=1.0, top_p=0.95, seed=1)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content and r.choices[0].finish_reason in ("stop", "length")
    u = r.usage
    assert u.prompt_tokens > 196 and 1 <= u.completion_tokens <= 12
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    text_only = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hello"}], max_tokens=3)
    assert u.prompt_tokens - text_only.usage.prompt_tokens >= 196  # the image's placeholders are counted
    again = client.chat.completions.create(model="sft_vlm_64", messages=image_question(photo_url), max_tokens=12,
                                           temperature=1.0, top_p=0.95, seed=1)
    assert again.choices[0].message.content == r.choices[0].message.content  # seed honoured


def test_streaming_with_an_image(client, photo_url):
    stream = client.chat.completions.create(model="sft_vlm_64", messages=image_question(photo_url), max_tokens=16,
                                            temperature=1.0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) >= 3 and "".join(pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage.prompt_tokens > 196 and 1 <= usage.completion_tokens <= 16


def test_raw_sse_format(server, photo_url):
    body = {"messages": image_question(photo_url), "max_tokens": 4, "stream": True}
    with server["http"].stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def test_history_and_image_positions(client, photo_url):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo_url}},
                                             {"type": "text", "text": "What is it?"}]},
                {"role": "assistant", "content": "A person."},
                {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                             {"type": "image_url", "image_url": {"url": photo_url}}]}]
    r = client.chat.completions.create(model="x", messages=messages, max_tokens=4)
    assert r.usage.prompt_tokens > 2 * 196


def error_of(response, status):
    assert response.status_code == status, response.text
    err = response.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    return err


def test_bad_requests_get_openai_style_errors_and_the_server_stays_up(server, client, photo_url):
    http = server["http"]
    post = lambda **kw: http.post("/v1/chat/completions", **kw)  # noqa: E731
    assert "not valid JSON" in error_of(post(content=b'{"messages": [', headers={"content-type": "application/json"}),
                                        400)["message"]
    assert error_of(post(json={"model": "x"}), 400)["param"] == "messages"
    assert "must be a non-empty list" in error_of(post(json={"messages": "hi"}), 400)["message"]
    not_image = "data:image/png;base64," + base64.b64encode(b"this is plain text, not a PNG").decode()
    assert "not an image" in error_of(post(json={"messages": image_question(not_image)}), 400)["message"]
    assert "not valid base64" in error_of(post(json={"messages": image_question("data:image/png;base64,@@@")}),
                                          400)["message"]
    assert error_of(post(json={"messages": image_question("https://example.com/cat.png")}), 400)["code"] == \
        "url_not_allowed"
    assert error_of(post(json={"messages": image_question("/etc/hostname")}), 400)["code"] == "local_files_disabled"
    assert error_of(post(json={"messages": image_question("file:///etc/hostname")}), 400)["code"] == \
        "local_files_disabled"
    three = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": photo_url}}] * 3}]
    assert error_of(post(json={"messages": three}), 400)["code"] == "too_many_images"
    big = {"messages": [{"role": "user", "content": "x" * (MAX_MB * 2**20 + 10)}]}
    assert error_of(post(json=big), 413)["code"] == "request_too_large"
    assert error_of(post(json={"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}), 400)["param"] \
        == "temperature"
    assert error_of(post(json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}), 400)["code"] \
        == "context_length_exceeded"
    assert error_of(post(json={"messages": [{"role": "robot", "content": "hi"}]}), 400)["param"] == "messages[0].role"
    assert error_of(post(json={"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400)["param"] == \
        "messages[0].content[0]"
    assert error_of(http.get("/v1/nothing"), 404)["code"] == "not_found"
    with pytest.raises(openai.BadRequestError) as e:  # the official client sees a normal API error
        client.chat.completions.create(model="x", messages=image_question("http://example.com/a.png"))
    assert "does not fetch URLs" in str(e.value)
    assert server["proc"].poll() is None
    r = client.chat.completions.create(model="x", messages=image_question(photo_url), max_tokens=4)
    assert r.choices[0].message.content is not None and r.usage.completion_tokens >= 1


def test_concurrent_streaming_requests_are_all_answered(client, photo_url):
    results, errors = [], []

    def ask():
        try:
            chunks = list(client.chat.completions.create(model="x", messages=image_question(photo_url),
                                                         max_tokens=8, temperature=1.0, stream=True))
            results.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
        except Exception as e:  # noqa: BLE001
            errors.append(e)
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 3 and all(results)


def test_local_files_only_when_allowed(tmp_path):
    """decode_image itself: paths and file:// URLs inside the --allow_local_files folder, never the network
    (tests/test_api_hostile.py tries to get out of the folder)."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from serve_openai_api import APIError, decode_image
    path = tmp_path / "a b.png"
    Image.new("RGB", (2000, 100), "red").save(path)
    root = os.path.realpath(tmp_path)
    assert decode_image(str(path), "img", root).size == (1024, 51)
    assert decode_image(path.as_uri(), "img", root).size == (1024, 51)
    with pytest.raises(APIError, match="local files are refused"):
        decode_image(str(path), "img")
    with pytest.raises(APIError, match="does not fetch URLs"):
        decode_image("https://example.com/a.png", "img", root)


def video_question(url, text="What happens?"):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def test_a_video_url_part_becomes_its_frames_and_bad_videos_get_clear_errors(server, client, photo_url, tmp_path):
    with open(make_video(tmp_path / "clip.mp4"), "rb") as f:
        clip = f.read()
    url = "data:video/mp4;base64," + base64.b64encode(clip).decode()
    r = client.chat.completions.create(model="x", messages=video_question(url), max_tokens=4)
    text_only = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "What happens?"}],
                                               max_tokens=3)
    assert r.choices[0].message.content is not None
    assert r.usage.prompt_tokens - text_only.usage.prompt_tokens >= 2 * 196  # --frames 2: two images' placeholders
    post = lambda messages: server["http"].post("/v1/chat/completions", json={"messages": messages})  # noqa: E731
    with_image = video_question(url)
    with_image[0]["content"].append({"type": "image_url", "image_url": {"url": photo_url}})
    assert error_of(post(with_image), 400)["code"] == "too_many_images"  # 2 frames + 1 image > --max_images 2
    for bad, reason in ((b"not a video at all", "not a video"), (clip[:len(clip) // 2], "truncated")):
        err = error_of(post(video_question("data:video/mp4;base64," + base64.b64encode(bad).decode())), 400)
        assert err["code"] == "invalid_video" and reason in err["message"]
    assert server["proc"].poll() is None
