"""Files written and read safely, for checkpoints and adapters alike: a write is atomic and a full
disk is named, tensors holding NaN or inf are refused, and the errors say which file. torch is
imported where used, so the flag modules that import model.lora stay quick."""
import contextlib
import errno
import os


def non_finite_keys(sd):
    """The keys of `sd` whose tensors hold NaN or inf, sorted: weights that must be neither read nor written."""
    import torch
    return sorted(k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all())


class CheckpointError(RuntimeError):
    """A file that is not the checkpoint it was given as, or does not fit the model. The message
    names the file, what was expected and the flags to check, so callers print it as it is."""


class DiskFullError(OSError):
    """No space left for a checkpoint; its partial temp file is already removed."""


def _first_line(e):
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _disk_full(e):
    """Why a failed write looks like a full disk, or None. torch.save turns a failed write into
    RuntimeError("[enforce fail at inline_container.cc:...] unexpected pos ..."), with the
    OSError (ENOSPC) as its context when the file object raised it."""
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(e.errno)
        if isinstance(e, RuntimeError) and any(s in str(e) for s in ("unexpected pos", "file write failed",
                                                                      "No space left")):
            return f"the write failed: {_first_line(e)}"
        e = e.__cause__ or e.__context__
    return None


def atomic_save(obj, path, dump=None):
    """dump(obj, file) (default torch.save) to a temp file, fsync, then rename: a kill mid-write never leaves a truncated file
    under the real name, and the previous good file stays until the new one is complete. A failed
    write removes its temp file (on a full disk it holds the space that is missing); a full disk
    raises DiskFullError naming the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if dump is None:
                import torch
                dump = torch.save
            dump(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        reason = _disk_full(e)
        if reason:
            raise DiskFullError(f"disk full writing {path} ({reason}): free space on its disk") from None
        raise


# The global a weights-only load refused, in torch's wordings: "Unsupported global: GLOBAL io.open was
# not an allowed global" (2.4 on), "unsupported GLOBAL posix.system whose module posix is blocked"
# (2.13), "Unsupported class os.system" (before 2.4).
def refuse_non_finite(tensors, name, why_and_fix, error=CheckpointError):
    """Weights read from `name` must be finite: else `error` naming the file, the tensors and the fix."""
    bad = non_finite_keys(tensors)
    if bad:
        raise error(f"{name} holds NaN or inf values in {_some(bad)}: {why_and_fix}")


def _some(keys, n=6):
    return str(keys[:n])[:-1] + f", ... {len(keys) - n} more]" if len(keys) > n else str(keys)
