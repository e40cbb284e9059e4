"""How long each script takes to print its --help: the wall time of `python SCRIPT --help`, as a
user waits for it (Python's start included), the first run and the median of --runs.

    python dev/help_time.py

Every script builds its flags from modules that load neither torch nor transformers nor gradio
(tests/test_cli.py checks that), so each should answer in a fraction of a second; torch alone takes
1-2 s to import warm, and far longer from a cold disk cache.
"""
import argparse
import glob
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts():
    """The repository's command-line scripts: the .py files at the top, in scripts/ and demo/ that parse flags."""
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "scripts", "*.py"))
                       + glob.glob(os.path.join(ROOT, "demo", "*.py"))):
        with open(path, encoding="utf-8") as f:
            code = f.read()
        if '__name__ == "__main__"' in code and ("build_parser" in code or "parse_args" in code):
            found.append(os.path.relpath(path, ROOT))
    return found


def help_seconds(script):
    t0 = time.perf_counter()
    subprocess.run([sys.executable, script, "--help"], cwd=ROOT, stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=5, help="runs per script after the first (default: 5)")
    args = p.parse_args()
    print(f"{'script':36} {'first':>7} {'median':>7}")
    for script in scripts():
        first = help_seconds(script)
        median = statistics.median(help_seconds(script) for _ in range(args.runs))
        print(f"{script:36} {first:6.2f}s {median:6.2f}s", flush=True)


if __name__ == "__main__":
    main()
