"""The command line: parses arguments and calls the core; nothing else lives here.

Exit codes: 0 success; 1 a job or check failed; 2 a usage or configuration error;
130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from . import config as config_mod
from . import jobs
from .errors import ConfigError, InvalidJob

NO_FLAG = {"api_key"}  # a key on the command line is visible to every user in `ps`


def _is_bool(tp: Any) -> bool:
    args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    return bool in args


def _add_struct_flags(parser: argparse.ArgumentParser, fields: list[tuple[str, Any]],
                      help_of: dict[str, str]) -> None:
    for name, tp in fields:
        flag = "--" + name.replace("_", "-")
        if _is_bool(tp):
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_of.get(name))
        else:
            parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                                help=help_of.get(name))


EPILOG = """examples:
  reeldrop demo                                   the example jobs, through the simulator
  reeldrop run --inbox in --outbox out            the daemon (GEMINI_API_KEY in the env)
  reeldrop generate "a fox in snow" -o fox.mp4    one video now, with progress
  reeldrop submit "a fox" --inbox in --outbox out --wait
  reeldrop status --outbox out --watch

exit codes: 0 success, 1 a job or check failed, 2 usage or configuration error,
130 interrupted. `reeldrop COMMAND --help` for each command's options."""

RUN_HELP = {
    "inbox": "directory to watch for NAME.prompt / NAME.json job files",
    "outbox": "directory for NAME.mp4 videos and NAME.json sidecars",
    "base_url": f"service base URL, API version included (default {config_mod.DEFAULT_BASE_URL})",
    "concurrency": "jobs at the service at once: submitting or generating (default 4)",
    "download_concurrency": "downloads at once (default: concurrency)",
    "api_key_file": "file holding the API key (or set GEMINI_API_KEY)",
    "poll": "watch the inbox by polling (for network filesystems)",
    "log_format": "auto (JSON unless on a terminal), json or console",
    "event_loop": "auto (uvloop when installed), asyncio or uvloop",
    "brief_state_s": "publish submitting/downloading once they last this long (0: always)",
}


def build_parser(simulator_flags: bool = True) -> argparse.ArgumentParser:
    """The whole command line. Without ``simulator_flags`` the simulator (and aiohttp's
    server side with it) is not imported: every other command starts ~0.1 s sooner."""
    parser = argparse.ArgumentParser(
        prog="reeldrop",
        description="Drop a prompt into a folder, get a video: a hot-folder daemon for Veo.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the daemon",
                         description="Watch INBOX and turn each job file into a video in OUTBOX. "
                         "Every flag is also a config key and a REELDROP_* variable.")
    run.add_argument("--config", type=Path, help="TOML config file (or REELDROP_CONFIG)")
    fields = [(n, t) for n, t in config_mod.setting_names() if n not in NO_FLAG]
    _add_struct_flags(run, fields, RUN_HELP)
    run.set_defaults(func=cmd_run)

    _add_simulate(sub, simulator_flags)

    demo = sub.add_parser("demo", help="run the example jobs through the simulator",
                          description="Copy inbox.example/ to a temporary inbox, start the "
                          "simulator and the daemon, and wait until every job is finished.")
    demo.add_argument("--outbox", type=Path, default=Path("outbox"))
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate one video in the foreground",
                         description="Generate one video now and save it, with progress. "
                         "Ctrl-C stops waiting and prints the operation name.")
    gen.add_argument("prompt", help="what the video should show")
    gen.add_argument("-o", "--output", type=Path, help="where to save it (default: NAME.mp4)")
    _add_job_options(gen)
    gen.add_argument("--base-url", help="service base URL (a proxy's …/v1beta works)")
    gen.add_argument("--config", type=Path, help="TOML config file")
    gen.set_defaults(func=cmd_generate)

    submit = sub.add_parser("submit", help="drop a job into the daemon's inbox",
                            description="Write a job into INBOX atomically and print its name; "
                            "with --wait, follow its sidecar until it ends.")
    submit.add_argument("prompt", help="what the video should show")
    _add_job_options(submit)
    submit.add_argument("--output", help="output name for the video and sidecar")
    submit.add_argument("--name", help="job file name (default: from the prompt)")
    submit.add_argument("--inbox", type=Path, help="the daemon's inbox (or REELDROP_INBOX)")
    submit.add_argument("--outbox", type=Path, help="the daemon's outbox, for --wait")
    submit.add_argument("--wait", action="store_true", help="wait until the job ends")
    submit.add_argument("--timeout-s", type=float, default=3600.0, help="give up waiting after")
    submit.add_argument("--config", type=Path, help="TOML config file")
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="the jobs in an outbox, from their sidecars")
    status.add_argument("--outbox", type=Path, help="the outbox (or REELDROP_OUTBOX)")
    status.add_argument("--watch", action="store_true", help="update live until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    status.add_argument("--config", type=Path, help="TOML config file")
    status.set_defaults(func=cmd_status)

    retry = sub.add_parser("retry", help="put failed jobs back into the inbox",
                           description="Move the kept files of failed jobs (by file name, stem "
                           "or output name) from the spool's failed/ area back into the inbox.")
    retry.add_argument("names", nargs="*", metavar="NAME")
    retry.add_argument("--failed", action="store_true", help="every failed job")
    retry.add_argument("--inbox", type=Path, help="the daemon's inbox (or REELDROP_INBOX)")
    retry.add_argument("--config", type=Path, help="TOML config file")
    retry.set_defaults(func=cmd_retry)

    validate = sub.add_parser("validate", help="check job files without sending anything")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument("--config", type=Path, help="TOML config file (model table, defaults)")
    validate.set_defaults(func=cmd_validate)
    return parser


def _add_simulate(sub: Any, with_flags: bool) -> None:
    sim = sub.add_parser("simulate", help="run the embedded fake Veo service",
                         description="Serve the Veo wire protocol on loopback, for tests/demos.")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8089)
    if with_flags:
        from .simulator import SimConfig

        _add_struct_flags(sim, [(f.name, f.type) for f in msgspec.structs.fields(SimConfig)], {})
    sim.set_defaults(func=cmd_simulate)


