"""API keys (rau_ray/serve/keys.py) and the access helpers that need no server (rau_ray/serve/auth.py): the keys
file holds salted scrypt hashes only (mode 0600, written atomically), a key verifies and a wrong / revoked one does
not, rotation (add new, revoke old) is seen by a running KeyRing without a restart, the per-key token bucket, the
audit line's fields, and the Serve configs' key requirement (gpu.yaml and the RayService on, local.yaml off on
127.0.0.1 only)."""

import json
import stat
from pathlib import Path

import pytest
import yaml

from rau_ray.errors import ConfigError
from rau_ray.serve import keys
from rau_ray.serve.auth import AuditLog, RateLimiter

REPO = Path(__file__).resolve().parents[3]


def test_add_stores_only_a_salted_hash(tmp_path):
    path = tmp_path / "keys.json"
    key = keys.add_key(path, "alice")
    name, secret = keys.split_key(key)
    assert name == "alice" and len(secret) >= 40
    text = path.read_text()
    assert secret not in text and key not in text  # never stored
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    record = json.loads(text)["keys"]["alice"]
    assert record["hash"] == keys.hash_secret(secret, bytes.fromhex(record["salt"]), record["scrypt"])
    other = keys.add_key(path, "bob")
    salts = {r["salt"] for r in json.loads(path.read_text())["keys"].values()}
    assert len(salts) == 2 and other != key  # a salt per key
    assert [k["name"] for k in keys.list_keys(path)] == ["alice", "bob"]
    assert "hash" not in json.dumps(keys.list_keys(path)) and "salt" not in json.dumps(keys.list_keys(path))
    assert not list(tmp_path.glob(".keys.json.*"))  # no temp file left behind
    with pytest.raises(ConfigError, match="already exists"):
        keys.add_key(path, "alice")
    with pytest.raises(ConfigError, match="key name"):
        keys.add_key(path, "al ice")


def test_verify_wrong_and_revoked(tmp_path):
    path = tmp_path / "keys.json"
    key = keys.add_key(path, "alice")
    ring = keys.KeyRing(path)
    assert ring.check(key) == keys.Verdict(True, "alice", "")
    name, secret = keys.split_key(key)
    wrong = f"{name}.{secret[:-1]}{'A' if secret[-1] != 'A' else 'B'}"
    for bad in (wrong, f"bob.{secret}", "not-a-key", ""):
        v = ring.check(bad)
        assert not v.ok and v.name is None and secret not in v.reason
    keys.revoke_key(path, "alice")
    v = ring.check(key)  # the same KeyRing: the file changed, so it is read again and the cached verdict dropped
    assert not v.ok and v.name == "alice" and "revoked" in v.reason
    assert keys.list_keys(path)[0]["revoked"]
    with pytest.raises(ConfigError, match="no key 'carol'"):
        keys.revoke_key(path, "carol")


def test_rotation_without_restart(tmp_path):
    path = tmp_path / "keys.json"
    old = keys.add_key(path, "scanner-2024")
    ring = keys.KeyRing(path)
    assert ring.check(old).ok
    new = keys.add_key(path, "scanner-2025")  # 1. add the new key, hand it out: both work meanwhile
    assert ring.check(new).ok and ring.check(old).ok
    keys.revoke_key(path, "scanner-2024")  # 2. revoke the old one
    assert ring.check(new).ok and not ring.check(old).ok
    assert ring.active() == ["scanner-2025"]


def test_a_broken_or_missing_file_is_named(tmp_path):
    path = tmp_path / "keys.json"
    with pytest.raises(ConfigError, match="does not exist"):
        keys.KeyRing(path)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not readable JSON"):
        keys.read_keys(path)
    path.write_text(json.dumps({"keys": []}))
    with pytest.raises(ConfigError, match="rau keys add"):
        keys.read_keys(path)


