"""The typed error tree.

Every failure a job can meet ends as one of these, and every one of them ends as one readable
sentence in the job's sidecar (``error.message``) and in the log. The tree is small on purpose:
callers decide what to do from two facts, ``retryable`` and ``status``, not from the class zoo.
"""

from __future__ import annotations

import msgspec


class ErrorInfo(msgspec.Struct, frozen=True, kw_only=True):
    """The ``error`` object of a sidecar: what went wrong, in a form a program can act on."""

    type: str
    message: str
    retryable: bool = False
    status: int | None = None


class ReeldropError(Exception):
    """Base of every error reeldrop raises on purpose (also exported as VideoGenerationError).

    >>> try:
    ...     generate_video("a fox")
    ... except VideoGenerationError as e:
    ...     print(e.info().message)
    """

    retryable: bool = False
    status: int | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def info(self) -> ErrorInfo:
        """The sidecar form of this error."""
        return ErrorInfo(
            type=type(self).__name__,
            message=self.message,
            retryable=self.retryable,
            status=self.status,
        )


class ConfigError(ReeldropError):
    """The configuration cannot be used; the daemon exits with code 2 before it watches."""


class InvalidJob(ReeldropError):
    """A job file, or one member of it, cannot be turned into a request. Never retried.

    Exported as ``ValidationError`` too:

    >>> except ValidationError as e:
    ...     print("fix the request:", e)
    """


class APIError(ReeldropError):
    """The service answered with an error, or could not be reached.

    >>> except APIError as e:
    ...     if e.status == 429 and e.retryable: ...

    ``status`` is the HTTP status (None for a connection failure); ``retry_after_s`` carries
    the service's own hint (``Retry-After`` or ``RetryInfo.retryDelay``) when it gave one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class GenerationFailed(ReeldropError):
    """The operation finished without a video: the service's error, or its safety filter."""


class GenerationTimeout(ReeldropError, TimeoutError):
    """The operation did not finish before the poll deadline; ``except TimeoutError`` works.

    >>> VeoVideoGenerator(poll_deadline_s=600)  # give up after ten minutes
    """


class DownloadError(ReeldropError):
    """The video could not be fetched or failed its checks (length, MP4 signature).

    >>> except DownloadError as e:
    ...     print("the video is made but not saved:", e)

    A download is retried as a download; it never causes a second generation.
    """

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = True) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable


class OutputError(ReeldropError):
    """The outbox could not be written (disk full, permission denied, directory gone)."""


def describe(exc: BaseException) -> ErrorInfo:
    """Turn any exception into a sidecar error, without leaking a traceback into it."""
    if isinstance(exc, ReeldropError):
        return exc.info()
    return ErrorInfo(type="InternalError", message=f"Unexpected error: {type(exc).__name__}: {exc}")
