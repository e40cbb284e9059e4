"""The one way a video becomes images: N frames, uniformly spread over its length, in time order.

read_frames(source, n) -> (frames, timestamps): PIL images through open_image's rules (RGB, at most
MAX_IMAGE_SIDE) and the time of each frame in seconds. Frame k is the one on screen at
(k + 0.5) / n of the duration, the middle of the k-th of n equal segments, so the frames spread
over the whole clip. Each frame is
reached by a seek to the keyframe before it, so a long video costs n short decodes, not a full one.
A stream whose header gives no duration (a raw .m4v) is decoded once, holding at most 2n frames
(every step-th one, the step doubling whenever 2n are held), so each picked frame is the held one
nearest the middle of its segment, inside that segment.

Memory is bounded whatever the header says: a frame is shrunk to MAX_IMAGE_SIDE as soon as it is
kept, and a video whose frames have more pixels than an image may (MAX_IMAGE_PIXELS) is refused.

Decoding uses PyAV (FFmpeg's libraries inside the wheel; no system ffmpeg). A file that is not a
video, a corrupt, truncated or empty one, or one over `max_seconds` raises VideoError (a ValueError)
with the reason, so training counts it as a bad sample and servers answer 400.
The prompt that goes with the frames (their timestamps) is model.chat.video_prompt.
"""
import io
import os

from model.images import MAX_IMAGE_PIXELS, refuse_special_file, shrink, to_rgb

DEFAULT_FRAMES = 8
MAX_FRAMES = 64
MAX_VIDEO_SECONDS = 3600.0
VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")


class VideoError(ValueError):
    """A video that cannot be used; the message says why."""


def check_frames(n):
    if not 1 <= n <= MAX_FRAMES:
        raise ValueError(f"--frames must be between 1 and {MAX_FRAMES}, got {n}")
    return n


def read_frames(source, n=DEFAULT_FRAMES, max_seconds=MAX_VIDEO_SECONDS, name=None):
    """A path, bytes or file object -> ([n PIL RGB images], [n timestamps in seconds]), in time order
    (fewer than n when the video has fewer frames)."""
    import av
    check_frames(n)
    label = name or (os.path.basename(source) if isinstance(source, (str, os.PathLike)) else "the embedded video")
    refuse_special_file(source, label, VideoError)
    fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        container = av.open(fp, "r")
    except FileNotFoundError:
        raise VideoError(f"{label} not found") from None
    except Exception as e:  # av.error.InvalidDataError and kin: not a container FFmpeg can read
        raise VideoError(f"{label} is not a video FFmpeg can read, or is truncated ({_reason(e)})") from None
    with container:
        if not container.streams.video:
            raise VideoError(f"{label} has no video stream")
        if container.format.name == "image2" or container.format.name.endswith("_pipe"):
            raise VideoError(f"{label} is a still image ({container.format.name}), not a video: send it as an image")
        stream = container.streams.video[0]
        _check_pixels(stream.codec_context.width, stream.codec_context.height, label)
        if stream.frames and stream.frames < n:
            n = stream.frames  # a clip shorter than n frames: each of its frames once
        duration = _duration(container, stream)
        if duration is not None and duration > max_seconds:
            raise VideoError(f"{label} lasts {duration:.0f} s, over the limit of {max_seconds:.0f} s "
                             f"(--max_video_seconds): cut it first")
        try:
            if duration:
                frames = [_keep(_frame_at(container, stream, duration * (k + 0.5) / n, label))
                          for k in range(n)]
            else:  # no duration in the header (some streams): one pass, a bounded number held
                frames = _spread(_decode(container, stream, max_seconds, label), n, _keep)
        except VideoError:
            raise
        except Exception as e:
            raise VideoError(f"{label} is a corrupt or truncated video ({_reason(e)})") from None
    if not frames or any(f is None for f in frames):
        got = sum(f is not None for f in frames)
        raise VideoError(f"{label} has no decodable frames (an empty video)" if not got else
                         f"{label} is truncated: only {got} of {n} frames could be decoded")
    return [image for image, _ in frames], [time for _, time in frames]


def _reason(e):
    return str(e).strip() or type(e).__name__


def _duration(container, stream):
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000  # av.time_base
    return None


def _check_pixels(width, height, label):
    if width * height > MAX_IMAGE_PIXELS:
        raise VideoError(f"{label} has {width}x{height} frames, over the {MAX_IMAGE_PIXELS:,} pixels an image may "
                         f"have: scale it down first (e.g. ffmpeg -i IN -vf scale=1280:-2 OUT)")


def _keep(frame):
    """A decoded frame -> (RGB image as open_image leaves a picture, its time in seconds), so what is
    held is at most MAX_IMAGE_SIDE whatever the video's size."""
    if frame is None:
        return None
    return shrink(to_rgb(frame.to_image())), round(float(frame.time), 3)


def _frame_at(container, stream, t, label):
    """The frame on screen at t seconds: the last one that starts at or before t."""
    container.seek(int(t / stream.time_base) + (stream.start_time or 0), stream=stream, backward=True)
    shown = None
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height, label)  # before the next frame is decoded beside it
        if frame.time is None:
            continue
        if frame.time > t + 1e-6 and shown is not None:
            break
        shown = frame
    return shown


def _decode(container, stream, max_seconds, label):
    """The stream's frames that have a time, each checked against the time and pixel limits."""
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height, label)
        if frame.time is None:
            continue
        if frame.time > max_seconds:
            raise VideoError(f"{label} lasts over the limit of {max_seconds:.0f} s (--max_video_seconds): cut it first")
        yield frame


def _spread(items, n, keep):
    """n of an iterable of unknown length, spread as read_frames spreads them (each one once if there
    are fewer than n), holding at most 2n results of keep(item): every step-th item is kept, and when
    2n are held every other one is dropped and the step doubles."""
    held, step, count = [], 1, 0
    for i, item in enumerate(items):
        count = i + 1
        if i % step:
            continue
        if len(held) == 2 * n:  # i is then 2n * step, a multiple of the doubled step
            del held[1::2]
            step *= 2
        held.append(keep(item))
    if count <= n:
        return held
    # the held item nearest each segment's middle frame: within half a step, so inside the segment
    targets = (int(count * (k + 0.5) / n) for k in range(n))
    return [held[min(len(held) - 1, (t + step // 2) // step)] for t in targets]

