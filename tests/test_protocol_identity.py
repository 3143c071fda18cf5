"""Identity files: created once at 0600, the same peer id every run, clear errors."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.pb import crypto_pb2
from libp2p.crypto.secp256k1 import create_new_key_pair as create_secp256k1_key_pair
from libp2p.identity_utils import load_identity as libp2p_load
from libp2p.identity_utils import save_identity as libp2p_save

from specedge.protocol.identity import (
    IdentityError,
    default_identity_path,
    load_identity,
    load_or_create_identity,
    peer_id_of,
)

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX modes")


def test_created_once_with_mode_0600_and_stable_peer_id(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "node.key"
    first = load_or_create_identity(path)
    assert path.exists()
    if os.name != "nt":
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    before = path.read_bytes()
    second = load_or_create_identity(path)
    assert peer_id_of(first) == peer_id_of(second)
    assert path.read_bytes() == before  # loading never rewrites the file
    assert peer_id_of(first).startswith("12D3KooW")
    assert sorted(p.name for p in path.parent.iterdir()) == ["node.key"]  # no temp left


def test_interoperates_with_libp2p_identity_utils(tmp_path: Path) -> None:
    ours = load_or_create_identity(tmp_path / "a.key")
    assert peer_id_of(libp2p_load(tmp_path / "a.key")) == peer_id_of(ours)
    theirs = create_new_key_pair()
    libp2p_save(theirs, tmp_path / "b.key")
    assert peer_id_of(load_or_create_identity(tmp_path / "b.key")) == peer_id_of(theirs)


def test_go_libp2p_64_byte_form_is_accepted(tmp_path: Path) -> None:
    kp = create_new_key_pair()
    raw = kp.private_key.to_bytes() + kp.public_key.to_bytes()
    path = tmp_path / "go.key"
    path.write_bytes(crypto_pb2.PrivateKey(key_type=1, data=raw).SerializeToString())
    path.chmod(0o600)
    assert peer_id_of(load_identity(path)) == peer_id_of(kp)
    wrong = kp.private_key.to_bytes() + b"\x00" * 32
    path.write_bytes(crypto_pb2.PrivateKey(key_type=1, data=wrong).SerializeToString())
    with pytest.raises(IdentityError, match="does not match"):
        load_identity(path)


@posix_only
@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o700 | 0o007])
def test_group_or_world_accessible_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "node.key"
    load_or_create_identity(path)
    path.chmod(mode)
    with pytest.raises(IdentityError, match="chmod 600"):
        load_or_create_identity(path)
    assert path.stat().st_size == 36  # and it was not replaced


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"garbage that is not protobuf \xff\xff",
        crypto_pb2.PrivateKey(key_type=1, data=b"short").SerializeToString(),
        b"\x08\x01\x12\x20" + b"\x00" * 10,  # truncated
        b"x" * 10_000,
    ],
)
def test_corrupt_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "node.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(IdentityError, match="corrupt|empty"):
        load_or_create_identity(path)
    assert path.read_bytes() == content  # never overwritten


def test_non_ed25519_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    libp2p_save(create_secp256k1_key_pair(), path)
    with pytest.raises(IdentityError, match="not an Ed25519"):
        load_or_create_identity(path)


def test_unreadable_paths_are_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path / "file" / "node.key")  # parent is a file
    (tmp_path / "dir.key").mkdir(mode=0o700)
    with pytest.raises(IdentityError):
        load_or_create_identity(tmp_path / "dir.key")  # not a regular file


@posix_only
@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads anything")
def test_file_without_read_permission_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.key"
    load_or_create_identity(path)
    path.chmod(0o200)
    with pytest.raises(IdentityError, match="unreadable"):
        load_or_create_identity(path)


def test_default_path_is_per_role_in_user_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    if sys.platform.startswith("linux"):
        monkeypatch.setenv("XDG_DATA_HOME", "/tmp/xdg-test")
        assert default_identity_path("node") == Path("/tmp/xdg-test/specedge/identity/node.key")
    assert default_identity_path("node") != default_identity_path("verifier")
    for bad in ["", "../x", "Node", "a/b"]:
        with pytest.raises(ValueError):
            default_identity_path(bad)


def test_concurrent_first_runs_agree_on_one_key(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    path = tmp_path / "race.key"
    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: peer_id_of(load_or_create_identity(path)), range(16)))
    assert ids == {peer_id_of(load_or_create_identity(path))}
