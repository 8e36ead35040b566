"""The one exception type users see.

Every error a user can cause (a bad name, a bad file, a label word that does not fit the
tokenizer, a diverging learning rate...) is raised as `IclgdError` with a one-line message.
The CLI turns it into that line on stderr and exit code 2; library callers can catch it.
"""


class IclgdError(ValueError):
    """A user-facing error whose message is one clear line."""
