"""fmjax's own error types. The CLI prints one of these as one line (exit 2, or 3
for a non-finite loss); any other exception is a bug and shows its traceback."""


class FmjaxError(Exception):
    """A problem with the user's input that the message fully explains."""


class FormatError(FmjaxError, ValueError):
    """A file or weight layout fmjax cannot read or write (an unsupported HF
    model, a pickle, mismatched tensors); the message names it."""


class RequestError(FmjaxError, ValueError):
    """A bad argument to a command or API call (a sampling setting, a prompt
    too long for the model); the message names the value and what was expected."""
