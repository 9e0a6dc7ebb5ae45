"""Whether a safetensors file is whole, read from its header alone (no tensor is loaded).

A file cut short by a full disk or an interrupted copy otherwise fails deep inside a loader with
`SafetensorError ... incomplete metadata`, naming no file.
"""

from __future__ import annotations

import json
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """Whether the file is a whole safetensors file: its header parses and its data ends where the file does."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated (no header)"
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            return "truncated (header cut short)"
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "not a safetensors file (header is not JSON)"
    try:
        ends = [int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"]
    except (AttributeError, KeyError, IndexError, TypeError, ValueError):
        return "not a safetensors file (header lacks the tensors' data_offsets)"
    if 8 + header_len + max(ends, default=0) != size:
        return f"truncated or padded ({size} bytes, its header describes {8 + header_len + max(ends, default=0)})"
    return None


def check_model_weight_files(model_dir: str, setting: str) -> None:
    """Refuse a local model directory holding a safetensors file that is not whole, naming the file."""
    folder = Path(model_dir).expanduser()
    if not folder.is_dir():
        return  # a hub id: the hub client checks what it downloads
    for path in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(path)
        if problem:
            raise ValueError(f"{setting}={model_dir!r}: {path.name} is {problem}; copy or download the model again")
