"""The one exception type users see: a mistake in their input, told in one sentence."""


class UserError(Exception):
    """A problem with what the user gave us (a path, a file, a number); the message is one sentence.

    The CLI prints it as ``error: <message>`` and exits with status 1, never with a traceback.
    """


def refuse_misfit(what: str, base_name: str, problems: list[str], fix: str) -> None:
    """Raise the UserError for the first of `problems` (none: return) of a file that should fit a base model:
    "<what> does not fit the base model <base_name>: <problem>; <fix>"."""
    if problems:
        raise UserError(f"{what} does not fit the base model {base_name}: {problems[0]}; {fix}")
