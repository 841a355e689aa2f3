"""``python -m lightning_cggr COMMAND ...``: the package's three commands by name.

``train`` takes Hydra overrides (``python -m lightning_cggr.train``), ``export`` and ``generate``
their own options (``python -m lightning_cggr.export`` / ``.generate``); ``--help`` after a command
shows that command's help."""

from __future__ import annotations

import difflib
import sys

COMMANDS = {
    "train": "train a causal LM with CGGR (Hydra overrides, e.g. trainer.max_steps=50 cggr=sequence)",
    "export": "a run folder or checkpoint -> a Hugging Face model folder",
    "generate": "sample a continuation from an exported folder, a run folder or a checkpoint",
}

USAGE = "usage: python -m lightning_cggr {train,export,generate} [ARGS...]\n\n" + "\n".join(
    f"  {name:<9} {what}" for name, what in COMMANDS.items()) + "\n\n'python -m lightning_cggr COMMAND --help' shows a command's options."


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, file=sys.stdout if argv else sys.stderr)
        raise SystemExit(0 if argv else 2)
    if argv[0] == "--version":
        from .cli import version_line

        print(version_line())
        return
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(f"error: {command!r} is not a command{hint} (one of: {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    if command == "train":  # Hydra reads the command line itself
        from .train import cli

        sys.argv = [f"{sys.argv[0]} train", *rest]
        cli()
    elif command == "export":
        from .export import main as export

        export(rest)
    else:
        from .generate import main as generate

        generate(rest)


if __name__ == "__main__":
    main()
