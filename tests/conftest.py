"""Shared fixtures: everything is built locally (tiny CLIP tower, toy images, tiny LLM configs)."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT] + [os.path.join(ROOT, d) for d in ("scripts", "demo", "dev")]

from make_demo_vision_tower import build_vision_tower  # noqa: E402

TINY_LLM = dict(dim=64, n_layers=2)  # the scripts' --dim 64 --n_layers 2 (8 heads, 2 kv heads)
TIMEOUT = 150  # seconds for one launched training run (the slowest takes about 20)
LOSS_TOL = 1e-4  # measured: ~1.5e-6 (float32); without token weighting the 2-process losses were off by up to 0.07
SIGLIP_WIDTH, SIGLIP_SIZE, SIGLIP_PATCH = 32, 64, 16  # siglip_dir's tower


@pytest.fixture(scope="session")
def tower_dir(tmp_path_factory):
    """A tiny randomly initialised CLIP vision model with ViT-B/16 geometry (196 patches)."""
    path = str(tmp_path_factory.mktemp("tower"))
    build_vision_tower(path, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    return path


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "model"))


@pytest.fixture(scope="session")
def processor(tower_dir):
    from model.images import load_processor
    return load_processor(tower_dir)


@pytest.fixture
def tiny_vlm(tower_dir):
    from model.model_vlm import MiniMindVLM, VLMConfig
    torch.manual_seed(0)
    return MiniMindVLM(VLMConfig(vision_model_path=tower_dir, **TINY_LLM)).eval()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP vision model (64 px, patch 16: 16 tokens, width 32) with its processor."""
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel
    path = str(tmp_path_factory.mktemp("siglip"))
    torch.manual_seed(0)
    config = SiglipVisionConfig(image_size=SIGLIP_SIZE, patch_size=SIGLIP_PATCH, hidden_size=SIGLIP_WIDTH,
                                intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    SiglipVisionModel(config).save_pretrained(path)
    SiglipImageProcessor(size={"height": SIGLIP_SIZE, "width": SIGLIP_SIZE}).save_pretrained(path)
    return path


def free_port():
    """A TCP port free on 127.0.0.1 right now, for a server or a process group under test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def api_server(flags, log_path, cwd=ROOT):
    """scripts/serve_openai_api.py as a subprocess on a free port, once it answers /v1/models:
    yields (base URL, an httpx client on it, the process); stopped on exit."""
    import httpx
    port = free_port()
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "scripts", "serve_openai_api.py"),
                             *map(str, flags), "--port", str(port)],
                            cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=os.environ | {"HF_HUB_OFFLINE": "1"})
    base = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=base, trust_env=False, timeout=60)
    try:
        deadline = time.time() + 90
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"server exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                if http.get("/v1/models").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.time() > deadline:
                pytest.fail("server not ready in 90 s")
            time.sleep(0.3)
        yield base, http, proc
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def write_image(path, color, size=(64, 48)):
    Image.new("RGB", size, color).save(path)


def make_toy_data(root, n=12, text_len=1):
    """A jsonl of n single-image conversations (two of them two-turn) plus their images."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    colors = ["red", "green", "blue", "yellow"]
    lines = []
    for i in range(n):
        color = colors[i % len(colors)]
        write_image(images / f"{i}.png", color)
        conv = [{"role": "user", "content": "<image>\nWhat color is it?" + " please" * text_len},
                {"role": "assistant", "content": color}]
        if i % 6 == 0:
            conv += [{"role": "user", "content": "And the shape?"}, {"role": "assistant", "content": "square"}]
        lines.append(json.dumps({"conversations": conv, "image": f"{i}.png"}))
    path = root / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path), str(images)


