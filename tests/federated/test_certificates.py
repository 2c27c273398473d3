"""The throw-away certificates and SuperNode keys: private keys are never readable by others, not even briefly."""

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.cli.supernode.register import try_load_public_key
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from dipsen.federated.flower.launch import generate_certificates, generate_node_key


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


def test_a_supernode_key_is_private_and_its_public_half_is_what_flower_enrols(tmp_path):
    previous = os.umask(0o022)
    try:
        key = generate_node_key(tmp_path / "keys", "client_0003")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(key.private.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "keys").stat().st_mode) == 0o700
    private = load_ssh_private_key(key.private.read_bytes(), None)  # as flower-supernode loads it
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    # what `flwr supernode register` sends: the public key that the SuperLink then ties to a node id
    assert try_load_public_key(key.public) == public_key_to_bytes(private.public_key())
