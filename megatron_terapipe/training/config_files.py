"""Config files: Megatron-LM flags in a text file, read by pretrain_gpt.py and the launchers.

One format for everything (`configs/*.args`), chosen because it *is* Megatron-LM's own
vocabulary: a config is the flags you would type, one or more per line. Rules:

- ``#`` starts a comment; blank lines are ignored; tokens are split like a shell would (shlex).
- ``--config OTHER.args`` inside a file includes OTHER (relative to the including file).
- ``#@ key=value`` lines are launcher hints (``nnodes``, ``nproc_per_node``); pretrain_gpt.py
  ignores them, the launchers read them from the top-level file as defaults.

On the command line ``--config FILE`` is expanded in place, so flags after it override it
(argparse keeps the last value).
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Sequence

CONFIG_FLAG = "--config"
_MAX_DEPTH = 8


class ConfigFileError(ValueError):
    """A config file is missing, includes itself, or cannot be tokenized."""


def read_config(path: str, _depth: int = 0, _seen: tuple[str, ...] = ()) -> list[str]:
    """The flags in `path`, with its includes expanded."""
    real = os.path.realpath(path)
    if real in _seen or _depth > _MAX_DEPTH:
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: include cycle ({' -> '.join(_seen)})")
    if not os.path.isfile(path):
        raise ConfigFileError(f"{CONFIG_FLAG} {path}: no such file")
    tokens: list[str] = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                tokens.extend(shlex.split(line, comments=True))
            except ValueError as exc:
                raise ConfigFileError(f"{path}:{number}: {exc}") from None
    base = os.path.dirname(path)
    return _expand(tokens, base, _depth + 1, (*_seen, real))


def _expand(tokens: Sequence[str], base: str, depth: int, seen: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if token == CONFIG_FLAG or token.startswith(CONFIG_FLAG + "="):
            if "=" in token:
                target = token.split("=", 1)[1]
            elif i + 1 < len(tokens):
                i += 1
                target = tokens[i]
            else:
                raise ConfigFileError(f"{CONFIG_FLAG} needs a file name")
            if base and not os.path.isabs(target):
                target = os.path.join(base, target)
            out.extend(read_config(target, depth, seen))
        else:
            out.append(token)
        i += 1
    return out


def expand_config_args(argv: Sequence[str]) -> list[str]:
    """Command-line arguments with every ``--config FILE`` replaced by the file's flags."""
    return _expand(list(argv), "", 0, ())


def launch_hints(path: str) -> dict[str, str]:
    """The ``#@ key=value`` hints of a config file (top-level file only)."""
    hints: dict[str, str] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            stripped = line.strip()
            if not stripped.startswith("#@"):
                continue
            for item in stripped[2:].split():
                if "=" in item:
                    key, value = item.split("=", 1)
                    hints[key.strip()] = value.strip()
    return hints


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m megatron_terapipe.training.config_files FILE`: print the expanded flags."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m megatron_terapipe.training.config_files CONFIG", file=sys.stderr)
        return 2
    try:
        print(shlex.join(read_config(argv[0])))
    except ConfigFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
