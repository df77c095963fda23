"""Instruction data (docs/method.md §6): read JSON/JSONL records, embed them offline, write a subset back.

A record is a JSON object with any of the fields ``instruction``, ``input``, ``output``; its text
is the non-empty fields joined by newlines, in that order. A ``.jsonl`` file holds one record per
non-blank line; a ``.json`` file holds one array of records. The embedding model is a local
sentence-transformers model directory; it is loaded with ``local_files_only=True`` and the
Hugging Face hub in offline mode, so nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dqkernels.core.errors import InputError
from dqkernels.formats.inputs import TEXT_SUFFIXES

INSTRUCTION_FIELDS = ("instruction", "input", "output")


@dataclass(frozen=True)
class InstructionRecords:
    """Records of one instruction file, in file order.

    records: the parsed JSON objects.
    lines: for ``.jsonl`` the original line of each record (so a subset is written back
        byte for byte); None for ``.json``.
    file_format: "json" or "jsonl".
    """

    records: list[dict]
    lines: Optional[list[str]]
    file_format: str


def read_instruction_records(path: str | os.PathLike) -> InstructionRecords:
    """Parse a ``.json`` (array of objects) or ``.jsonl`` (one object per line) file.

    Raises ValueError for malformed JSON, a record that is not an object, a record with none of
    instruction/input/output, or a file without records.
    """
    path = Path(path)
    if path.suffix not in TEXT_SUFFIXES:
        raise InputError(f"instruction data {str(path)!r} must be a .json or .jsonl file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise InputError(f"{str(path)!r} is not UTF-8 text ({error})") from None
    if path.suffix == ".jsonl":
        lines = [line for line in text.splitlines() if line.strip()]
        records = []
        for line_number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except (json.JSONDecodeError, RecursionError) as error:
                raise InputError(f"{str(path)!r}, record {line_number}: invalid JSON ({error})") from None
        file_format = "jsonl"
    else:
        try:
            records = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise InputError(f"{str(path)!r}: invalid JSON ({error})") from None
        if not isinstance(records, list):
            raise InputError(f"{str(path)!r} must hold a JSON array of records")
        lines = None
        file_format = "json"
    if not records:
        raise InputError(f"instruction data {str(path)!r} holds no records")
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict) or not any(key in record for key in INSTRUCTION_FIELDS):
            raise InputError(
                f"{str(path)!r}, record {number}: expected an object with instruction/input/output"
            )
    return InstructionRecords(records, lines, file_format)


def record_text(record: dict) -> str:
    """Text of one record: its non-empty instruction, input and output joined by newlines."""
    parts = [str(record.get(key) or "") for key in INSTRUCTION_FIELDS]
    return "\n".join(part for part in parts if part)


def write_instruction_records(
    source: InstructionRecords, indices: np.ndarray, path: str | os.PathLike
) -> None:
    """Write the records at ``indices`` (sorted int64) to ``path`` in the source's own format."""
    chosen = [int(i) for i in indices]
    with open(path, "w", encoding="utf-8") as handle:
        if source.file_format == "jsonl":
            handle.writelines(source.lines[i] + "\n" for i in chosen)
        else:
            json.dump([source.records[i] for i in chosen], handle, ensure_ascii=False, indent=2)
            handle.write("\n")


def load_text_model(model_path: str | os.PathLike, device: Optional[str] = None):
    """Load a local sentence-transformers model directory without network access.

    Also turns off transformers' weight-loading progress bar (the CLI has its own).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise InputError(
            "text features need the sentence-transformers package (pip install sentence-transformers)"
        ) from error
    from transformers.utils import logging as transformers_logging

    from dqkernels.features.image import resolve_device

    device = str(resolve_device(device))
    model_path = Path(model_path)
    if not (model_path / "modules.json").is_file() and not (model_path / "config.json").is_file():
        raise InputError(f"{str(model_path)!r} is not a sentence-embedding model directory")
    transformers_logging.disable_progress_bar()
    try:
        return SentenceTransformer(str(model_path), device=device, local_files_only=True)
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError) as error:
        # UnpicklingError: torch's safe loader refused weights that would run code.
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"cannot load text model {str(model_path)!r}: {first_line}") from error


def embed_texts(
    texts: Sequence[str],
    model_path: str | os.PathLike,
    batch_size: int = 64,
    device: Optional[str] = None,
    progress: bool = False,
) -> np.ndarray:
    """Sentence embeddings (N, D) float32 of ``texts``, in order (float16 autocast on CUDA)."""
    import torch

    model = load_text_model(model_path, device)
    autocast = (
        torch.autocast(device_type="cuda", dtype=torch.float16)
        if model.device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        embeddings = model.encode(
            list(texts),
            batch_size=batch_size,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
    return np.ascontiguousarray(embeddings, dtype=np.float32)
