"""The one exception type users see: a problem with their input, said in one line."""


class UserError(ValueError):
    """Bad config, path, model id or data; the CLI prints the message alone, without a traceback."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name if it has none), for a
    ``UserError``."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
