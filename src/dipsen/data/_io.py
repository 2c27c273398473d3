"""File helpers shared by the loaders: gzip detection, hashing, atomic writes, embedded data location."""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from dipsen.errors import DataError

GZIP_MAGIC = b"\x1f\x8b"
EMBEDDED_DIR = Path(__file__).parent / "embedded"


def embedded_dir(name: str) -> Path:
    """Folder of the default data shipped inside the package for dataset ``name``."""
    return EMBEDDED_DIR / name


def read_bytes(path: Path) -> bytes:
    """Whole content of ``path``, gunzipped when it starts with the gzip magic (whatever its name).

    Raises DataError naming the file when it is missing, unreadable or a damaged gzip stream.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file: {exc.strerror or exc}") from None
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except EOFError:
        raise DataError(f"{path}: truncated gzip stream") from None
    except (OSError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt gzip data: {exc}") from None


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def describe_file(path: Path) -> dict:
    """Name, size and sha256 of a file as stored (compressed or not), for provenance records."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"name": path.name, "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def write_atomic(out: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write ``out`` through ``write(file)`` so that readers only ever see the complete file.

    The data goes to a temporary file in the same folder, which replaces ``out`` once complete
    and is removed if writing fails.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~_current_umask())  # mkstemp makes it 0600; give it a normal file's mode
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
