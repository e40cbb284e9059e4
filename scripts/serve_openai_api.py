"""An OpenAI-compatible chat API for MiniMind-V (FastAPI + uvicorn).

    python scripts/serve_openai_api.py --weight sft_vlm --dim 512        # http://127.0.0.1:8998/v1

POST /v1/chat/completions takes the OpenAI chat format: `content` is a string or a list of
{"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
parts; each image becomes an <image> slot where its part stands. `stream: true` answers with
server-sent events (`data: {chunk}` ... `data: [DONE]`). GET /v1/models lists the model.
The server never fetches URLs; local paths / file:// URLs only with --allow_local_files.
One generation runs at a time (the model is shared); other requests wait.
"""
import argparse
import asyncio
import base64
import binascii
import json
import os
import sys
import threading
import time
import uuid
from urllib.parse import unquote, urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402

from dataset.lm_dataset import IMAGE_TAG  # noqa: E402
from dataset.images import open_image  # noqa: E402
from model.inference import VLMChat, add_model_args, load_model, resolve_weight_path  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description="OpenAI-compatible API server for MiniMind-V")
    add_model_args(ap)
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    ap.add_argument("--port", type=int, default=8998)
    ap.add_argument("--max_images", type=int, default=4, help="images per request (196 tokens each)")
    ap.add_argument("--max_request_mb", type=float, default=20, help="largest request body accepted")
    ap.add_argument("--allow_local_files", action="store_true",
                    help="accept image paths / file:// URLs on the server's disk (off: only data: URLs)")
    ap.add_argument("--max_seq_len", type=int, default=0, help="prompt + answer token limit; 0 = the model's")
    ap.add_argument("--max_tokens", type=int, default=512, help="answer length when a request gives none")
    ap.add_argument("--temperature", type=float, default=0.85, help="when a request gives none")
    ap.add_argument("--top_p", type=float, default=0.85, help="when a request gives none")
    ap.add_argument("--model_name", default=None, help="the model id reported (default: the weight's name)")
    return ap.parse_args(argv)


