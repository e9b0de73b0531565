"""reeldrop: drop a prompt into a folder, get a video.

The daemon (``reeldrop run``) watches an inbox and turns job files into videos through Google
Veo on the Gemini API; see the README. This package's modules, one per stage of the pipeline:
``watcher`` → ``spool`` → ``intake`` → ``runner`` (``veo``, ``retry``, ``scheduler``) →
``writer`` / ``sidecar``, wired together by ``daemon`` and driven by ``cli``.
"""

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

__version__ = "0.1.0"

__all__ = [
    "APIError",
    "Config",
    "ConfigError",
    "DownloadError",
    "GenerationFailed",
    "GenerationTimeout",
    "InvalidJob",
    "OutputError",
    "ReeldropError",
    "VideoRequest",
    "__version__",
]
