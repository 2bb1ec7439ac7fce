"""The one exception type users see: a problem with their input, said in one line."""

import argparse
import sys
from typing import NoReturn


class UserError(ValueError):
    """Bad config, path, model id or data; the CLI prints the message alone, without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for a
    ``UserError``."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (``error: ... (see --help)``) like the other
    commands'."""

    def error(self, message: str) -> NoReturn:
        sys.exit(f"error: {message} (see --help)")
