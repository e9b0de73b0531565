"""Job files: decoding ``.prompt`` and ``.json`` into checked requests.

Everything that can be known to fail is refused here, before a request (and money) is spent:
schema and types (msgspec, with the JSON path in the message), empty prompts, output names
that try to leave the outbox, and option combinations the model refuses (from the capability
table in the config, so a new model needs no code change).
"""

from __future__ import annotations

import codecs
import re
import unicodedata
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from .config import Config, ModelCaps
from .errors import InvalidJob

JOB_SUFFIXES = (".prompt", ".json")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)),
             *(f"lpt{i}" for i in range(10))}
_UNSAFE_RUN = re.compile(r"[^\w.\-]+")
# Names with nothing to clean up (no trailing "_" to strip) or refuse, but their length.
_PLAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_\-]*[A-Za-z0-9\-])?")
MAX_OUTPUT_CHARS = 120


class VideoRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True,
                   omit_defaults=True):
    """One job: a prompt and its options. The schema of a ``.json`` job (or each array item).

    >>> VideoRequest(prompt="A fox in the snow", aspect_ratio="9:16", duration_seconds=6)

    Checked against the model's capabilities when used (``ValidationError`` if refused).
    """

    prompt: Annotated[str, Meta(min_length=1)]
    negative_prompt: str | None = None
    model: str | None = None
    aspect_ratio: str | None = None
    resolution: str | None = None
    duration_seconds: int | None = None
    person_generation: str | None = None
    enhance_prompt: bool | None = None
    output: str | None = None
    metadata: dict[str, Any] | None = None


class Member(msgspec.Struct, frozen=True, kw_only=True):
    """A request with every default resolved: exactly what will be sent, and where it goes."""

    prompt: str
    model: str
    parameters: dict[str, Any]
    output: str
    metadata: dict[str, Any] | None = None


_decode_json = msgspec.json.Decoder(VideoRequest | list[VideoRequest]).decode

OPTION_NAMES = ("aspect_ratio", "resolution", "duration_seconds", "negative_prompt",
                "person_generation", "enhance_prompt")


def is_job_name(name: str) -> bool:
    """True for names the inbox takes: ``*.prompt`` and ``*.json``, not hidden, not temporary."""
    if name.startswith(".") or name.endswith(("~", ".tmp", ".part")):
        return False
    return name.endswith(JOB_SUFFIXES) and bool(name.rsplit(".", 1)[0])


def check_output_name(name: str, *, field: str = "output") -> str:
    """A safe file stem for the outbox, or InvalidJob. Unsafe runs become ``_``; paths refuse."""
    if _PLAIN.fullmatch(name) and len(name) <= MAX_OUTPUT_CHARS and name.lower() not in _RESERVED:
        return name  # the usual case, answered without the Unicode work below
    if not name or not name.strip():
        raise InvalidJob(f"{field} is empty; give a plain file name such as 'sunset'.")
    if "\0" in name or "/" in name or "\\" in name:
        raise InvalidJob(f"{field} {name!r} is a path; give a plain file name, with no / or \\.")
    if name.startswith(".") or name in {".", ".."}:
        raise InvalidJob(
            f"{field} {name!r} would be hidden or a directory; do not start it with '.'.")
    if any(unicodedata.category(c) == "Cc" for c in name):
        raise InvalidJob(f"{field} {name!r} contains control characters.")
    cleaned = _UNSAFE_RUN.sub("_", unicodedata.normalize("NFC", name.strip())).strip("_")
    if not cleaned or cleaned.startswith("."):
        raise InvalidJob(f"{field} {name!r} has no usable characters; use letters, digits, - or _.")
    if cleaned.split(".")[0].lower() in _RESERVED:
        raise InvalidJob(f"{field} {name!r} is a reserved device name on some systems.")
    if len(cleaned) > MAX_OUTPUT_CHARS:
        raise InvalidJob(f"{field} is longer than {MAX_OUTPUT_CHARS} characters.")
    return cleaned


def default_stem(source: str) -> str:
    """The output stem a job file gets when it names none: its own stem, made safe."""
    try:
        stem, dot, _ = source.rpartition(".")  # a job file's name has its suffix
        return check_output_name(stem if dot else source, field="the job file's name")
    except InvalidJob:
        return "job"


