"""dev/gpu_check.py where there is no GPU to check."""
import os
import subprocess
import sys

from conftest import ROOT


def test_without_a_gpu_the_check_says_so_and_succeeds():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "dev", "gpu_check.py")], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("no GPU: ") and "run this on a CUDA machine" in proc.stdout
