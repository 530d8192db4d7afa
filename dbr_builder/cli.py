"""The ``dbr`` command: one verb per stage, plus ``run`` for whole pipelines."""

from __future__ import annotations

import argparse
import logging
import sys

from dbr_builder import __version__, pipeline
from dbr_builder.core.sanitize import redact
from dbr_builder.errors import ConfigError, UserError, describe_os_error
from dbr_builder.log import setup_logging


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser: one sub-command per stage, plus ``run``."""
    parser = argparse.ArgumentParser(
        prog="dbr",
        description="Build DomainBed-Reasoning and fine-tune MLLM students with MTCT + SARR.",
        epilog="Run `dbr VERB --help` for a verb's options. Docs: README.md",
    )
    parser.add_argument("--version", action="version", version=f"dbr-builder {__version__}")
    parser.add_argument("--quiet", "-q", action="store_true", help="only warnings and errors")
    parser.add_argument("--verbose", "-v", action="store_true", help="also debug messages")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    for verb, mod in pipeline.STAGES.items():
        help_ = pipeline.HELP[verb]
        p = sub.add_parser(verb, help=help_, description=(mod.__doc__ or help_).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    p = sub.add_parser("run", help="run a pipeline config's stages in order, skipping up-to-date ones",
                       description="Run a pipeline config's stages in order, skipping up-to-date ones.")
    pipeline.add_arguments(p)
    p.set_defaults(_main=pipeline.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dbr`` console script."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging(logging.WARNING if args.quiet else logging.DEBUG if args.verbose else logging.INFO)
    try:
        return int(args._main(args) or 0)
    except (ConfigError, UserError) as e:
        print(f"dbr {args.verb}: error: {redact(str(e))}", file=sys.stderr)  # never echo a pasted key
        return 1
    except OSError as e:
        # Unwritable / missing / wrong-kind paths (a file where a folder is needed, a read-only
        # disk, a full disk): the OS names the path; no traceback from deep inside pathlib.
        print(f"dbr {args.verb}: error: {redact(describe_os_error(e))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"dbr {args.verb}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
