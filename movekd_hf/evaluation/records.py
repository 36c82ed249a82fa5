"""Record builders shared by the official-file readers (readers.py) and the `datasets` readers (hf_readers.py)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from ..modeling.llava_conventions import load_image


def decode_image(value: str) -> Any:
    """A base64-encoded image (MMBench's TSV column) -> PIL image."""
    return load_image(base64.b64decode(value))


def mmbench_record(row: Mapping[str, Any]) -> dict:
    """One MMBench row (the TSV's or the `datasets` version's columns) -> an evaluation record, image decoded."""

    def present(value: Any) -> bool:
        return value is not None and str(value).strip() not in ("", "nan", "None")

    options = {letter: str(row[letter]) for letter in "ABCDEFGHI" if letter in row and present(row[letter])}
    return {"index": int(row["index"]), "question": row["question"], "options": options,
            "hint": row["hint"] if present(row.get("hint")) else None, "answer": row.get("answer") or None,
            "category": row.get("category"),
            "image": decode_image(row["image"]) if isinstance(row["image"], str) else row["image"]}  # fmt: skip