def _flags(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    # structlog imports rich whenever it is installed; the service has no use for it, so it
    # is kept out of this process (ImportError makes structlog fall back to plain output).
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from . import log
    from .daemon import Daemon
    from .runtime import start_again

    names = [n for n, _ in config_mod.setting_names()]

    def load() -> config_mod.Config:
        return config_mod.load(args.config, flags=_flags(args, names))

    cfg = load()
    secrets = [cfg.api_key.reveal()] if cfg.api_key else []
    log.configure(cfg.log_format, cfg.log_level, secrets)
    if cfg.api_key is None:
        log.get().warning("config.no_api_key", hint="set GEMINI_API_KEY or api_key_file")
    daemon = Daemon(cfg, reload_config=load)
    code = daemon.run()
    if daemon.restart:
        start_again()
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    from . import log
    from .simulator import SimConfig
    from .simulator_hosting import serve_forever

    names = [f.name for f in msgspec.structs.fields(SimConfig)]
    try:
        sim_cfg = msgspec.convert(_flags(args, names), SimConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"Invalid simulator setting: {e}.") from None
    log.configure("auto", "info")
    asyncio.run(serve_forever(sim_cfg, args.host, args.port))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import log
    from .demo import run_demo

    log.configure("console", "warning")
    return asyncio.run(run_demo(args.outbox.resolve()))


def cmd_validate(args: argparse.Namespace) -> int:
    from .intake import check_job_file

    cfg = config_mod.load(args.config)
    bad = 0
    for path in args.files:
        try:
            members = check_job_file(path, cfg)
        except InvalidJob as e:
            bad += 1
            print(f"invalid  {path}: {e.message}")
            continue
        outputs = ", ".join(m.output for m in members)
        print(f"ok       {path}: {len(members)} job(s) -> {outputs}")
    return 1 if bad else 0


JOB_OPTIONS: list[tuple[str, type, str]] = [
    ("model", str, "e.g. veo-3.1-fast-generate-preview (default from the config)"),
    ("aspect_ratio", str, "16:9 or 9:16"),
    ("resolution", str, "720p, 1080p or 4k (1080p and 4k need 8 seconds)"),
    ("duration_seconds", int, "4, 6 or 8"),
    ("negative_prompt", str, "what the video should not show"),
    ("person_generation", str, "allow_all, allow_adult or dont_allow"),
]


def _add_job_options(parser: argparse.ArgumentParser) -> None:
    for name, kind, text in JOB_OPTIONS:
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=kind, help=text)
    parser.add_argument("--enhance-prompt", action=argparse.BooleanOptionalAction, default=None,
                        help="let the service rewrite the prompt")


