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
from . import jobs, log
from .daemon import Daemon
from .demo import run_demo
from .errors import ConfigError, InvalidJob
from .intake import read_job_file
from .simulator import SimConfig, serve_forever

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


RUN_HELP = {
    "inbox": "directory to watch for NAME.prompt / NAME.json job files",
    "outbox": "directory for NAME.mp4 videos and NAME.json sidecars",
    "base_url": f"service base URL, API version included (default {config_mod.DEFAULT_BASE_URL})",
    "concurrency": "jobs in flight at once (default 4)",
    "api_key_file": "file holding the API key (or set GEMINI_API_KEY)",
    "poll": "watch the inbox by polling (for network filesystems)",
    "log_format": "auto (JSON unless on a terminal), json or console",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reeldrop",
        description="Drop a prompt into a folder, get a video: a hot-folder daemon for Veo.",
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

    sim = sub.add_parser("simulate", help="run the embedded fake Veo service",
                         description="Serve the Veo wire protocol on loopback, for tests/demos.")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8089)
    _add_struct_flags(sim, [(f.name, f.type) for f in msgspec.structs.fields(SimConfig)], {})
    sim.set_defaults(func=cmd_simulate)

    demo = sub.add_parser("demo", help="run the example jobs through the simulator",
                          description="Copy inbox.example/ to a temporary inbox, start the "
                          "simulator and the daemon, and wait until every job is finished.")
    demo.add_argument("--outbox", type=Path, default=Path("outbox"))
    demo.set_defaults(func=cmd_demo)

    validate = sub.add_parser("validate", help="check job files without sending anything")
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument("--config", type=Path, help="TOML config file (model table, defaults)")
    validate.set_defaults(func=cmd_validate)
    return parser


def _flags(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def cmd_run(args: argparse.Namespace) -> int:
    names = [n for n, _ in config_mod.setting_names()]
    cfg = config_mod.load(args.config, flags=_flags(args, names))
    secrets = [cfg.api_key.reveal()] if cfg.api_key else []
    log.configure(cfg.log_format, cfg.log_level, secrets)
    if cfg.api_key is None:
        log.get().warning("config.no_api_key", hint="set GEMINI_API_KEY or api_key_file")
    return Daemon(cfg).run()


def cmd_simulate(args: argparse.Namespace) -> int:
    names = [f.name for f in msgspec.structs.fields(SimConfig)]
    try:
        sim_cfg = msgspec.convert(_flags(args, names), SimConfig, strict=False)
    except msgspec.ValidationError as e:
        raise ConfigError(f"Invalid simulator setting: {e}.") from None
    log.configure("auto", "info")
    asyncio.run(serve_forever(sim_cfg, args.host, args.port))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    log.configure("console", "warning")
    return asyncio.run(run_demo(args.outbox.resolve()))


def cmd_validate(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    bad = 0
    for path in args.files:
        try:
            members = _check_file(path, cfg)
        except InvalidJob as e:
            bad += 1
            print(f"invalid  {path}: {e.message}")
            continue
        outputs = ", ".join(m.output for m in members)
        print(f"ok       {path}: {len(members)} job(s) -> {outputs}")
    return 1 if bad else 0


def _check_file(path: Path, cfg: config_mod.Config) -> list[jobs.Member]:
    if path.is_dir() or not jobs.is_job_name(path.name):
        raise InvalidJob(f"{path.name} is not a job file (NAME.prompt or NAME.json).")
    return jobs.parse(path.name, read_job_file(path, cfg.max_job_bytes), cfg)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
