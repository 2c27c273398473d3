"""The deployment's throw-away certificates: the private key is never readable by others, not even briefly."""

import os
import stat
from pathlib import Path

from dipsen.federated.flower.launch import generate_certificates


def test_private_key_is_created_owner_only_and_the_folder_is_private(tmp_path, monkeypatch):
    modes_seen = {}
    real_write_bytes = Path.write_bytes

    def recording(path, data):
        written = real_write_bytes(path, data)
        modes_seen[path.name] = stat.S_IMODE(os.stat(path).st_mode)
        return written

    monkeypatch.setattr(Path, "write_bytes", recording)
    previous = os.umask(0o022)
    try:
        paths = generate_certificates(tmp_path / "certs")
    finally:
        os.umask(previous)
    assert "server.key" not in modes_seen or modes_seen["server.key"] == 0o600  # no window with a wider mode
    assert stat.S_IMODE(paths.server_key.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "certs").stat().st_mode) == 0o700
    assert b"PRIVATE KEY" in paths.server_key.read_bytes()
