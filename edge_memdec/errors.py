"""The one exception type users see: a mistake in their input, told in one sentence."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a number); the message is one sentence.

    The CLI prints it as ``error: <message>`` and exits with status 1, never with a traceback.
    """
