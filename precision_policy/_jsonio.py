"""Reading JSON files with errors that name the file, line and column."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable


def load_json_file(path: str | Path, error: Callable[..., Exception]) -> Any:
    """Parse ``path`` as JSON; a missing file or bad JSON raises ``error(message, file=..., line=..., column=...)``."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise error("file not found", file=p) from None
    except IsADirectoryError:
        raise error("expected a JSON file, found a directory", file=p) from None
    except UnicodeDecodeError as exc:
        raise error(f"not UTF-8 text ({exc.reason} at byte {exc.start})", file=p) from None
    except OSError as exc:
        raise error(f"cannot read: {exc.strerror or exc}", file=p) from None
    except ValueError as exc:  # e.g. a NUL byte in the path
        raise error(f"invalid path: {exc}", file=repr(str(path))) from None
    return loads_json_text(text, p, error)


def loads_json_text(text: str, path: str | Path, error: Callable[..., Exception]) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _decode_error(exc, path, error) from None
    except RecursionError:
        raise error("JSON nested too deeply", file=path) from None


def _decode_error(exc: json.JSONDecodeError, path: str | Path, error: Callable[..., Exception]) -> Exception:
    try:
        return error(f"malformed JSON: {exc.msg}", file=path, line=exc.lineno, column=exc.colno)
    except TypeError:  # error type without line/column keywords
        return error(f"malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}", file=path)
