"""The JSON Schema of the report document (schema version 1), shipped inside the package.

``SCHEMA_PATH`` sits next to this module, in an installed wheel as in a checkout (the
package is installed as files, never zipped; :mod:`importlib.resources` would add ~1,000
long-lived objects to every profiled program for nothing).  Validation needs the
third-party ``jsonschema`` package, which is a test dependency only: it is imported when
:func:`validate_document` is called, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import orjson

from .json_report import ExportError

__all__ = ["SCHEMA_PATH", "load_schema", "validate_document"]

#: The schema file.
SCHEMA_PATH: Path = Path(__file__).resolve().parent / "schema" / "report-v1.schema.json"

# Error messages quote the offending value; a whole task dict on one line helps nobody.
_MAX_MESSAGE = 300


def load_schema() -> dict[str, Any]:
    """The schema as a fresh dict (callers may mutate it).  Raises ``OSError`` if the file is
    missing from the installation."""
    return orjson.loads(SCHEMA_PATH.read_bytes())


def validate_document(doc: Mapping[str, Any]) -> list[str]:
    """Check ``doc`` against the schema; return one line per problem, ``[]`` if it is valid.

    ``doc`` is either the parsed JSON document or ``Report.to_dict()`` directly (tuples are
    accepted where the schema says array, because ``dataclasses.asdict`` keeps them).
    Each line reads ``"<path>: <message>"`` with the path written as ``tasks/0/state``
    (``<root>`` for the top level); lines are sorted by path so the output is stable.

    Raises :class:`ExportError` if the ``jsonschema`` package is not installed.
    """
    try:
        import jsonschema
    except ImportError:
        raise ExportError(
            "validating a report needs the 'jsonschema' package (pip install jsonschema); "
            "it is a test dependency, not a runtime one"
        ) from None

    base = jsonschema.Draft202012Validator
    type_checker = base.TYPE_CHECKER.redefine(
        "array", lambda _checker, instance: isinstance(instance, (list, tuple))
    )
    validator_cls = jsonschema.validators.extend(base, type_checker=type_checker)
    validator = validator_cls(load_schema())
    errors = sorted(validator.iter_errors(doc), key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    return [_describe(e) for e in errors]


def _describe(error: Any) -> str:
    where = "/".join(str(p) for p in error.absolute_path) or "<root>"
    message = " ".join(error.message.split())  # one line, whatever the value's repr holds
    if len(message) > _MAX_MESSAGE:
        message = message[: _MAX_MESSAGE - 3] + "..."
    return f"{where}: {message}"
