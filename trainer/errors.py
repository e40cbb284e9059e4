"""How a run ends early: on purpose (StopTraining), or with an error meant for the user, which
launch() reports as one line."""
from model.files import CheckpointError


class StopTraining(Exception):
    """The run ends here on purpose, with nothing (more) to save. launch() exits with `exit_code`,
    after the line `error: {message}` when there is a message (rank 0 has one, other ranks end
    quietly)."""

    def __init__(self, message=None, exit_code=1):
        super().__init__(message or "")
        self.message, self.exit_code = message, exit_code


# Errors whose message tells the user what is wrong and what to do (bad data, a missing, wrong or
# unsafe file, a full disk): the run ends with that one line. Anything else is a bug: traceback.
USER_ERRORS = (ValueError, OSError, CheckpointError)


def error_message(e):
    """The exception's message; for one re-raised from a DataLoader worker, the original message
    without the worker's traceback that torch puts in front of it."""
    message = str(e)
    marker = f"\n{type(e).__name__}: "
    if message.startswith("Caught ") and marker in message:
        message = message.rsplit(marker, 1)[1]
    return message.strip()