def parse(source: str, data: bytes, config: Config) -> list[Member]:
    """Decode one job file's bytes into checked members. Raises InvalidJob with one sentence."""
    if not data.strip():
        raise InvalidJob(f"{source} is empty; write a prompt (or a JSON job) into it.")
    if source.endswith(".prompt"):
        body = data.removeprefix(codecs.BOM_UTF8)  # utf-8-sig's codec is Python code
        try:
            text = body.decode()
        except UnicodeDecodeError as e:
            at = e.start + len(data) - len(body)
            raise InvalidJob(
                f"{source} is not UTF-8 text (byte 0x{data[at]:02x} at offset {at}); "
                "save it as UTF-8."
            ) from None
        requests = [VideoRequest(prompt=text.strip())]
    else:
        requests = _decode_json_job(source, data, config)
    stem = default_stem(source)
    members = [
        resolve(req, config, default_output=stem if len(requests) == 1 else f"{stem}-{i}",
                 where="$" if len(requests) == 1 else f"$[{i - 1}]")
        for i, req in enumerate(requests, start=1)
    ]
    outputs = [m.output for m in members]
    if len(set(outputs)) != len(outputs):
        dup = next(o for o in outputs if outputs.count(o) > 1)
        raise InvalidJob(f"Two jobs in {source} share the output name {dup!r}; names must differ.")
    return members


def _decode_json_job(source: str, data: bytes, config: Config) -> list[VideoRequest]:
    try:
        decoded = _decode_json(data)
    except msgspec.ValidationError as e:
        raise InvalidJob(f"{source}: {_explain(str(e))}.") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        if not _is_utf8(data):
            raise InvalidJob(f"{source} is not UTF-8 text; save it as UTF-8 JSON.") from None
        raise InvalidJob(f"{source} is not valid JSON: {e}.") from None
    requests = decoded if isinstance(decoded, list) else [decoded]
    if not requests:
        raise InvalidJob(f"{source} is an empty list; put at least one job in it.")
    if len(requests) > config.max_array_jobs:
        raise InvalidJob(
            f"{source} holds {len(requests)} jobs; the limit is {config.max_array_jobs} per file "
            "(max_array_jobs). Split it into several files."
        )
    return requests


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _explain(msg: str) -> str:
    """msgspec's message, reworded where a person would not guess what it means."""
    top = re.fullmatch(r"Expected `object \| array`, got `(\w+)`", msg)
    if top:
        return f"a job file must hold a JSON object or a list of objects, not {top[1]}"
    return msg.replace("Object contains unknown field", "unknown field")


def resolve(req: VideoRequest, config: Config, *, default_output: str, where: str = "$") -> Member:
    """Check one request against the config and the model's capabilities; fill defaults."""
    prompt = req.prompt.strip()
    if not prompt:
        raise InvalidJob(
            f"The prompt at {where}.prompt is blank; write what the video should show.")
    if len(prompt) > config.max_prompt_chars:
        raise InvalidJob(
            f"The prompt at {where}.prompt has {len(prompt)} characters; "
            f"the limit is {config.max_prompt_chars} (max_prompt_chars)."
        )
    model = req.model or config.model
    caps = config.caps_of(model)
    if caps is None:
        known = ", ".join(sorted(config.model_caps()))
        raise InvalidJob(f"Unknown model {model!r} at {where}.model; known models: {known}.")
    params: dict[str, Any] = {}
    for name in OPTION_NAMES:
        value = getattr(req, name)
        if value is None:
            value = getattr(config, name)
        if value is not None:
            params[name] = value
    _check_caps(model, params, caps, where)
    output = (check_output_name(req.output, field=f"{where}.output")
              if req.output is not None else default_output)
    return Member(prompt=prompt, model=model, parameters=params, output=output,
                  metadata=req.metadata)


def _check_caps(model: str, params: dict[str, Any], caps: ModelCaps, where: str) -> None:
    resolutions, aspect_ratios = caps.resolutions, caps.aspect_ratios
    people = caps.person_generation

    def refuse(field: str, value: object, allowed: list[Any]) -> InvalidJob:
        return InvalidJob(f"{where}.{field} = {value!r} is not supported by {model}; "
                          f"use one of {', '.join(map(str, allowed))}.")

    aspect = params.get("aspect_ratio")
    if aspect is not None and aspect not in aspect_ratios:
        raise refuse("aspect_ratio", aspect, aspect_ratios)
    person = params.get("person_generation")
    if person is not None and person not in people:
        raise refuse("person_generation", person, people)
    resolution = params.get("resolution")
    if resolution is not None and resolution not in resolutions:
        raise refuse("resolution", resolution, list(resolutions))
    duration = params.get("duration_seconds")
    if duration is None:
        return
    res = resolution or next(iter(resolutions))
    if duration not in resolutions[res]:  # the usual case passes without the list below
        all_durations = sorted({d for ds in resolutions.values() for d in ds})
        if duration not in all_durations:
            raise refuse("duration_seconds", duration, all_durations)
        allowed = ", ".join(map(str, resolutions[res]))
        prefix = "" if where == "$" else f"{where}: "
        raise InvalidJob(f"{prefix}{model} makes {res} videos only {allowed} seconds long, "
                         f"not {duration}; change duration_seconds or resolution.")
