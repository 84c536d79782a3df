"""Exporters: functions of a :class:`~memscope_async.attribution.report.Report`.

Each exporter takes a finished report and produces one format; none of them touches the C
core or an event loop, so all of them can be used on a report loaded from disk.
"""

from __future__ import annotations

from .json_report import ExportError, export_json_async, write_json
from .schema import SCHEMA_PATH, load_schema, validate_document
from .text import render_text

__all__ = [
    "SCHEMA_PATH",
    "ExportError",
    "export_json_async",
    "load_schema",
    "render_text",
    "validate_document",
    "write_json",
]
