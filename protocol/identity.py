"""Peer identities: Ed25519 libp2p key pairs kept in a 0600 file.

A node or verifier must keep the same peer id across runs (receipts and ledger rows
name it), so the key is created once and then only loaded. The file format is
libp2p's protobuf-encoded private key, the same as
``libp2p.identity_utils.save_identity`` writes, so either can read the other's.
"""

from __future__ import annotations

import os
import re
import stat
import tempfile
from pathlib import Path

import platformdirs
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.ed25519 import create_new_key_pair as _new_ed25519_key_pair
from libp2p.crypto.keys import KeyPair, KeyType
from libp2p.crypto.pb import crypto_pb2
from libp2p.peer.id import ID

APP_NAME = "specedge"
MAX_IDENTITY_FILE_BYTES = 4096  # a libp2p Ed25519 key file is 36 bytes
_ROLE_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")


class IdentityError(Exception):
    """The identity file cannot be used: unreadable, corrupt, or readable by others.

    Raised instead of silently making a new key, which would change the peer id and
    orphan every receipt signed so far.
    """


def default_identity_path(role: str) -> Path:
    """Where a role ("node", "verifier", "ledger") keeps its key by default.

    Each role has its own file so a machine running a node and a verifier has two
    peer ids and their receipts are not confused.
    """
    if not _ROLE_RE.match(role):
        raise ValueError(f"role must match {_ROLE_RE.pattern}, got {role!r}")
    return platformdirs.user_data_path(APP_NAME) / "identity" / f"{role}.key"


def peer_id_of(key_pair: KeyPair) -> str:
    """The base58 libp2p peer id of a key pair (what hosts, receipts and logs show)."""
    return ID.from_pubkey(key_pair.public_key).to_base58()


def _check_mode(path: Path, st: os.stat_result) -> None:
    # Like ssh: a private key others can read (or replace) is not a private key.
    if not stat.S_ISREG(st.st_mode):
        raise IdentityError(f"identity {path} is not a regular file")
    if os.name != "nt" and st.st_mode & 0o077:
        raise IdentityError(
            f"identity {path} has mode {stat.S_IMODE(st.st_mode):04o}: it is accessible "
            f"by group or others; run `chmod 600 {path}`"
        )


def _decode_key(path: Path, data: bytes) -> KeyPair:
    try:
        msg = crypto_pb2.PrivateKey.FromString(data)
    except Exception as exc:  # protobuf raises DecodeError, some builds ValueError
        raise IdentityError(f"identity {path} is corrupt (not a libp2p private key)") from exc
    if msg.key_type != KeyType.Ed25519.value:
        raise IdentityError(f"identity {path} is not an Ed25519 key (type {msg.key_type})")
    raw = msg.data
    if len(raw) == 64:
        # go-libp2p's form: 32-byte seed followed by the public key; check and keep the seed.
        seed, public = raw[:32], raw[32:]
    elif len(raw) == 32:
        seed, public = raw, None
    else:
        raise IdentityError(f"identity {path} is corrupt (key of {len(raw)} bytes)")
    try:
        private_key = Ed25519PrivateKey.from_bytes(seed)
        public_key = private_key.get_public_key()
    except Exception as exc:
        raise IdentityError(f"identity {path} is corrupt ({exc})") from exc
    if public is not None and public_key.to_bytes() != public:
        raise IdentityError(f"identity {path} is corrupt (public half does not match)")
    return KeyPair(private_key, public_key)


def load_identity(path: str | os.PathLike[str]) -> KeyPair:
    """Load an existing identity file.

    Raises FileNotFoundError when there is none (``load_or_create_identity`` then
    creates it) and IdentityError for a corrupt, unreadable or group/world-accessible
    file, so a broken key is never silently replaced by a new peer id.
    """
    path = Path(path)
    try:
        # O_NOFOLLOW is not used: a symlink to a 0600 file (a mounted secret) is fine;
        # the mode check is on the file itself via fstat.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise IdentityError(f"identity {path} is unreadable: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        _check_mode(path, st)
        data = b""
        while len(data) <= MAX_IDENTITY_FILE_BYTES:
            chunk = os.read(fd, MAX_IDENTITY_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    except OSError as exc:
        raise IdentityError(f"identity {path} is unreadable: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_IDENTITY_FILE_BYTES:
        raise IdentityError(f"identity {path} is corrupt (larger than any key file)")
    if not data:
        raise IdentityError(f"identity {path} is empty (corrupt)")
    return _decode_key(path, data)


def _create_identity(path: Path) -> KeyPair:
    key_pair = _new_ed25519_key_pair()
    data = key_pair.private_key.serialize()
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Write a private temp file, then link it into place: the key file appears
        # whole or not at all, and if two processes race, exactly one key wins.
        # mkstemp creates the file with mode 0600.
        fd, tmp = tempfile.mkstemp(prefix=".identity-", dir=path.parent)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
            os.close(fd)
            fd = -1
            try:
                os.link(tmp, path)
            except FileExistsError:
                return load_identity(path)  # lost the race: use the winner's key
        finally:
            if fd >= 0:
                os.close(fd)
            os.unlink(tmp)
    except OSError as exc:
        raise IdentityError(f"cannot create identity {path}: {exc.strerror or exc}") from exc
    return key_pair


def load_or_create_identity(path: str | os.PathLike[str]) -> KeyPair:
    """The key pair stored at ``path``, created (mode 0600) on first use.

    The same file gives the same peer id on every run. A file that exists but cannot
    be used raises IdentityError; it is never overwritten.
    """
    path = Path(path).expanduser()
    try:
        return load_identity(path)
    except FileNotFoundError:
        return _create_identity(path)