def frame_colour(i):
    """The colour of frame i (< 64) of make_video's clips: i in base 4, a digit per channel, 85 levels
    apart, so video compression cannot blur one frame's colour into another's."""
    return (85 * (i % 4), 85 * (i // 4 % 4), 85 * (i // 16 % 4))


def frame_index(im):
    """Which make_video frame an image shows (its centre pixel's colour, see frame_colour)."""
    r, g, b = (round(c / 85) for c in im.convert("RGB").getpixel((im.width // 2, im.height // 2)))
    return r + 4 * g + 16 * b


def make_video(path, n_frames=40, fps=10, size=(64, 48), format=None):
    """An mp4 (MPEG-4 part 2, in every PyAV wheel) of n_frames solid frames, frame i in frame_colour(i);
    format="m4v" writes the raw stream instead, whose header gives no duration."""
    import av
    with av.open(str(path), "w", format=format) as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for i in range(n_frames):
            frame = av.VideoFrame.from_image(Image.new("RGB", size, frame_colour(i)))
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


@pytest.fixture
def toy_data(tmp_path):
    return make_toy_data(tmp_path)


@pytest.fixture(scope="session")
def mixed_toy_data(tmp_path_factory):
    """12 samples, 3 global batches of 4 per epoch: 10 with an image, and 2 text-only ones, the
    longest, so length grouping puts them together first: with batch size 2 the very first
    micro-batch (or rank 0's first batch) has no image at all."""
    path, images = make_toy_data(tmp_path_factory.mktemp("toy"), n=10)
    with open(path, "a") as f:
        for color in ("red", "blue"):
            f.write(json.dumps({"conversations": [{"role": "user", "content": "Name a color" + " please" * 80},
                                                  {"role": "assistant", "content": color}]}) + "\n")
    return path, images


@pytest.fixture(scope="session")
def one_process_reference(mixed_toy_data, tower_dir, tmp_path_factory):
    """The uninterrupted 1-process pretrain run of mixed_toy_data (batch 4, float32, 6 steps) that the
    distributed and the parquet runs are compared with: its output folder."""
    out = tmp_path_factory.mktemp("ref")
    launch("train_pretrain_vlm.py", flags(mixed_toy_data, tower_dir, out))
    return out


def script_flags(data, tower_dir, out_dir, **overrides):
    """Command-line flags for the train scripts on toy data with the tiny LLM; keywords override."""
    data_path, images = data
    args = {"data_path": data_path, "images_path": images, "out_dir": out_dir, "vision_model_path": tower_dir,
            "dim": 64, "n_layers": 2, "batch_size": 2, "epochs": 2, "log_interval": 1, "num_workers": 0,
            "learning_rate": 1e-3, **overrides}
    return [str(x) for k, v in args.items() for x in (f"--{k}", v)]


def read_log(path):
    """The records of a training run's JSONL log."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def launch(script, args, nproc=1, launcher=None, env=None, check=True, stdin=None):
    """Run a repo script (a path from the repo's root): `python script`, or a training script under
    torchrun / the deepspeed launcher; `env`: variables to set (None: to remove); `stdin`: text typed
    into it."""
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(free_port())]
    elif launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc),
               "--master_port", str(free_port())]
    else:
        cmd = [sys.executable]
    # One thread per process: 2 processes on 2 cores (torchrun does this itself, the deepspeed launcher not).
    env = {k: v for k, v in {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}.items() if v is not None}
    # A session of its own, so that a hung run's processes can be killed as a group (no strays in CI).
    proc = subprocess.Popen(cmd + [os.path.join(ROOT, script), *map(str, args)], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = proc.communicate(stdin, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        # The launcher's group, and the processes below it in other sessions (torchrun starts each rank
        # in one of its own), or a stuck rank keeps the output pipes open. A rank orphaned earlier, out
        # of both, still may: hence the bounded wait.
        others = descendants(proc.pid)  # before the kill: an orphan's parent is no longer the launcher
        ranks = [pid for pid in others if is_rank(pid, script)] if launcher else [proc.pid]
        for pid in ranks:  # a training script prints its threads' stacks on stderr (trainer/main.py)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGUSR1)
        time.sleep(2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        out = err = ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            out, err = proc.communicate(timeout=30)
        # pytest.ini reruns a test that fails with "stuck in a collective", once
        why = "a rank is probably stuck in a collective" if launcher else "it is stuck"
        raise AssertionError(f"{script} did not finish in {TIMEOUT} s: {why}; its output and (for a training "
                             f"script) the stacks of its {len(ranks)} processes follow\n{out[-3000:]}\n{err[-12000:]}")
    proc = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def is_rank(pid, script):
    """Whether process `pid` runs `script` itself (not a launcher in front of it)."""
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
        return any(a.endswith(script) for a in argv) and not any(
            a in ("torch.distributed.run", "deepspeed.launcher.runner", "deepspeed.launcher.launch") for a in argv)
    return False


def descendants(pid):
    """Every living process below pid, whatever its session (read from /proc, Linux)."""
    parent = {}
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            with open(f"/proc/{entry}/stat") as f:
                parent[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])  # field 4: the parent's pid
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def flags(data, tower_dir, out_dir, **extra):
    """script_flags for runs compared step by step: from scratch, batch 4, float32, seed 7."""
    defaults = dict(batch_size=4, learning_rate=3e-3, from_weight="none", freeze_llm=0, dtype="float32", seed=7)
    return script_flags(data, tower_dir, out_dir, **{**defaults, **extra})


def assert_losses_match(log, ref, tol=LOSS_TOL):
    assert [r["step"] for r in log] == [r["step"] for r in ref]
    diffs = [abs(a["loss"] - b["loss"]) for a, b in zip(log, ref)]
    assert max(diffs) < tol, diffs
    return max(diffs)
