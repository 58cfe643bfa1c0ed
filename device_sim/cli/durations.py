"""Durations for people: rounded to what a reader can use (`0.84 s`, `12.3 s`, `4 min 05 s`,
`2 h 03 min`), never a raw float."""

from __future__ import annotations


def human_duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
