"""Templates and static files from the top-level ``web/`` folder (``nekojump.assets``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, select_autoescape


def assets_dir() -> Path:
    """Where ``web/`` lives: inside the installed package, or beside a source checkout."""
    try:
        import nekojump.assets  # a namespace package: web/ mapped in by setup.py
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "web"
    return Path(next(iter(nekojump.assets.__path__)))


def _when(at: float | None) -> str:
    if at is None:
        return "never"
    return time.strftime("%Y-%m-%d %H:%M", time.gmtime(at)) + " UTC"


def _size(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024  # type: ignore[assignment]
    return str(count)  # pragma: no cover


class Renderer:
    """Renders the dashboard's Jinja templates with autoescaping on."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or assets_dir()
        self.env = Environment(
            loader=FileSystemLoader(str(self.directory / "templates")),
            autoescape=select_autoescape(["html"]),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.env.filters["when"] = _when
        self.env.filters["size"] = _size

    def page(self, template: str, **context: Any) -> bytes:
        return self.env.get_template(template).render(**context).encode("utf-8")

    @property
    def static_dir(self) -> Path:
        return self.directory / "static"
