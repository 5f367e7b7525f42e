"""YAML as raypar reads it: from a file or ``env:NAME``, each failure one line naming the place.

Used by every reader of a YAML document (specs, components, pipelines, MLTable files,
v1 configs), so each says a missing file, an unset variable or a syntax error alike.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import yaml

from raypar.errors import SpecError


def read_source(path: Union[str, os.PathLike], what: str = "file") -> tuple[str, Path, str]:
    """The text of ``path``, the folder its relative paths are relative to, and its name for messages.

    ``env:NAME`` reads the text from the environment variable NAME (how ``raypar submit``
    hands a spec to its driver); its relative paths are relative to the working directory.
    ``what`` names the document in "not found" messages ("spec file", "file").
    """
    source = str(path)
    if source.startswith("env:"):
        name = source[len("env:"):]
        if name not in os.environ:
            raise SpecError(f"{source}: environment variable {name} is not set")
        return os.environ[name], Path.cwd(), source
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise SpecError(f"{source}: {what} not found") from None
    except OSError as exc:
        raise SpecError(f"{source}: cannot read {what}: {exc.strerror or exc}") from None
    return text, Path(path).parent.resolve(), source


def parse(text: str, source: str) -> Any:
    """The YAML document in ``text`` (JSON is YAML too); a syntax error is one line with its line number."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"{source}: not valid YAML{line}: {getattr(exc, 'problem', None) or exc}") from None
