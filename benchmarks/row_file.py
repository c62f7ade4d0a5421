"""Results files that several benchmark processes fill at once: rows appended under a lock, files replaced whole."""

import fcntl
import json
import os
import tempfile
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` next to ``path`` and rename it over ``path``: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp",
                                     delete=False) as handle:
        handle.write(text)
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, path)


def append_row(path: Path, row: dict) -> None:
    """Add ``row`` to the ``{"rows": [...]}`` file at ``path``; processes appending at once wait for each other
    (the lock lives in the temporary folder, not beside the results)."""
    with open(Path(tempfile.gettempdir()) / f"{path.stem}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        rows = json.loads(path.read_text())["rows"] if path.exists() else []
        write_atomically(path, json.dumps({"rows": [*rows, row]}, indent=1) + "\n")
