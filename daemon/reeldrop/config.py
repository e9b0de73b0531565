"""Configuration: one frozen Struct, loaded from a TOML file, then ``REELDROP_*``, then flags.

Every field of :class:`Config` is a config key, an environment variable (``REELDROP_`` plus the
upper-cased name) and a command-line flag (``--`` plus the name with dashes): the CLI builds its
flags from the fields, so the three can never drift apart. Units are in the names.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from .errors import ConfigError

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
DEFAULT_MODEL = "veo-3.1-generate-preview"
CREDENTIAL_NAME = "gemini-api-key"
ENV_PREFIX = "REELDROP_"

Positive = Annotated[float, Meta(gt=0)]
NonNegative = Annotated[float, Meta(ge=0)]
Count = Annotated[int, Meta(ge=1)]


class Secret:
    """A string that never shows itself in ``repr``, ``str`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


class ModelCaps(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What one model accepts: checked before a request is spent on a refusal.

    ``resolutions`` maps each resolution to the durations it allows (Veo 3.1: 1080p and 4k
    need 8 seconds). ``typical_s`` is the model's usual generation time, used for estimates.
    """

    resolutions: dict[str, list[int]]
    aspect_ratios: list[str] = msgspec.field(default_factory=lambda: ["16:9", "9:16"])
    person_generation: list[str] = msgspec.field(
        default_factory=lambda: ["allow_all", "allow_adult", "dont_allow"]
    )
    typical_s: Positive = 60.0


_VEO_31 = {"720p": [4, 6, 8], "1080p": [8], "4k": [8]}
BUILTIN_MODELS: dict[str, ModelCaps] = {
    "veo-3.1-generate-preview": ModelCaps(resolutions=_VEO_31, typical_s=90.0),
    "veo-3.1-fast-generate-preview": ModelCaps(resolutions=_VEO_31, typical_s=45.0),
    "veo-3.1-lite-generate-preview": ModelCaps(
        resolutions={"720p": [4, 6, 8], "1080p": [8]}, typical_s=40.0
    ),
}


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every setting of reeldrop. See the README's config reference for each key."""

    # Directories
    inbox: Path | None = None
    outbox: Path | None = None
    state_dir: Path | None = None  # default: INBOX/.reeldrop (must share the inbox's filesystem)
    # The service
    base_url: str = DEFAULT_BASE_URL
    api_key: Secret | None = None  # prefer GEMINI_API_KEY, api_key_file or a systemd credential
    api_key_file: Path | None = None
    # Job defaults (a .json job overrides them per job)
    model: str = DEFAULT_MODEL
    aspect_ratio: str | None = None
    resolution: str | None = None
    duration_seconds: int | None = None
    negative_prompt: str | None = None
    person_generation: str | None = None
    enhance_prompt: bool | None = None
    # Load
    concurrency: Count = 4  # jobs at the service (submitting or generating)
    download_concurrency: Count | None = None  # downloads at once; default: concurrency
    # While jobs are queued, a download waits until no job was taken for delivery_lull_s, for
    # at most delivery_defer_max_s: a round's create calls go first (scheduler.Lull).
    delivery_lull_s: NonNegative = 0.1
    delivery_defer_max_s: NonNegative = 2.0
    submissions_per_minute: Positive = 10.0
    submit_burst: Count = 2
    # Polling (see README "How polling adapts")
    poll_initial_s: NonNegative = 8.0
    poll_min_s: Positive = 1.0
    poll_max_s: Positive = 20.0
    poll_fraction: Annotated[float, Meta(gt=0, le=1)] = 0.06
    poll_jitter: Annotated[float, Meta(ge=0, lt=1)] = 0.1
    poll_deadline_s: Positive = 1200.0
    poll_siblings: bool = True  # one found done calls in the older ones of its kind
    poll_cold_skips: Annotated[int, Meta(ge=0)] = 3  # looks a younger sibling may skip, cold
    # Retries: tries per phase, and the exponential backoff between them
    create_tries: Count = 8
    poll_error_tries: Count = 10
    download_tries: Count = 5
    retry_base_s: Positive = 1.0
    retry_cap_s: Positive = 60.0
    # HTTP timeouts
    connect_timeout_s: Positive = 10.0
    request_timeout_s: Positive = 60.0
    read_timeout_s: Positive = 60.0
    # Intake
    settle_s: NonNegative = 1.0
    rescan_s: Positive = 30.0
    watch_step_ms: Count = 5  # watcher latency while files arrive (about 1.5 steps)
    watch_idle_step_ms: Count = 50  # and when the inbox has been quiet for watch_busy_s
    # The fast step costs ~12 ms of CPU a second; a file after a longer gap waits ~75 ms.
    watch_busy_s: Positive = 2.0
    poll: bool = False  # watch by polling (network filesystems)
    poll_delay_ms: Count = 1000
    max_job_bytes: Count = 1024 * 1024
    max_array_jobs: Count = 1000
    max_prompt_chars: Count = 5000
    queue_max: Count = 1000
    # Files and process
    file_mode: Annotated[int, Meta(ge=0, le=0o777)] = 0o640
    dir_mode: Annotated[int, Meta(ge=0, le=0o7777)] = 0o750
    shutdown_grace_s: NonNegative = 20.0
    brief_state_s: NonNegative = 0.25  # submitting/downloading shown once they last this long
    resubmit_unconfirmed: bool = True
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"  # auto: uvloop if installed
    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    models: dict[str, ModelCaps] = msgspec.field(default_factory=dict)

    def model_caps(self) -> dict[str, ModelCaps]:
        """The built-in capability table, extended or overridden by ``[models]``."""
        return {**BUILTIN_MODELS, **self.models}

    def caps_of(self, model: str) -> ModelCaps | None:
        """One model's capabilities (``model_caps()[model]`` without building the table)."""
        return self.models.get(model) or BUILTIN_MODELS.get(model)

    @property
    def downloads(self) -> int:
        """Downloads at once: ``download_concurrency``, by default ``concurrency``."""
        return self.download_concurrency or self.concurrency

    @property
    def spool(self) -> Path:
        if self.state_dir is not None:
            return self.state_dir
        if self.inbox is None:
            raise ConfigError("No inbox is configured: pass --inbox DIR or set REELDROP_INBOX.")
        return self.inbox / ".reeldrop"

    def require_dirs(self) -> tuple[Path, Path]:
        if self.inbox is None or self.outbox is None:
            raise ConfigError("Both --inbox and --outbox are needed to run the daemon.")
        return self.inbox, self.outbox


def setting_names() -> list[tuple[str, Any]]:
    """(name, type) of every scalar setting: the ones that have a flag and a variable."""
    return [
        (f.name, f.type) for f in msgspec.structs.fields(Config) if f.name not in {"models"}
    ]


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Secret and isinstance(obj, str):
        return Secret(obj)
    if typ is Path and isinstance(obj, str | Path):
        return Path(obj)
    raise NotImplementedError(f"cannot convert to {typ!r}")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"The config file {path} does not exist.") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"The config file {path} is not valid TOML: {e}.") from None
    except OSError as e:
        raise ConfigError(f"The config file {path} cannot be read: {e.strerror}.") from None


def _from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, _typ in setting_names():
        value = environ.get(ENV_PREFIX + name.upper())
        if value is not None:
            out[name] = value
    return out


def _key_from_sources(merged: dict[str, Any], environ: Mapping[str, str]) -> str | None:
    """The API key, first found of: config/flag/env, key file, systemd credential, Gemini env."""
    if merged.get("api_key"):
        return str(merged["api_key"])
    candidates: list[Path] = []
    if merged.get("api_key_file"):
        candidates.append(Path(str(merged["api_key_file"])))
    if environ.get("CREDENTIALS_DIRECTORY"):
        candidates.append(Path(environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL_NAME)
    for path in candidates:
        try:
            key = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            if path == candidates[0] and merged.get("api_key_file"):
                raise ConfigError(f"The API key file {path} does not exist.") from None
            continue
        except OSError as e:
            raise ConfigError(f"The API key file {path} cannot be read: {e.strerror}.") from None
        if key:
            return key
    return environ.get("GEMINI_API_KEY") or environ.get("GOOGLE_API_KEY") or None


def load(
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Config:
    """Build the Config: file, then environment, then flags (later wins). Raises ConfigError."""
    environ = os.environ if environ is None else environ
    env_file = environ.get(ENV_PREFIX + "CONFIG")
    path = file if file is not None else (Path(env_file) if env_file else None)
    merged: dict[str, Any] = _read_toml(path) if path is not None else {}
    merged.update(_from_env(environ))
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    for name in ("file_mode", "dir_mode"):  # modes are octal wherever they come from as text
        if isinstance(merged.get(name), str):
            try:
                merged[name] = int(merged[name], 8)
            except ValueError:
                raise ConfigError(f"{name} must be an octal mode such as 0640.") from None
    merged["api_key"] = _key_from_sources(merged, environ)
    try:
        config = msgspec.convert(merged, Config, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        where = f" (in {path} or the environment or flags)" if path else ""
        raise ConfigError(f"Invalid setting{where}: {e}.") from None
    if not config.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"base_url must start with http:// or https://, not {config.base_url!r}.")
    if config.model not in config.model_caps():
        raise ConfigError(
            f"The default model {config.model!r} is not in the capability table; "
            "add it under [models] in the config."
        )
    return config
