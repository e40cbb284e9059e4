"""An OpenAI-compatible chat API for MiniMind-V (FastAPI + uvicorn).

    python scripts/serve_openai_api.py --weight sft_vlm --dim 512        # http://127.0.0.1:8998/v1

POST /v1/chat/completions takes the OpenAI chat format: `content` is a string or a list of
{"type": "text", "text": ...} and {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}
parts; each image becomes an <image> slot where its part stands. A {"type": "video_url", "video_url":
{"url": "data:video/mp4;base64,..."}} part becomes its --frames frames, each an image slot after a
line with its time ("Frame 2 at 1.5s: "), as in training; a frame counts as one of --max_images. `stream: true` answers with
server-sent events (`data: {chunk}` ... `data: [DONE]`). GET /v1/models lists the model; GET /health
answers {"status": "ok"}; neither ever waits behind the model.
The server never fetches URLs. Local paths / file:// URLs only with --allow_local_files DIR, and only
for images inside DIR (after resolving symlinks); every refused local file gets the same answer.
The model is shared: the requests waiting for it are generated together, up to --max_batch in one
batch (those with the same temperature and top_p and no seed; a greedy answer is the same as alone,
up to rounding in bfloat16 or float16), waiting up to --batch_wait ms for the requests on their way;
up to --max_queue requests wait, more get HTTP 429.
An answer stops being generated when its client disconnects, streaming or not.
"""
import asyncio
import base64
import binascii
import functools
import json
import logging
import os
import reprlib
import stat
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import unquote, urlparse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from cli import add_model_args, add_video_args, make_parser, old_spelling, switch  # noqa: E402
from dataset.video import DEFAULT_FRAMES, MAX_VIDEO_SECONDS, read_frames  # noqa: E402
from model.chat import ReasoningSplitter, Video, as_text, check_image_count, check_room, user_content  # noqa: E402
from model.images import open_image  # noqa: E402


def parse_args(argv=None):
    ap = make_parser("OpenAI-compatible API server for MiniMind-V")
    add_model_args(ap)
    a = ap.add_argument_group("serving").add_argument
    a("--model_name", default=None, help="the model id reported (default: the weight's name)")
    a("--host", default="127.0.0.1", help="0.0.0.0 to serve the local network")
    a("--port", type=int, default=8998, help="the port to listen on")
    a("--max_queue", type=int, default=16,
      help="chat requests that may wait for the model at once; more get HTTP 429 (retry later)")
    a("--max_batch", type=int, default=8,
      help="waiting requests generated together in one batch (those with the same temperature and top_p and "
           "no seed); 1 = one at a time")
    a("--batch_wait", type=float, default=20,
      help="milliseconds a batch may wait for more requests when fewer than --max_batch wait but more are on "
           "their way: admitted and still being read or prepared, or the clients of the batch that just ended, "
           "which tend to send their next request at once; 0 = start at once")
    switch(a, "--static_cache", 0, help="KV cache of one fixed shape, written in place (what CUDA graphs need); "
                                        "the same answers")
    switch(a, "--compile_decode", 0, help="decode steps as one compiled graph in a static KV cache (on CUDA "
                                          "a CUDA graph: torch.compile mode reduce-overhead); the same answers, "
                                          "after a compile of each new batch size")
    a("--max_request_mb", type=float, default=20, help="largest request body accepted")
    a("--allow_local_files", metavar="DIR", default=None,
      help="also accept image paths / file:// URLs, only of images inside DIR (symlinks resolved "
           "first; relative paths are taken from DIR) (default: off, only data: URLs)")
    limits = ap.add_argument_group("limits")
    a = limits.add_argument
    a("--max_images", type=int, default=8,
      help="images per request, a video's frames included (each takes the model's image_token_count "
           "placeholders: 196 for CLIP ViT-B/16, 64 for SigLIP2)")
    add_video_args(limits)  # video_url parts: --frames per video, --max_video_seconds
    a("--max_seq_len", type=int, default=0, help="prompt + answer token limit; 0 = the model's max_seq_len")
    a = ap.add_argument_group("decoding", "for a request that does not set max_tokens, temperature, "
                                            "top_p").add_argument
    a("--max_new_tokens", type=int, default=512, help="answer length limit")
    old_spelling(a, "--max_tokens", "--max_new_tokens", type=int)  # its former name (a request's field keeps it)
    a("--temperature", type=float, default=0.85, help="0 = greedy")
    a("--top_p", type=float, default=0.85, help="nucleus sampling: the smallest set of tokens with this much "
                                                "probability")
    args = ap.parse_args(argv)
    if args.max_queue < 0:
        ap.error("--max_queue must be 0 or more")
    if args.max_batch < 1:
        ap.error("--max_batch must be 1 or more")
    if args.allow_local_files is not None:
        if not os.path.isdir(args.allow_local_files):
            ap.error(f"--allow_local_files: {args.allow_local_files} is not a folder")
        args.allow_local_files = os.path.realpath(args.allow_local_files)  # the root paths are checked against
    return args


