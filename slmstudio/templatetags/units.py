"""Units as people read them: decimal megabytes, the way file managers and our charts count."""

from __future__ import annotations

from django import template

register = template.Library()


@register.filter
def megabytes(value: object) -> str:
    """98_362_432 → "98.4 MB"; None or junk → "–" (never a made-up number)."""
    try:
        size = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return "–"
    if size >= 1e9:
        return f"{size / 1e9:.2f} GB"
    if size >= 1e6:
        return f"{size / 1e6:.1f} MB"
    return f"{size / 1e3:.1f} kB"
