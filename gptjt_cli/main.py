"""`gptjt`: the umbrella command (train-local, eval, export, init, demo, bench, config)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from gptjt_core.config import ConfigError

from . import demo, local_commands, plan_command, swarm_commands
from .operator_client import CommandError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gptjt", description="Train GPT-J-family models with UL2 on donated GPUs over slow links.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    local_commands.register(sub)
    swarm_commands.register(sub)
    plan_command.register(sub)
    demo.register(sub)
    from bench.registry import register as register_bench

    register_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return int(args.func(args) or 0)
    except CommandError as e:  # operator commands: the exit code says what kind of failure
        if args.verbose:
            raise
        print(f"gptjt {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        # Errors meant for the user: one clear line, no traceback (use -v for one).
        if args.verbose:
            raise
        print(f"gptjt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gptjt {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # whoever read our output stopped (`gptjt config | head`): not an error to report. stdout
        # goes to /dev/null so that flushing it at exit does not raise again; 141 is what a shell
        # shows for a command ended by SIGPIPE
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
