"""``video_generation``: the older package name, kept so existing code runs unchanged.

A thin alias: every name is the same object as in :mod:`reeldrop` (no second implementation).

>>> from video_generation import generate_video, VeoVideoGenerator, generate_videos_batch
"""

from reeldrop import (
    APIError,
    BatchResult,
    DownloadError,
    GenerationTimeout,
    InvalidJob,
    ValidationError,
    VeoVideoGenerator,
    VideoGenerationError,
    VideoRequest,
    VideoResponse,
    generate_video,
    generate_videos_batch,
)

__all__ = [
    "APIError",
    "BatchResult",
    "DownloadError",
    "GenerationTimeout",
    "InvalidJob",
    "ValidationError",
    "VeoVideoGenerator",
    "VideoGenerationError",
    "VideoRequest",
    "VideoResponse",
    "generate_video",
    "generate_videos_batch",
]