if __name__ == "__main__":
    parse_args()  # --help and a mistyped flag answer here, before torch and the server's libraries load (seconds)

import torch  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, StreamingResponse  # noqa: E402
from starlette.requests import ClientDisconnect  # noqa: E402
from starlette.exceptions import HTTPException as StarletteHTTPException  # noqa: E402
from model.inference import InferenceConfig, VLMChat, is_hf_dir, load_model, resolve_weight_path  # noqa: E402

log = logging.getLogger("uvicorn.error")  # uvicorn's own logger: our lines land in the server log, same format
LOCAL_REFUSED = "local image refused: files must be images inside the folder given to --allow_local_files"
POLL = 0.1  # seconds between checks that a waiting client is still there / a waiting job still wanted


class APIError(Exception):
    def __init__(self, message, status=400, param=None, code=None, type_="invalid_request_error", headers=None):
        super().__init__(message)
        self.message, self.status, self.param, self.code, self.type = message, status, param, code, type_
        self.headers = headers

    def response(self):
        return error_response(self.message, self.status, self.param, self.code, self.type, self.headers)


def error_response(message, status=400, param=None, code=None, type_="invalid_request_error", headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def decode_image(url, where, local_root=None, open_file=open_image, kind="image"):
    """An image_url value -> RGB PIL image (shrunk to at most 1024 px); with open_file a video
    reader and kind "video", a video_url value -> what it returns. Never touches the network;
    reads local files only inside local_root (a realpath), see open_local_image."""
    if not isinstance(url, str) or not url:
        raise APIError(f"{where}: {kind}_url.url must be a non-empty string", param=where)
    if not url.startswith("data:"):
        scheme = urlparse(url).scheme.lower()
        if scheme in ("http", "https", "ftp"):
            raise APIError(f"{where}: this server does not fetch URLs. Send the {kind} inline as a data URL "
                           f"(data:{kind}/...;base64,...)", param=where, code="url_not_allowed")
        if scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt"):
            raise APIError(f"{where}: unsupported URL scheme '{scheme}': use a data URL", param=where)
        if local_root is None:
            raise APIError(f"{where}: local files are refused (start the server with --allow_local_files DIR to "
                           f"allow files in DIR); send the {kind} inline as a data URL", param=where,
                           code="local_files_disabled")
        return open_local_image(url, scheme, where, local_root, open_file)
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise APIError(f"{where}: expected a base64 data URL like data:{kind}/...;base64,...", param=where)
    try:
        raw = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(f"{where}: the data URL is not valid base64", param=where) from None
    try:
        return open_file(raw, name=f"{where} (data URL)")
    except ValueError as e:  # ImageError, VideoError
        raise APIError(str(e), param=where, code=f"invalid_{kind}") from None


def open_local_image(url, scheme, where, root, open_file=open_image):
    """A path (relative ones from root) or file:// URL -> image, if it resolves to a regular file inside
    root. Every refusal (outside root, a symlink leading out, missing, a folder, unreadable, not an image)
    gives the same answer, so a client cannot probe which files exist; the reason goes to the log."""
    try:
        if scheme == "file":
            parsed = urlparse(url)
            if parsed.netloc not in ("", "localhost"):
                raise ValueError(f"file URL on host {parsed.netloc!r}")
            url = unquote(parsed.path)
        path = os.path.realpath(os.path.join(root, url))  # every symlink resolved, also in the parents
        if os.path.commonpath([path, root]) != root:
            raise ValueError("outside the folder")
        # O_NOFOLLOW: a symlink swapped in after the check is not followed; O_NONBLOCK: a FIFO cannot hang us
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                     | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ValueError("not a regular file")
            return open_file(f, name=where)
    except (OSError, ValueError) as e:  # ImageError and VideoError are ValueErrors
        log.info("%s: local image %s refused: %s", where, reprlib.repr(url), e)
        raise APIError(f"{where}: {LOCAL_REFUSED}", param=where, code="local_file_refused") from None


def parse_messages(messages, max_images, local_root=None, frames=DEFAULT_FRAMES, max_video_seconds=MAX_VIDEO_SECONDS):
    """OpenAI messages -> (our messages with <image> tags, images in tag order). A video_url part
    becomes its frames, as images, with the lines giving their times (model.chat.video_prompt)."""
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty list", param="messages")
    kinds = [p.get("type") for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
             for p in m["content"] if isinstance(p, dict)]
    try:  # before any is decoded
        check_image_count(kinds.count("image_url") + frames * kinds.count("video_url"), max_images)
    except ValueError as e:
        raise APIError(str(e), param="messages", code="too_many_images") from None
    out, images = [], []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(f"{where} must be an object with 'role' and 'content'", param=where)
        role = "system" if m.get("role") == "developer" else m.get("role")
        if role not in ("system", "user", "assistant"):
            raise APIError(f"{where}.role must be 'system', 'user' or 'assistant', got {reprlib.repr(m.get('role'))}",
                           param=f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, str):
            text = as_text(content)  # typed text never takes an image slot
        elif isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                pwhere = f"{where}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    if not isinstance(part.get("text"), str):
                        raise APIError(f"{pwhere}.text must be a string", param=pwhere)
                    parts.append(part["text"])
                elif kind == "image_url":
                    if role != "user":
                        raise APIError(f"{pwhere}: images are only accepted in user messages", param=pwhere)
                    spec = part.get("image_url")
                    parts.append(decode_image(spec.get("url") if isinstance(spec, dict) else spec, pwhere, local_root))
                elif kind == "video_url":
                    if role != "user":
                        raise APIError(f"{pwhere}: videos are only accepted in user messages", param=pwhere)
                    spec = part.get("video_url")
                    read = functools.partial(read_frames, n=frames, max_seconds=max_video_seconds)
                    parts.append(Video(*decode_image(spec.get("url") if isinstance(spec, dict) else spec, pwhere,
                                                     local_root, read, "video")))
                else:
                    raise APIError(f"{pwhere}: unsupported content part type {reprlib.repr(kind)} "
                                   "(use 'text', 'image_url' or 'video_url')", param=pwhere)
            text, shown = user_content(parts)
            images += shown
        else:
            raise APIError(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
        out.append({"role": role, "content": text})
    if out[-1]["role"] == "assistant":
        raise APIError("the last message must be a user (or system) message", param="messages")
    return out, images


def number(body, key, default, lo, hi, integer=False):
    """body[key] checked to lie in [lo, hi] (booleans refused: True is 1 in Python); default when absent."""
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if not ok or isinstance(value, bool) or not (lo <= value <= hi):
        kind = "an integer" if integer else "a number"
        raise APIError(f"'{key}' must be {kind} between {lo} and {hi}, got {reprlib.repr(value)}", param=key)
    return value


class Batcher:
    """The shared model. Each admitted request has a worker thread that puts its job in the waiting list;
    whichever worker takes the model generates the waiting jobs that can share a batch (up to max_batch),
    each row reporting its own pieces and ending on its own. pending counts the requests admitted and not
    finished (being prepared, waiting or generating); it is touched on the event loop only. stats counts
    generated tokens, cancelled requests and batches generated."""

    def __init__(self, chat: VLMChat, max_seq_len=0, max_queue=16, max_batch=8, batch_wait=0.02):
        self.chat, self.lock = chat, threading.Lock()
        self.max_seq_len = max_seq_len or chat.model.config.max_seq_len
        self.max_queue, self.pending, self.max_batch = max_queue, 0, max(1, max_batch)
        self.batch_wait = batch_wait  # seconds, see gather
        self.last_batch = (0, 0.0)  # rows of the last batch and when it ended (time.monotonic)
        # one thread per admitted request, so a waiting one never holds up the one whose turn it is
        self.pool = ThreadPoolExecutor(max_queue + 1, thread_name_prefix="generate")
        self.stats, self.stats_lock = {"tokens": 0, "cancelled": 0, "batches": 0}, threading.Lock()
        self.waiting, self.waiting_lock = [], threading.Lock()
        self.arrived = threading.Condition(self.waiting_lock)  # notified when a job joins the waiting list

    def admit(self):
        """Reserve a place for a chat request, or refuse it while max_queue wait behind the
        running one: an unbounded queue would only grow answers that come too late."""
        if self.pending > self.max_queue:
            raise APIError(f"the server is busy: {self.max_queue} requests are already waiting for the model; "
                           "retry later", status=429, code="queue_full", type_="rate_limit_error",
                           headers={"Retry-After": "1"})
        self.pending += 1

    def release(self, *_):  # also a done-callback of the worker's future
        self.pending -= 1

    def start(self, job, emit):
        """Run the job in a worker thread; its place in the queue is freed when the worker ends."""
        worker = asyncio.get_running_loop().run_in_executor(self.pool, self.run, job, emit)
        worker.add_done_callback(self.release)
        return worker

    def count(self, key, n=1):
        with self.stats_lock:
            self.stats[key] += n

    def run(self, job, emit):
        """Worker thread: the job's emit gets ("content" or "reasoning", text) ..., then ("done", info) or
        ("error", msg), from this thread or the one generating its batch; returns when the job has ended.
        A cancelled job (its client went away) stops quietly: nobody is listening."""
        job["emit"], job["ended"] = emit, threading.Event()
        with self.arrived:
            self.waiting.append(job)
            self.arrived.notify_all()
        while not job["ended"].is_set():
            if not self.lock.acquire(timeout=POLL):
                # an abandoned request leaves the queue at once instead of when its turn comes
                if job["cancel"].is_set() and self.withdraw(job):
                    self.count("cancelled")
                    return
                continue
            try:
                self.gather()
                batch = self.take_batch()
                if batch:
                    self.generate(batch)
                    self.last_batch = (len(batch), time.monotonic())
            finally:
                self.lock.release()

    def gather(self):
        """With the model held, before taking a batch: wait up to batch_wait for the requests on their way,
        so that they share this batch instead of waiting for the whole of the next one. On their way are
        those admitted and not yet in the waiting list (being read and prepared: pending counts them), and,
        just after a batch, as many as it had rows: its clients tend to send their next request at once.
        Never waits for more than max_batch, nor when a lone client sends one request after another."""
        if self.batch_wait <= 0:
            return
        rows, ended = self.last_batch
        expected = max(self.pending, rows if time.monotonic() - ended < self.batch_wait else 0)
        with self.arrived:
            self.arrived.wait_for(lambda: len(self.waiting) >= min(self.max_batch, expected), self.batch_wait)

    def withdraw(self, job):
        """Take a job out of the waiting list; False if a batch has taken it already."""
        with self.waiting_lock:
            return self.drop(job)

    def drop(self, job):
        """Remove a job from the waiting list by identity (list.remove and `in` compare jobs with ==,
        which on their pixel tensors raises); False if it is not there. Hold waiting_lock."""
        for i, other in enumerate(self.waiting):
            if other is job:
                del self.waiting[i]
                return True
        return False

    def take_batch(self):
        """The oldest waiting job and the later ones that can share its batch: the same sampling settings
        and no seed (a seeded job runs alone, so its answer does not depend on the others)."""
        def key(job):
            return ("greedy",) if job["temperature"] == 0 else (job["temperature"], job["top_p"])
        with self.waiting_lock:
            for job in [j for j in self.waiting if j["cancel"].is_set()]:
                self.drop(job)
                self.count("cancelled")
                job["ended"].set()
            if not self.waiting:
                return []
            first = self.waiting[0]
            batch = [first] if first["seed"] is not None else \
                [j for j in self.waiting if j["seed"] is None and key(j) == key(first)][:self.max_batch]
            for job in batch:
                self.drop(job)
        return batch

    def generate(self, batch):
        """With the model held: generates the batch, each job getting its pieces and its end as they come."""
        first = batch[0]
        if first["seed"] is not None:
            torch.manual_seed(first["seed"])
        splitters = [ReasoningSplitter(self.chat.open_thinking) for _ in batch]
        stats = [{"tokens": 0, "finish_reason": None} for _ in batch]
        ended = [False] * len(batch)

        def end(r, info):
            if not ended[r]:
                ended[r] = True
                job = batch[r]
                if info is None:
                    self.count("cancelled")
                else:
                    job["emit"](info)
                job["ended"].set()

        def emit_step(pieces, last=False):
            """One step's pieces to their jobs; a row that has ended (or last) gets the rest and ("done", info)."""
            for r, (job, piece) in enumerate(zip(batch, pieces)):
                if ended[r]:
                    continue
                if job["cancel"].is_set():
                    end(r, None)
                    continue
                for kind, text in splitters[r].feed(piece) if piece else ():
                    job["emit"]((kind, text))  # "reasoning" (an open think block) or "content"
                if stats[r]["finish_reason"] or last:
                    for kind, text in splitters[r].flush():
                        job["emit"]((kind, text))
                    end(r, ("done", {"completion_tokens": stats[r]["tokens"],
                                     "finish_reason": stats[r]["finish_reason"] or "length"}))

        pixels = [job["pixels"] for job in batch if job["pixels"] is not None]
        self.count("batches")
        try:
            for pieces in self.chat.stream_batch([job["prompt"] for job in batch],
                                                 torch.cat(pixels) if pixels else None,
                                                 [job["max_tokens"] for job in batch], first["temperature"],
                                                 first["top_p"], stats=stats,
                                                 wanted=lambda: [not e and not job["cancel"].is_set()
                                                                 for e, job in zip(ended, batch)]):
                emit_step(pieces)
                if all(ended):  # every client gone or answered: nothing more to generate
                    break
            emit_step([""] * len(batch), last=True)
        except Exception as e:  # reported to the clients; the server goes on
            for r in range(len(batch)):
                end(r, ("error", f"generation failed: {e}"))
        finally:
            self.count("tokens", sum(s.get("tokens", 0) for s in stats))
            for r in range(len(batch)):
                end(r, None)  # cancelled mid-way (an error has ended its rows already)


def message(content, reasoning):
    """The answer message; the reasoning of an open think block goes in `reasoning_content`, as other
    OpenAI-compatible servers return it, never in the content."""
    out = {"role": "assistant", "content": content}
    if reasoning:
        out["reasoning_content"] = reasoning
    return out


def emitter(loop, queue):
    """Worker thread -> a request's queue on the event loop; a no-op once the loop is closed (shutdown)."""
    def emit(item):
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:
            pass
    return emit


async def watch_disconnect(request, job, queue):
    """A non-streaming answer sends nothing until it is complete, so nothing else notices a client that
    went away: check now and then, and cancel its decoding (the handler gets ("gone", None))."""
    while not await request.is_disconnected():
        await asyncio.sleep(POLL)
    job["cancel"].set()
    queue.put_nowait(("gone", None))


class JobStream(StreamingResponse):
    """A streamed answer that cancels its job however the response ends. A client that goes away
    cancels the streaming (the body generator may never even start, so it cannot clean up itself)."""

    def __init__(self, content, job, on_gone, **kw):
        super().__init__(content, **kw)
        self.job, self.on_gone = job, on_gone

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # newer ASGI servers report a failed send this way
            pass
        finally:
            self.job["cancel"].set()
            if not self.job.get("answered"):
                self.on_gone()


async def read_body(request, max_mb):
    """The request body, refused (413) past max_mb before it is all read."""
    max_bytes = int(max_mb * 1024 * 1024)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise APIError(f"request body of {int(declared) / 2**20:.1f} MB is larger than the {max_mb:g} MB limit",
                       status=413, code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise APIError(f"request body is larger than the {max_mb:g} MB limit", status=413,
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


def prepare(raw, batcher, args):
    """Worker thread: raw body -> job. Hostile nesting is a client error, not a crash."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError("the request body is nested too deeply") from None
    except ValueError as e:  # also UnicodeDecodeError, and integers with too many digits
        raise APIError(f"the request body is not valid JSON ({e})") from None
    try:
        return make_job(body, batcher, args)
    except RecursionError:
        raise APIError("the request is nested too deeply") from None


def make_job(body, batcher, args):
    """A checked request -> the job a worker generates: prompt ids, images and sampling settings."""
    if not isinstance(body, dict):
        raise APIError("the request body must be a JSON object")
    if "messages" not in body:
        raise APIError("missing required parameter: 'messages'", param="messages")
    n = body.get("n")
    if n is not None and (type(n) is not int or n != 1):  # not `in (None, 1)`: True == 1 in Python
        raise APIError("only n=1 is supported", param="n")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise APIError("'stream' must be true or false", param="stream")
    temperature = float(number(body, "temperature", args.temperature, 0, 2))
    top_p = float(number(body, "top_p", args.top_p, 0, 1))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = number(body, key, None, 1, 1 << 20, integer=True)
    seed = number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)
    messages, images = parse_messages(body["messages"], args.max_images, args.allow_local_files, args.frames,
                                      args.max_video_seconds)
    prompt = batcher.chat.encoder.encode_prompt(messages)  # (ids, is_image)
    ids = prompt[0]
    if max_tokens is None:
        max_tokens = max(1, min(args.max_new_tokens, batcher.max_seq_len - len(ids)))
    try:
        check_room(len(ids), max_tokens, batcher.max_seq_len)
    except ValueError as e:
        raise APIError(str(e), param="messages", code="context_length_exceeded") from None
    options = body.get("stream_options") or {}
    # preprocessed here, in the prepare pool, so the model never waits for a request's images
    return {"prompt": prompt, "pixels": batcher.chat.pixels(images), "max_tokens": max_tokens, "temperature": temperature,
            "top_p": top_p if top_p > 0 else 1e-6, "seed": seed, "stream": stream,
            "include_usage": bool(isinstance(options, dict) and options.get("include_usage")),
            "cancel": threading.Event()}


def gone(rid):
    log.info("client disconnected: request %s cancelled", rid)
    return error_response("client disconnected", 499)  # nobody reads it; keeps the access log honest


class Answer:
    """One request's answer, as a whole (complete) or as server-sent events (events)."""

    def __init__(self, job, queue, model_id):
        self.job, self.queue, self.model_id = job, queue, model_id
        self.rid, self.now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage(self, n):
        n_prompt = len(self.job["prompt"][0])
        return {"prompt_tokens": n_prompt, "completion_tokens": n, "total_tokens": n_prompt + n}

    async def complete(self, request):
        """The whole answer once generated; decoding is cancelled if the client goes away."""
        watcher = asyncio.create_task(watch_disconnect(request, self.job, self.queue))
        pieces = {"content": [], "reasoning": []}
        try:
            while True:
                kind, value = await self.queue.get()
                if kind in pieces:
                    pieces[kind].append(value)
                elif kind == "gone":
                    return gone(self.rid)
                elif kind == "error":
                    return error_response(value, 500, type_="server_error")
                else:
                    break
        finally:
            watcher.cancel()
            self.job["cancel"].set()  # whatever happened, the worker has nothing more to do
        return {"id": self.rid, "object": "chat.completion", "created": self.now, "model": self.model_id,
                "choices": [{"index": 0, "message": message("".join(pieces["content"]), "".join(pieces["reasoning"])),
                             "logprobs": None, "finish_reason": value["finish_reason"]}],
                "usage": self.usage(value["completion_tokens"])}

    def chunk(self, delta, finish=None, usage=None):
        out = {"id": self.rid, "object": "chat.completion.chunk", "created": self.now, "model": self.model_id,
               "choices": [] if usage else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        if usage:
            out["usage"] = usage
        return f"data: {json.dumps(out, ensure_ascii=False)}\n\n"

    async def events(self):
        yield self.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await self.queue.get()
            if kind == "content":
                yield self.chunk({"content": value})
            elif kind == "reasoning":  # as other OpenAI-compatible servers stream a model's thinking
                yield self.chunk({"reasoning_content": value})
            elif kind == "error":
                error = {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
                yield f"data: {json.dumps(error, ensure_ascii=False)}\n\n"
                break
            else:
                yield self.chunk({}, value["finish_reason"])
                if self.job["include_usage"]:
                    yield self.chunk(None, usage=self.usage(value["completion_tokens"]))
                break
        yield "data: [DONE]\n\n"
        self.job["answered"] = True

    def stream(self):
        return JobStream(self.events(), self.job, lambda: gone(self.rid), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(batcher: Batcher, args, model_id):
    app = FastAPI(title="MiniMind-V OpenAI-compatible API", docs_url=None, redoc_url=None)
    created = int(time.time())
    # JSON parsing and image decoding run here, never on the event loop (a few KB of PNG can take seconds
    # to decode), and apart from generation, so a request's images decode while another one generates.
    prepare_pool = ThreadPoolExecutor(2, thread_name_prefix="prepare")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return error_response(str(exc.detail), exc.status_code, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def internal_error(request, exc):
        return error_response(f"internal error: {exc}", 500, type_="server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

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

    async def admitted_job(raw):
        """Take a place in the queue (or 429), then prepare the job off the event loop."""
        batcher.admit()
        try:
            return await asyncio.get_running_loop().run_in_executor(prepare_pool, prepare, raw, batcher, args)
        except BaseException:
            batcher.release()  # no generation follows
            raise

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            job = await admitted_job(await read_body(request, args.max_request_mb))
        except APIError as e:
            return e.response()
        except ClientDisconnect:  # went away while uploading
            return gone("(not started)")
        queue = asyncio.Queue()
        batcher.start(job, emitter(asyncio.get_running_loop(), queue))
        answer = Answer(job, queue, model_id)
        return answer.stream() if job["stream"] else await answer.complete(request)

    return app


def main(argv=None):
    import uvicorn
    args = parse_args(argv)
    try:
        model, tokenizer, processor = load_model(InferenceConfig.from_args(args))
        chat = VLMChat(model, tokenizer, processor, args.open_thinking, args.static_cache, args.compile_decode)
    except (FileNotFoundError, ValueError, RuntimeError) as e:  # CheckpointError is a RuntimeError
        sys.exit(f"error: {e}")
    batcher = Batcher(chat, args.max_seq_len, args.max_queue, args.max_batch, args.batch_wait / 1000)
    name = args.model_name or os.path.basename(os.path.normpath(
        args.weight if is_hf_dir(args.weight) else resolve_weight_path(args))).removesuffix(".pth")
    app = create_app(batcher, args, name)
    print(f"serving '{name}' at http://{args.host}:{args.port}/v1 "
          "(POST /v1/chat/completions, GET /v1/models, GET /health)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
