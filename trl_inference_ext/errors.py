"""One error family: everything this package raises on purpose derives from `TrlInferenceError`.

Each subclass also derives from the builtin it refines, so code written against the builtins keeps working:
`except ValueError` catches an `InvalidValueError`, `except ConnectionError` a `NoServerLeftError`.

```python
from trl_inference_ext import InferenceModule, TrlInferenceError

try:
    inference = InferenceModule("path/to/model", devcie="cpu")
except TrlInferenceError as err:  # also a ValueError
    print(err)  # names the misspelled option and the valid ones
```

This module imports nothing: tool workers and vLLM server processes raise these errors without loading torch.
"""

from __future__ import annotations


class TrlInferenceError(Exception):
    """Base class of every error this package raises on purpose."""


# ------------------------------------------------------------------------------------------- bad input
class InvalidValueError(TrlInferenceError, ValueError):
    """An argument, option or input has a value outside what is allowed; the message names it and the valid range."""


class InvalidTypeError(TrlInferenceError, TypeError):
    """An argument, option or input has the wrong type; the message names it and the type expected."""


class InputError(InvalidValueError):
    """A problem with the `trl-inference` command line or the user's files, reported as one line without a
    traceback; the message starts with `file:line` where there is one."""


class ModelNotFoundError(TrlInferenceError, FileNotFoundError):
    """A model given as a path does not exist ("folder not found: ...")."""


class MissingDependencyError(TrlInferenceError, ImportError):
    """An optional dependency is not installed; the message gives the install command."""


class UnsupportedError(TrlInferenceError, NotImplementedError):
    """A valid request that this backend or engine cannot carry out; the message says what can."""


# ------------------------------------------------------------------------------------ failures at run time
class OperationError(TrlInferenceError, RuntimeError):
    """An operation could not be carried out: a closed object, an engine answer that cannot be used, a worker that
    stopped. The message says what happened and, where it can, what to do."""


class VLLMEngineStartError(OperationError):
    """The vLLM engine could not start; the message says which setting to change."""


class VLLMServerError(OperationError):
    """A vLLM server answered with an HTTP error status.

    Attributes:
        status (`int`): The HTTP status code.
        body (`str`): The start of the response body.
    """

    def __init__(self, message: str, status: int, body: str) -> None:
        super().__init__(message)
        self.status = status
        self.body = body

    def __reduce__(self) -> tuple[type, tuple[str, int, str]]:
        return type(self), (str(self), self.status, self.body)


class VLLMServerUnusableError(OperationError):
    """A server is left out of service: a weight push to it failed, so it may hold old or partly loaded weights."""


class WeightPushError(OperationError):
    """A weight push reached no server; the message names each server, what failed and what to do."""


class ServerConnectionError(TrlInferenceError, ConnectionError):
    """A server could not be reached after the retries; the message names it and the last error."""


class NoServerLeftError(ServerConnectionError):
    """Every server of a pool is out of service; the message says why each one was dropped."""


class ServerTimeoutError(TrlInferenceError, TimeoutError):
    """A server did not answer, or did not become healthy, within the time allowed."""


__all__ = [
    "InputError",
    "InvalidTypeError",
    "InvalidValueError",
    "MissingDependencyError",
    "ModelNotFoundError",
    "NoServerLeftError",
    "OperationError",
    "ServerConnectionError",
    "ServerTimeoutError",
    "TrlInferenceError",
    "UnsupportedError",
    "VLLMEngineStartError",
    "VLLMServerError",
    "VLLMServerUnusableError",
    "WeightPushError",
]