def test_rate_limiter_token_bucket():
    now = [0.0]
    rl = RateLimiter(per_minute=3, clock=lambda: now[0])
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # a minute's worth at once
    wait = rl.take("a")
    assert wait == pytest.approx(20.0)  # one token comes back every 60 / 3 s
    assert rl.take("b") == 0.0  # per name
    now[0] = 20.0
    assert rl.wait("a") == 0.0 and rl.take("a") == 0.0 and rl.take("a") > 0
    now[0] = 1000.0
    assert [rl.take("a") for _ in range(3)] == [0.0, 0.0, 0.0] and rl.take("a") > 0  # never more than the burst


def test_audit_line_keeps_ids_only(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl")
    log.record(key="alice", action="open", method="PUT", route="/session/", status=200, session="abc_DEF-123",
               image='Doe^Jane <script>"', reason=None)
    log.close()
    (line,) = (tmp_path / "audit.jsonl").read_text().splitlines()
    rec = json.loads(line)
    assert set(rec) == {"time", "key", "action", "method", "route", "session", "image", "status"}
    assert rec["key"] == "alice" and rec["session"] == "abc_DEF-123" and rec["status"] == 200
    assert "^" not in rec["image"] and "<" not in rec["image"] and '"' not in rec["image"]
    assert stat.S_IMODE((tmp_path / "audit.jsonl").stat().st_mode) == 0o600


def test_serve_configs_require_keys_off_loopback():
    from rau_ray.serve.app import check_config

    local = yaml.safe_load((REPO / "serve_configs" / "local.yaml").read_text())
    gpu = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    service = yaml.safe_load((REPO / "deploy" / "kuberay" / "rayservice.yaml").read_text())
    k8s = yaml.safe_load(service["spec"]["serveConfigV2"])
    check_config(local, "local.yaml")  # keys off, 127.0.0.1
    assert local["applications"][0]["args"]["auth_off_on_loopback"] is True
    for conf in (gpu, k8s):
        check_config(conf)
        assert conf["applications"][0]["args"]["api_keys_file"] == "/etc/rau/keys.json"
    bad = yaml.safe_load((REPO / "serve_configs" / "gpu.yaml").read_text())
    del bad["applications"][0]["args"]["api_keys_file"]
    with pytest.raises(ConfigError, match=r"gpu.yaml: applications\[0\].args.api_keys_file is required: Serve "
                                          r"listens on 0.0.0.0"):
        check_config(bad, "gpu.yaml")
    bad["applications"][0]["args"]["auth_off_on_loopback"] = True  # not on 0.0.0.0
    with pytest.raises(ConfigError, match="not loopback"):
        check_config(bad, "gpu.yaml")
    local["applications"][0]["args"].pop("auth_off_on_loopback")
    with pytest.raises(ConfigError, match="api_keys_file is required"):
        check_config(local, "local.yaml")


def test_app_args_access(tmp_path):
    from rau_ray.serve.app import build_app, start

    with pytest.raises(ConfigError, match="serve args.api_keys_file is required"):
        build_app({"profile": "tiny"})
    with pytest.raises(ConfigError, match="does not exist"):
        build_app({"api_keys_file": str(tmp_path / "none.json")})
    path = tmp_path / "keys.json"
    keys.add_key(path, "alice")
    app = build_app({"api_keys_file": str(path), "cors_origins": ["https://viewer.example.org"]})
    settings = app._bound_deployment.init_args[4]
    assert settings.access.keys_file == str(path) and settings.access.cors_origins == ("https://viewer.example.org",)
    with pytest.raises(ConfigError, match="cors_origins"):
        build_app({"api_keys_file": str(path), "cors_origins": ["https://viewer.example.org/path"]})
    with pytest.raises(ConfigError, match=">= 1"):
        build_app({"api_keys_file": str(path), "requests_per_minute_per_key": 0})
    with pytest.raises(ConfigError, match="required to serve on 0.0.0.0"):  # refused before anything starts
        start(host="0.0.0.0")
