"""The ``dbr`` command: one verb per stage, plus ``run`` for whole pipelines."""

from __future__ import annotations

import argparse
import errno
import sys

from dbr_builder import __version__
from dbr_builder.config import ConfigError
from dbr_builder.stages import HELP, STAGES, StageNotBuilt, load_stage


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback (exit 1)."""


def describe_os_error(e: OSError) -> str:
    """One line for an OS error: the path, what went wrong and what to check."""
    if not e.filename or not e.strerror:
        return str(e)  # a stage's own message (e.g. "no manifest ...; run `dbr index` first")
    where = f"{e.filename} -> {e.filename2}" if e.filename2 else str(e.filename)
    hint = {
        errno.EACCES: "check the permissions or choose another folder",
        errno.EPERM: "check the permissions or choose another folder",
        errno.EROFS: "the file system is read-only; choose another folder",
        errno.ENOTDIR: "a part of this path is a file, not a folder; choose another path",
        errno.EEXIST: "a file is in the way of a folder; choose another path or move the file",
        errno.EISDIR: "this is a folder; give a file",
        errno.ENOSPC: "the disk is full; free space and rerun (finished work is kept)",
        errno.ENOENT: "check the path",
    }.get(e.errno or 0, "check the path")
    return f"{where}: {e.strerror}; {hint}"


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, str]]:
    """Build the argument parser; return it and the verbs whose stage is not built."""
    from dbr_builder import pipeline

    parser = argparse.ArgumentParser(
        prog="dbr",
        description="Build DomainBed-Reasoning and fine-tune MLLM students with MTCT + SARR.",
        epilog="Run `dbr VERB --help` for a verb's options. Docs: README.md",
    )
    parser.add_argument("--version", action="version", version=f"dbr-builder {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    missing: dict[str, str] = {}
    for verb in STAGES:
        try:
            mod = load_stage(verb)
        except StageNotBuilt as e:
            missing[verb] = str(e)
            p = sub.add_parser(verb, help=f"{HELP[verb]} [not built yet]", description=str(e))
            continue
        p = sub.add_parser(verb, help=HELP[verb], description=(mod.__doc__ or HELP[verb]).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    p = sub.add_parser("run", help="run a pipeline config's stages in order, skipping up-to-date ones",
                       description="Run a pipeline config's stages in order, skipping up-to-date ones.")
    pipeline.add_arguments(p)
    p.set_defaults(_main=pipeline.main)
    return parser, missing


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dbr`` console script."""
    parser, missing = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    verb = next((a for a in argv if not a.startswith("-")), None)
    if verb in missing and not {"-h", "--help"} & set(argv):
        print(f"dbr {verb}: {missing[verb]}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except StageNotBuilt as e:
        print(f"dbr {args.verb}: {e}", file=sys.stderr)
        return 2
    except (ConfigError, UserError) as e:
        print(f"dbr {args.verb}: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        # Unwritable / missing / wrong-kind paths (a file where a folder is needed, a read-only
        # disk, a full disk): the OS names the path; no traceback from deep inside pathlib.
        print(f"dbr {args.verb}: error: {describe_os_error(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dbr {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