class APIError(Exception):
    def __init__(self, message, status=400, param=None, code=None, type_="invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_

    def response(self):
        return error_response(self.message, self.status, self.param, self.code, self.type)


def error_response(message, status=400, param=None, code=None, type_="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def decode_image(url, where, allow_local):
    """An image_url value -> RGB PIL image (shrunk to at most 1024 px). Never touches the network."""
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}: image_url.url must be a non-empty string", param=where)
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise APIError(f"{where}: expected a base64 data URL like data:image/png;base64,...", param=where)
        try:
            raw = base64.b64decode("".join(payload.split()), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(f"{where}: the data URL is not valid base64", param=where) from None
        source, name = raw, f"{where} (data URL)"
    else:
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise APIError(f"{where}: this server does not fetch URLs. Send the image inline as a data URL "
                           "(data:image/png;base64,...)", param=where, code="url_not_allowed")
        if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
            raise APIError(f"{where}: unsupported URL scheme '{scheme}': use a data URL", param=where)
        if not allow_local:
            raise APIError(f"{where}: local files are refused (start the server with --allow_local_files to allow "
                           "them); send the image inline as a data URL", param=where, code="local_files_disabled")
        source = unquote(urlparse(url).path) if scheme == "file" else url
        name = f"{where} ({source})"
    try:
        return open_image(source, name=name)
    except ValueError as e:
        raise APIError(str(e), param=where, code="invalid_image") from None


def parse_messages(messages, max_images, allow_local):
    """OpenAI messages -> (our messages with <image> tags, images in tag order)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    n_images = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
                   for p in m["content"] if isinstance(p, dict) and p.get("type") == "image_url")
    if n_images > max_images:
        raise APIError(f"{n_images} images in the request; at most {max_images} (each takes 196 tokens of the "
                       "model's context)", param="messages", code="too_many_images")
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"{where}.role must be 'system', 'user' or 'assistant', got {m.get('role')!r}",
                           param=f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            text = content.replace(IMAGE_TAG, "[image]")  # typed text never takes an image slot
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise APIError(f"{pwhere}.text must be a string", param=pwhere)
                    pieces.append(part["text"].replace(IMAGE_TAG, "[image]"))
                elif kind == "image_url":
                    if role != "user":
                        raise APIError(f"{pwhere}: images are only accepted in user messages", param=pwhere)
                    spec = part.get("image_url")
                    images.append(decode_image(spec.get("url") if isinstance(spec, dict) else spec, pwhere,
                                               allow_local))
                    pieces.append(IMAGE_TAG)
                else:
                    raise APIError(f"{pwhere}: unsupported content part type {kind!r} (use 'text' or 'image_url')",
                                   param=pwhere)
            text = "\n".join(pieces)
        else:
            raise APIError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        out.append({"role": role, "content": text})
    if out[-1]["role"] == "assistant":
        raise APIError("the last message must be a user (or system) message", param="messages")
    return out, images


def number(body, key, default, lo, hi, integer=False):
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise APIError(f"'{key}' must be {kind} between {lo} and {hi}, got {value!r}", param=key)
    return value


class Engine:
    """The shared model behind one lock; a generation runs in a worker thread and reports pieces."""

    def __init__(self, chat: VLMChat, max_seq_len=0):
        self.chat, self.lock = chat, threading.Lock()
        self.max_seq_len = max_seq_len or chat.model.config.max_seq_len

    def run(self, job, emit):
        """Worker thread: emit(("piece", text)) ..., then emit(("done", info)) or emit(("error", msg))."""
        chat, tok = self.chat, self.chat.tokenizer
        new, shown, finish = [], "", "length"
        try:
            with self.lock:
                if job["cancel"].is_set():
                    return
                if job["seed"] is not None:
                    torch.manual_seed(job["seed"])
                ids = torch.tensor([job["ids"]], device=chat.device)
                for t in chat.model.generate_stream(ids, pixel_values=chat.pixels(job["images"]),
                                                    max_new_tokens=job["max_tokens"], temperature=job["temperature"],
                                                    top_p=job["top_p"], eos_token_id=tok.eos_token_id):
                    if job["cancel"].is_set():
                        return
                    t = int(t[0])
                    if t == tok.eos_token_id:
                        finish = "stop"
                        break
                    new.append(t)
                    text = tok.decode(new, skip_special_tokens=True)
                    if not text.endswith("\ufffd") and len(text) > len(shown):  # whole characters only
                        emit(("piece", text[len(shown):]))
                        shown = text
        except Exception as e:  # reported to the client; the server goes on
            emit(("error", f"generation failed: {e}"))
            return
        emit(("done", {"completion_tokens": len(new), "finish_reason": finish}))


def create_app(engine: Engine, args, model_id):
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None)
    created = int(time.time())
    max_bytes = int(args.max_request_mb * 1024 * 1024)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error_response(str(exc.detail), exc.status_code, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error_response(f"internal error: {exc}", 500, type_="server_error")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "minimind"}]}

    @app.get("/v1/models/{name:path}")
    async def model_info(name: str):
        if name != model_id:
            return error_response(f"model '{name}' not found; this server has '{model_id}'", 404,
                                  param="model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "minimind"}

    async def read_body(request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise APIError(f"request body of {int(declared) / 2**20:.1f} MB is larger than the "
                           f"{args.max_request_mb:g} MB limit", status=413, code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise APIError(f"request body is larger than the {args.max_request_mb:g} MB limit", status=413,
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def prepare(body):
        if not isinstance(body, dict):
            raise APIError("the request body must be a JSON object")
        if "messages" not in body:
            raise APIError("missing required parameter: 'messages'", param="messages")
        if body.get("n") not in (None, 1):
            raise APIError("only n=1 is supported", param="n")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise APIError("'stream' must be true or false", param="stream")
        temperature = float(number(body, "temperature", args.temperature, 0, 2))
        top_p = float(number(body, "top_p", args.top_p, 0, 1))
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(body, key, None, 1, 1 << 20, integer=True)
        seed = number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
        messages, images = parse_messages(body["messages"], args.max_images, args.allow_local_files)
        ids = engine.chat.encoder.encode_prompt(messages)
        room = engine.max_seq_len - len(ids)
        if max_tokens is None:
            max_tokens = min(args.max_tokens, room)
        if max_tokens < 1 or max_tokens > room:
            raise APIError(f"the prompt has {len(ids)} tokens; with {max_tokens} new tokens that exceeds the model's "
                           f"limit of {engine.max_seq_len}", param="messages", code="context_length_exceeded")
        options = body.get("stream_options") or {}
        return {"ids": ids, "images": images, "max_tokens": max_tokens, "temperature": temperature,
                "top_p": top_p if top_p > 0 else 1e-6, "seed": seed, "stream": stream,
                "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
                "cancel": threading.Event()}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            raw = await read_body(request)
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(f"the request body is not valid JSON ({e})") from None
            job = prepare(body)
        except APIError as e:
            return e.response()
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        emit = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)  # noqa: E731
        worker = loop.run_in_executor(None, engine.run, job, emit)
        rid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        usage = lambda n: {"prompt_tokens": len(job["ids"]), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(job["ids"]) + n}

        if not job["stream"]:
            pieces = []
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        pieces.append(value)
                    elif kind == "error":
                        return error_response(value, 500, type_="server_error")
                    else:
                        break
            finally:
                job["cancel"].set()  # a dropped connection stops the worker
            await worker
            return {"id": rid, "object": "chat.completion", "created": now, "model": model_id,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(pieces)},
                                 "logprobs": None, "finish_reason": value["finish_reason"]}],
                    "usage": usage(value["completion_tokens"])}

        def chunk(delta, finish=None):
            return {"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        def sse(obj):
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        async def events():
            try:
                yield sse(chunk({"role": "assistant", "content": ""}))
                while True:
                    kind, value = await queue.get()
                    if kind == "piece":
                        yield sse(chunk({"content": value}))
                    elif kind == "error":
                        yield sse({"error": {"message": value, "type": "server_error", "param": None, "code": None}})
                        break
                    else:
                        yield sse(chunk({}, value["finish_reason"]))
                        if job["include_usage"]:
                            yield sse({"id": rid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                       "choices": [], "usage": usage(value["completion_tokens"])})
                        break
                yield "data: [DONE]\n\n"
            finally:
                job["cancel"].set()  # the client went away (or we are done): free the model

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    model, tokenizer, processor = load_model(args)
    engine = Engine(VLMChat(model, tokenizer, processor), args.max_seq_len)
    name = args.model_name or os.path.basename(os.path.normpath(
        args.weight if args.load == 1 else resolve_weight_path(args))).removesuffix(".pth")
    app = create_app(engine, args, name)
    print(f"serving '{name}' at http://{args.host}:{args.port}/v1 (POST /v1/chat/completions, GET /v1/models)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
