"""API keys of the Serve app: a JSON file of salted hashes, made, listed and revoked with ``rau keys``.

A key is ``NAME.SECRET`` (``SECRET``: 32 random bytes, URL-safe base64); it is printed once, by ``rau keys add``, and
never stored: the file holds per key a random salt and ``scrypt(SECRET, salt)`` (n=2**14, r=8, p=1), the time it was
made and, once revoked, the time it was revoked (a revoked key stays listed and is refused). The file is written
atomically (temp file, rename) with mode 0600. Rotation: ``rau keys add NEW``, hand the new key out, then ``rau keys
revoke OLD``; the running app re-reads the file when its modification time changes, so neither step needs a restart.
MONAI Label clients log in with ``username = NAME`` and ``password = SECRET`` (``POST /auth/token``); the token they
get back is the key itself.
Use: ``add_key(path, "alice") -> key``; ``list_keys(path)``; ``revoke_key(path, "alice")``;
``KeyRing(path).check(token) -> Verdict`` (the app's check, cached per token until the file changes).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rau_ray.atomic import atomic_open
from rau_ray.errors import ConfigError

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
FORMAT = "rau-api-keys/1"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def hash_secret(secret: str, salt: bytes, params: dict | None = None) -> str:
    p = {**SCRYPT, **(params or {})}
    return hashlib.scrypt(secret.encode(), salt=salt, n=int(p["n"]), r=int(p["r"]), p=int(p["p"]),
                          maxmem=256 * 1024 * 1024, dklen=32).hex()


def split_key(token: str) -> tuple[str, str] | None:
    """(name, secret) of a key ``NAME.SECRET``, or None for text of another shape."""
    name, dot, secret = token.partition(".")
    if not dot or not NAME.fullmatch(name) or not re.fullmatch(r"[A-Za-z0-9_-]{16,128}", secret):
        return None
    return name, secret


def read_keys(path: str | os.PathLike) -> dict:
    """The file's ``keys`` ({name: record}); a missing file is an empty store, a malformed one a ConfigError."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"API keys file {path}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
        raise ConfigError(f"API keys file {path}: not a {FORMAT} file (make one with `rau keys add NAME --file "
                          f"{path}`)")
    return doc["keys"]


def _write(path: Path, keys: dict) -> None:
    with atomic_open(path, "w") as f:  # mkstemp: the temp file is 0600 already
        os.fchmod(f.fileno(), 0o600)
        json.dump({"format": FORMAT, "keys": keys}, f, indent=2, sort_keys=True)
        f.write("\n")


def add_key(path: str | os.PathLike, name: str) -> str:
    """Make key ``name`` and store its salted hash; returns the key (``NAME.SECRET``), which is stored nowhere."""
    path = Path(path)
    if not NAME.fullmatch(name):
        raise ConfigError(f"key name {name!r}: use 1 to 64 letters, digits, '_' or '-'")
    keys = read_keys(path)
    if name in keys:
        state = "revoked" if keys[name].get("revoked") else "active"
        raise ConfigError(f"key {name!r} already exists in {path} ({state}); pick another name (rotation: add a new "
                          "key, then revoke the old one)")
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    keys[name] = {"salt": salt.hex(), "scrypt": dict(SCRYPT), "hash": hash_secret(secret, salt),
                  "created": _now(), "revoked": None}
    _write(path, keys)
    return f"{name}.{secret}"


def revoke_key(path: str | os.PathLike, name: str) -> dict:
    path = Path(path)
    keys = read_keys(path)
    if name not in keys:
        raise ConfigError(f"no key {name!r} in {path}" + (f"; keys: {', '.join(sorted(keys))}" if keys else ""))
    if not keys[name].get("revoked"):
        keys[name]["revoked"] = _now()
        _write(path, keys)
    return {"name": name, "revoked": keys[name]["revoked"]}


def list_keys(path: str | os.PathLike) -> list[dict]:
    """Name, created, revoked of each key (never a hash or a salt)."""
    return [{"name": n, "created": r.get("created"), "revoked": r.get("revoked")}
            for n, r in sorted(read_keys(path).items())]


@dataclass(frozen=True)
class Verdict:
    """``name``: the key's name when ``ok``; ``reason``: why not (never the key)."""

    ok: bool
    name: str | None
    reason: str


class KeyRing:
    """The app's view of a keys file: re-read when its modification time (or size) changes; each token's verdict is
    cached (by its SHA-256, never the token itself) until then, so scrypt runs once per key and file version."""

    def __init__(self, path: str | os.PathLike, cache: int = 1024):
        self.path = Path(path)
        self.capacity = cache
        self._stamp: tuple | None = None
        self._keys: dict = {}
        self._verdicts: OrderedDict[bytes, Verdict] = OrderedDict()
        self.reload()

    def _file_stamp(self) -> tuple:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            raise ConfigError(f"API keys file {self.path} does not exist (make it with `rau keys add NAME --file "
                              f"{self.path}`)") from None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self) -> None:
        stamp = self._file_stamp()
        if stamp != self._stamp:
            self._keys = read_keys(self.path)
            self._verdicts.clear()
            self._stamp = stamp

    def active(self) -> list[str]:
        return sorted(n for n, r in self._keys.items() if not r.get("revoked"))

    def cached(self, token: str) -> Verdict | None:
        """The verdict already reached on this token for the file as last read, or None."""
        return self._verdicts.get(hashlib.sha256(token.encode()).digest())

    def check(self, token: str) -> Verdict:
        try:
            self.reload()
        except ConfigError as e:  # the file vanished or was garbled while serving: refuse, naming the problem
            return Verdict(False, None, f"the server cannot read its API keys ({e})")
        digest = hashlib.sha256(token.encode()).digest()
        verdict = self._verdicts.get(digest)
        if verdict is None:
            verdict = self._verify(token)
            self._verdicts[digest] = verdict
            while len(self._verdicts) > self.capacity:
                self._verdicts.popitem(last=False)
        return verdict

    def _verify(self, token: str) -> Verdict:
        parts = split_key(token)
        if parts is None:
            return Verdict(False, None, "not an API key of this server (a key is NAME.SECRET, from `rau keys add`)")
        name, secret = parts
        record = self._keys.get(name)
        if record is None:
            return Verdict(False, None, "unknown or wrong API key")
        if not hmac.compare_digest(hash_secret(secret, bytes.fromhex(record["salt"]), record.get("scrypt")),
                                   record["hash"]):
            return Verdict(False, None, "unknown or wrong API key")
        if record.get("revoked"):
            return Verdict(False, name, f"API key {name!r} was revoked at {record['revoked']}")
        return Verdict(True, name, "")
