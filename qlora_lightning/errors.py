"""The one exception type users see: a problem with their input, said in one line."""


class UserError(ValueError):
    """Bad config, path, model id or data; the CLI prints the message alone, without a traceback."""
