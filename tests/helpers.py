"""Shared test helpers."""
from __future__ import annotations


class ListLogger:
    """A Logger stand-in that keeps every ``log`` call as ``(step, metrics)``."""

    def __init__(self):
        self.rows = []

    def log(self, metrics, step):
        self.rows.append((step, dict(metrics)))

    def progress(self, total, desc=""):
        from tqdm import tqdm
        return tqdm(total=total, disable=True)
