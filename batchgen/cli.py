"""`batchgen` command line.

Each subcommand lives in its own module exposing ``configure(parser)`` (adds its arguments) and
``run(args) -> int`` (the exit code). Only the chosen subcommand's module is imported, so
``batchgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import logging
import re
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("batchgen.generate", "render prompts straight to image files (no Ray)"),
    "run": ("batchgen.jobcli", "run a job spec (YAML) on a local or existing Ray cluster"),
    "submit": ("batchgen.submit", "submit a job spec to a remote Ray cluster (Ray Jobs API)"),
    "status": ("batchgen.jobcli", "show the progress of a job output folder or submitted job"),
    "rerender": ("batchgen.jobcli", "re-render one item of a job from its manifest row"),
    "compare": ("batchgen.compare", "compare two job outputs item by item (regression renders)"),
    "export": ("batchgen.export", "export a job output as WebDataset shards or HF Parquet"),
    "prompts": ("batchgen.prompts", "expand a prompt template (choices, wildcards, class lists) into prompts Parquet"),
    "make-tiny-model": ("batchgen.tiny", "write a tiny random-weight checkpoint (diffusers layout)"),
    "inspect": ("batchgen.inspect", "describe a model (folder or single file): family, components, fingerprint, LoRA match"),
}


class _Parser(argparse.ArgumentParser):
    """argparse echoes the offending value in its errors ("unrecognized arguments: --endpoint
    http://user:password@host"): the message is printed with any URL user-info (and a bare
    ``user:password@``) replaced by ``***@``, as every other batchgen message is."""

    def error(self, message: str):
        from .storage import redact_text

        message = redact_text(_BARE_USERINFO.sub("***@", message))
        super().error(message)


_BARE_USERINFO = re.compile(r"(?<![\w/.*-])[^\s'\"/:@]+:(?!//)[^\s'\"@]*@")


def _chosen_command(argv: list[str]) -> str | None:
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="batchgen",
        description="Distributed, reproducible batch image generation for Stable-Diffusion-family models.",
    )
    from . import __version__

    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and Ray's and the libraries' own logs")
    parser.add_argument("--version", action="version", version=f"batchgen {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = _chosen_command(argv)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                           help="debug logging, and Ray's and the libraries' own logs")
            module = importlib.import_module(module_name)
            configure = getattr(module, f"configure_{name.replace('-', '_')}", None) or module.configure
            runner = getattr(module, f"run_{name.replace('-', '_')}", None) or module.run
            configure(p)
            p.set_defaults(_run=runner)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .errors import BatchgenError

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        quiet_libraries()
    try:
        return int(args._run(args) or 0)
    except (BatchgenError, ValueError, FileNotFoundError) as exc:
        code = int(getattr(exc, "exit_code", 2))
        print(f"batchgen {args.command}: {'error: ' if code != 130 else ''}{exc}", file=sys.stderr)
        return code
    except KeyboardInterrupt:
        print(f"batchgen {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        # At exit, not now: a caller of main() in the same process (tests, a wrapper script) may
        # still use S3 afterwards. Registered after pyarrow's own hook, so it runs first.
        if "pyarrow._s3fs" in sys.modules and not _FINALIZE_REGISTERED:
            atexit.register(finalize_s3)
            _FINALIZE_REGISTERED.append(True)


_FINALIZE_REGISTERED: list[bool] = []


def finalize_s3() -> None:
    """Shut pyarrow's S3 support down at exit, while the interpreter is whole: left to interpreter
    teardown, an S3 filesystem still referenced from a module could be destroyed after the AWS
    SDK and abort the process (SIGABRT, "terminate called without an active exception") after
    the command had succeeded: the exit code is what CI reads. Unreferenced filesystems are
    collected first; a no-op when nothing imported pyarrow's S3 module."""
    if "pyarrow._s3fs" not in sys.modules:
        return
    import gc

    gc.collect()
    from pyarrow.fs import ensure_s3_finalized

    ensure_s3_finalized()


def quiet_libraries() -> None:
    from .quiet import quiet_libraries as _quiet

    _quiet()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
