"""The ``guidewrap`` command line."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``guidewrap`` console script.

    Example:
        >>> main(["--version"])  # doctest: +ELLIPSIS
        guidewrap ...
        0
    """
    from . import __version__

    parser = argparse.ArgumentParser(prog="guidewrap", description="Guidance for PyTorch training loops.")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("demo", help="train a deep MLP with and without guidance on MNIST-1D (offline)")
    args = parser.parse_args(argv)
    if args.version:
        print(f"guidewrap {__version__}")
        return 0
    if args.command == "demo":
        print("guidewrap demo is not yet built (tracked in the reproduction issue); the library itself works.")
        return 0
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
