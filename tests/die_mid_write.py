"""Run a training script that SIGKILLs itself half-way through its Nth checkpoint write:
`python tests/die_mid_write.py N script.py args...`. A kill at an exact moment, where polling for
the temp file would be a race."""
import os
import runpy
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model.files as files  # noqa: E402  patched before anything imports atomic_save from it

die_at, writes = int(sys.argv[1]), []
real_atomic_save = files.atomic_save


def dying_atomic_save(obj, path, dump=None):
    writes.append(path)
    if len(writes) < die_at:
        return real_atomic_save(obj, path, dump)

    def half_then_die(o, f):
        import torch
        (dump or torch.save)(o, f)
        f.truncate(f.tell() // 2)
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_atomic_save(obj, path, half_then_die)


files.atomic_save = dying_atomic_save
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
