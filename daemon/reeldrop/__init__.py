"""reeldrop: drop a prompt into a folder, get a video; or call Veo from Python.

>>> from reeldrop import generate_video
>>> generate_video("A red fox trotting through fresh snow", "fox.mp4")
PosixPath('fox.mp4')


The daemon (``reeldrop run``) watches an inbox and turns job files into videos through Google
Veo on the Gemini API; see the README. This package's modules, one per stage of the pipeline:
``watcher`` → ``spool`` → ``intake`` → ``runner`` (``veo``, ``retry``, ``scheduler``,
``polling``) → ``writer`` / ``sidecar``, wired together by ``daemon`` and driven by ``cli``.
"""

from typing import TYPE_CHECKING, Any

from .config import Config
from .errors import (
    APIError,
    ConfigError,
    DownloadError,
    GenerationFailed,
    GenerationTimeout,
    InvalidJob,
    OutputError,
    ReeldropError,
)
from .jobs import VideoRequest

if TYPE_CHECKING:
    from .library import (
        BatchResult,
        VeoVideoGenerator,
        VideoResponse,
        generate_video,
        generate_videos_batch,
    )

_LIBRARY = {"BatchResult", "VeoVideoGenerator", "VideoResponse", "generate_video",
            "generate_videos_batch"}


def __getattr__(name: str) -> Any:
    """The library's names load on first use, so ``reeldrop run`` never imports what only
    the library needs (importing the package stays cheap)."""
    if name in _LIBRARY:
        from . import library  # noqa: PLC0415 - the lazy import is the point

        return getattr(library, name)
    raise AttributeError(f"module 'reeldrop' has no attribute {name!r}")


VideoGenerationError = ReeldropError
"""The base of every error reeldrop raises (the name the older ``video_generation`` used)."""
ValidationError = InvalidJob
"""A request that cannot be sent as it is (bad field, value or combination)."""

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "BatchResult",
    "Config",
    "ConfigError",
    "DownloadError",
    "GenerationFailed",
    "GenerationTimeout",
    "InvalidJob",
    "OutputError",
    "ReeldropError",
    "ValidationError",
    "VeoVideoGenerator",
    "VideoGenerationError",
    "VideoRequest",
    "VideoResponse",
    "__version__",
    "generate_video",
    "generate_videos_batch",
]
