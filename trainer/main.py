"""The train scripts' entry, once their flags are parsed: launch(cfg) trains, and ends a run that
fails with an error meant for the user with one line."""
import contextlib
import faulthandler
import os
import signal
import sys

from trainer import loop
from trainer.config import parse
from trainer.errors import USER_ERRORS, StopTraining, error_message


def main(parser, argv=None):
    """The flags (argv, default sys.argv) become a TrainConfig, then run."""
    launch(parse(parser, argv))


def launch(cfg):
    """The train scripts' entry, once their flags are parsed: train. A run that fails with
    a USER_ERRORS error ends with the line `error: <message>` (exit code 1); --debug or
    MINIMIND_DEBUG=1 shows the traceback instead. A StopTraining ends it with its own code."""
    # `kill -USR1 <pid>` prints where each thread of this process is, on stderr, and training goes on:
    # how to see which collective a stuck rank waits in. Not where there is no SIGUSR1 (Windows) or no
    # stderr file (a pythonw process).
    with contextlib.suppress(AttributeError, ValueError, OSError):
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    try:
        loop.train(cfg)
    except StopTraining as e:
        sys.exit(f"error: {e.message}" if e.message else e.exit_code)
    except USER_ERRORS as e:
        if cfg.debug or os.environ.get("MINIMIND_DEBUG", "0") not in ("", "0"):
            raise
        sys.exit(f"error: {error_message(e)}")