def _request(args: argparse.Namespace, output: str | None = None) -> jobs.VideoRequest:
    options = {n: getattr(args, n) for n, _, _ in JOB_OPTIONS if getattr(args, n) is not None}
    if args.enhance_prompt is not None:
        options["enhance_prompt"] = args.enhance_prompt
    return jobs.VideoRequest(prompt=args.prompt, output=output, **options)


def cmd_generate(args: argparse.Namespace) -> int:
    from . import log
    from .console import generate_in_foreground

    cfg = config_mod.load(args.config, flags=_flags(args, ["base_url"]))
    log.configure("console", "error", [cfg.api_key.reveal()] if cfg.api_key else [])
    return generate_in_foreground(cfg, _request(args), args.output)


def cmd_submit(args: argparse.Namespace) -> int:
    from . import manage
    from .sidecar import now

    cfg = config_mod.load(args.config, flags=_flags(args, ["inbox", "outbox"]))
    if cfg.inbox is None:
        raise ConfigError("submit needs --inbox DIR (or REELDROP_INBOX).")
    request = _request(args, output=args.output)
    jobs.resolve(request, cfg, default_output="job")  # refuse what the daemon would refuse
    since = now()
    path = manage.submit(cfg.inbox, request, args.name)
    print(path.stem)
    if not args.wait:
        return 0
    if cfg.outbox is None:
        raise ConfigError("submit --wait needs --outbox DIR (or REELDROP_OUTBOX).")
    doc = manage.follow(cfg.outbox, path.name, since, args.timeout_s,
                        on_state=lambda d: print(f"{d.output}: {d.state}", file=sys.stderr))
    if doc is None:
        print(f"reeldrop: still not finished after {args.timeout_s:g} s.", file=sys.stderr)
        return 1
    if doc.state == "succeeded":
        print(cfg.outbox / doc.videos[0].file)
        return 0
    print(f"reeldrop: {doc.error.message if doc.error else 'failed'}", file=sys.stderr)
    return 1


def cmd_status(args: argparse.Namespace) -> int:
    from . import manage

    cfg = config_mod.load(args.config, flags=_flags(args, ["outbox"]))
    if cfg.outbox is None:
        raise ConfigError("status needs --outbox DIR (or REELDROP_OUTBOX).")
    outbox = cfg.outbox
    if args.json:
        docs = manage.sidecars(outbox)
        print(msgspec.json.encode({"counts": manage.counts(docs), "jobs": docs}).decode())
        return 0
    from . import console

    def render() -> console.Table:
        docs = manage.sidecars(outbox)
        return console.status_table(docs, manage.counts(docs))

    if args.watch:
        console.watch(render)
    else:
        console.print_table(render())
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    from . import manage

    cfg = config_mod.load(args.config, flags=_flags(args, ["inbox"]))
    if cfg.inbox is None:
        raise ConfigError("retry needs --inbox DIR (or REELDROP_INBOX).")
    if not args.names and not args.failed:
        raise ConfigError("Name the failed jobs to retry, or pass --failed for all of them.")
    try:
        moved = manage.retry(cfg.spool, cfg.inbox, args.names, all_failed=args.failed,
                             file_mode=cfg.file_mode)
    except InvalidJob as e:
        print(f"reeldrop: {e.message}", file=sys.stderr)
        return 1
    for name in moved:
        print(f"retrying {name}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(simulator_flags="simulate" in argv).parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as e:
        print(f"reeldrop: {e.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        if args.debug:
            raise
        print(f"reeldrop: {type(e).__name__}: {e} (run with --debug for details)", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
