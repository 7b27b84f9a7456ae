"""The serving graph: its args (``AppArgs``), the application builder of the Serve configs, and ``start``/``stop``.

``build_app(args)`` is what ``serve run serve_configs/local.yaml`` calls (``import_path:
rau_ray.serve.app:build_app``); ``build_graph(args, options)`` binds Ingress(Retriever, Policy, Segmenter,
Commander) with per-deployment options. A policy + segmenter checkpoint pair that does not belong together
(``pair_refusal``) starts its Ingress alone (no model loaded), which answers 503 naming both. The routes are in
``routes``, the calls between deployments in ``pipeline``, the messages they exchange in ``messages``, the models in
``deployments``. The Commander's optional LLM fallback is set by the ``command_llm_*`` args.
Use: ``serve run serve_configs/local.yaml``; from Python ``base_url = start(profile="tiny", port=8000)``, ``stop()``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import yaml
from ray import serve

from rau_ray import ray_session
from rau_ray.config import from_dict, text_fields
from rau_ray.errors import ConfigError
from rau_ray.models import checkpoint as ckpt
from rau_ray.serve import auth, codecs
from rau_ray.serve.commander import Commander
from rau_ray.serve.deployments import Policy, Retriever, Segmenter
from rau_ray.serve.pipeline import DecoderSpec
from rau_ray.serve.routes import Ingress, Settings

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "serve_configs" / "local.yaml"


@dataclass(frozen=True)
class AppArgs:
    """``args:`` of a Serve config application (``import_path: rau_ray.serve.app:build_app``)."""

    profile: str = "tiny"
    bank_dir: str | None = None  # None: the tiny profile builds a small CT phantom bank at start-up
    policy_checkpoint: str | None = None
    segmenter_checkpoint: str | None = None
    device: str = "cpu"  # cpu | cuda | auto
    threads: int | None = 1  # torch threads per replica (None: torch's default)
    policy_batch_size: int = 8  # @serve.batch max_batch_size; 1 = unbatched
    policy_batch_wait_s: float = 0.01  # a lone request on an idle replica skips it; under load the queued ones get in
    max_new_tokens: int | None = None
    embedding_cache: int | None = None
    # Where a click's SAM2 prompt decoder runs: "segmenter" (the replica holding the image's embedding; GPUs) or
    # "ingress" (next to the sessions, on the embedding fetched once per image: no handle hop per click, for CPUs
    # and small models; see rau_ray/serve/prompt_decoder.py).
    prompt_decoding: str = "segmenter"
    ingress_embedding_cache: int = 32  # images whose embeddings the Ingress keeps for prompt_decoding: ingress
    session_ttl_s: float = 900.0
    max_sessions: int = 64
    max_image_bytes: int = codecs.MAX_IMAGE_BYTES
    max_pixels: int = codecs.MAX_PIXELS
    # The Commander's optional LLM fallback for commands the deterministic parser cannot read (rau_ray.commands):
    # any OpenAI-compatible /v1/chat/completions server (vLLM, llama.cpp, Ollama...). Off while the URL is None.
    command_llm_url: str | None = None
    command_llm_model: str | None = None  # required with a URL: the model name the server knows
    command_llm_api_key_env: str | None = None  # NAME of an env var of the replicas holding the key, never the key
    command_llm_timeout_s: float = 10.0
    # POST /v1/pacs/segment (rau_ray/serve/pacs_routes.py): each DICOMweb request's timeout, and the PACS URL
    # prefixes the route may reach (None: any http(s) URL; set it where clients must not steer the app's requests)
    pacs_timeout_s: float = 30.0
    pacs_allowed_urls: tuple[str, ...] | None = None
    # Access (rau_ray/serve/auth.py): the JSON file of hashed API keys (`rau keys add NAME --file PATH`), required
    # unless auth_off_on_loopback (serve_configs/local.yaml only: keys off, every route open, a loud warning; refused
    # by `start` and `check_config` on a host other than loopback). Per key: live sessions, requests a minute (429).
    api_keys_file: str | None = None
    auth_off_on_loopback: bool = False
    max_sessions_per_key: int = 16
    requests_per_minute_per_key: int = 600
    cors_origins: tuple[str, ...] | None = None  # None: no CORS headers; e.g. ["https://viewer.example.org"]
    audit_log: str | None = None  # JSON lines; None: rau_audit.jsonl in Serve's log folder

    def access(self) -> auth.Policy:
        return auth.Policy(keys_file=self.api_keys_file, max_sessions_per_key=self.max_sessions_per_key,
                           requests_per_minute_per_key=self.requests_per_minute_per_key,
                           cors_origins=tuple(self.cors_origins) if self.cors_origins else None,
                           audit_log=self.audit_log)

    def validate_access(self) -> None:
        if self.api_keys_file is None and not self.auth_off_on_loopback:
            raise ConfigError("serve args.api_keys_file is required: the file of hashed API keys (make it with `rau "
                              "keys add NAME --file PATH`); only a development app on 127.0.0.1 may run without keys "
                              "(auth_off_on_loopback: true, as serve_configs/local.yaml)")
        if self.api_keys_file is not None and not Path(self.api_keys_file).is_file():
            raise ConfigError(f"serve args.api_keys_file: {self.api_keys_file} does not exist (make it with `rau keys "
                              f"add NAME --file {self.api_keys_file}`)")
        if self.max_sessions_per_key < 1 or self.requests_per_minute_per_key < 1:
            raise ConfigError("serve args.max_sessions_per_key and requests_per_minute_per_key must be >= 1")
        for origin in self.cors_origins or ():
            if origin != "*" and not re.fullmatch(r"https?://[A-Za-z0-9.\-\[\]:]+", str(origin)):
                raise ConfigError(f"serve args.cors_origins: {origin!r} is not an origin (scheme://host[:port], no "
                                  "path) or '*'")

    def validate(self) -> None:
        self.validate_serving()
        self.validate_access()

    def validate_serving(self) -> None:
        if self.prompt_decoding not in ("segmenter", "ingress"):
            raise ConfigError(f"serve args.prompt_decoding must be 'segmenter' or 'ingress', not "
                              f"{self.prompt_decoding!r}")
        if self.ingress_embedding_cache < 1:
            raise ConfigError("serve args.ingress_embedding_cache must be >= 1")
        if not self.pacs_timeout_s > 0:
            raise ConfigError("serve args.pacs_timeout_s must be > 0")
        if self.command_llm_url is None:
            return
        if not self.command_llm_url.startswith(("http://", "https://")):
            raise ConfigError(f"serve args.command_llm_url must be an http(s) URL, not {self.command_llm_url!r}")
        if not self.command_llm_model:
            raise ConfigError("serve args.command_llm_model is required with command_llm_url (the model name the "
                              "chat completions server serves)")
        env = self.command_llm_api_key_env
        if env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,127}", env):
            raise ConfigError("serve args.command_llm_api_key_env is the NAME of an environment variable holding the "
                              "key (e.g. OPENAI_API_KEY), not the key itself; keep keys out of config files")
        if not self.command_llm_timeout_s > 0:
            raise ConfigError("serve args.command_llm_timeout_s must be > 0")


def build_app(args: dict | None = None):
    """The application builder of the Serve configs (``import_path: rau_ray.serve.app:build_app``, ``args:`` ->
    ``AppArgs``); Serve calls it with exactly one argument, the args dict, and applies the config's
    ``deployments:`` options itself."""
    return build_graph(args)


def pair_refusal(policy_checkpoint: str | None, segmenter_checkpoint: str | None) -> str | None:
    """Why a policy + segmenter checkpoint pair must not serve (``check_pair``'s error, naming both), else None.
    A checkpoint that cannot be read still fails the deployment as before (a DataError naming the file)."""
    if not (policy_checkpoint and segmenter_checkpoint):
        return None
    try:
        ckpt.check_pair(ckpt.read_checkpoint(policy_checkpoint),
                        ckpt.read_checkpoint(segmenter_checkpoint, kind="seg"))
    except ConfigError as e:
        return str(e)
    return None


def build_graph(args: dict | None = None, options: dict | None = None):
    """The Serve application: Ingress(Retriever, Policy, Segmenter, Commander). ``options``: per-deployment
    ``.options(...)`` (a Serve config's ``deployments:`` section does the same)."""
    # `serve run rau_ray.serve.app:build_app threads=4` hands every arg over as text: read each as its field's type
    a = from_dict(AppArgs, text_fields(AppArgs, dict(args or {})), "serve args")
    options = options or {}

    def opt(dep):
        o = options.get(dep.name)
        return dep.options(**o) if o else dep

    refused = pair_refusal(a.policy_checkpoint, a.segmenter_checkpoint)
    settings = Settings(session_ttl_s=a.session_ttl_s, max_sessions=a.max_sessions,
                        max_image_bytes=a.max_image_bytes, max_pixels=a.max_pixels, refusal=refused,
                        pacs_timeout_s=a.pacs_timeout_s, pacs_allowed_urls=a.pacs_allowed_urls, access=a.access())
    if refused:  # the Ingress alone, answering 503 with the reason: no model is loaded for an app that serves none
        return opt(Ingress).bind(None, None, None, None, settings, None)
    common = {"profile": a.profile, "policy_checkpoint": a.policy_checkpoint,
              "segmenter_checkpoint": a.segmenter_checkpoint, "device": a.device, "threads": a.threads}
    retriever = opt(Retriever).bind(bank_dir=a.bank_dir, **common)
    policy = opt(Policy).bind(max_batch_size=a.policy_batch_size, batch_wait_timeout_s=a.policy_batch_wait_s,
                              max_new_tokens=a.max_new_tokens, **common)
    segmenter = opt(Segmenter).bind(embedding_cache=a.embedding_cache, **common)
    commander = opt(Commander).bind(llm_url=a.command_llm_url, llm_model=a.command_llm_model,
                                    llm_api_key_env=a.command_llm_api_key_env, llm_timeout_s=a.command_llm_timeout_s)
    decoder = DecoderSpec(**common, capacity=a.ingress_embedding_cache) if a.prompt_decoding == "ingress" else None
    return opt(Ingress).bind(retriever, policy, segmenter, commander, settings, decoder)


def local_options(path: Path = LOCAL_CONFIG) -> tuple[dict, dict]:
    """(args, deployment options) of a Serve config file's first application."""
    if not path.is_file():
        return {}, {}
    conf = yaml.safe_load(path.read_text())
    application = conf["applications"][0]
    options = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in application.get("deployments", [])}
    return dict(application.get("args") or {}), options


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_config(conf: dict, where: str = "Serve config") -> None:
    """A Serve config (``serve_configs/*.yaml``, the RayService's ``serveConfigV2``): keys are on in each RAU
    application unless Serve listens on loopback only and the app says ``auth_off_on_loopback: true``; a
    ConfigError naming the field otherwise."""
    host = str((conf.get("http_options") or {}).get("host", "127.0.0.1"))
    for i, application in enumerate(conf.get("applications") or []):
        args = application.get("args") or {}
        if application.get("import_path") != "rau_ray.serve.app:build_app" or args.get("api_keys_file"):
            continue
        field = f"{where}: applications[{i}].args.api_keys_file"
        if not is_loopback(host):
            raise ConfigError(f"{field} is required: Serve listens on {host}, not loopback, so API keys must be on "
                              "(auth_off_on_loopback is for 127.0.0.1 only)")
        if str(args.get("auth_off_on_loopback")).lower() not in ("true", "1"):
            raise ConfigError(f"{field} is required (or auth_off_on_loopback: true, for a development app on "
                              "127.0.0.1 only)")


_STARTED: dict = {}


def start(profile: str = "tiny", route_prefix: str = "/", port: int = 8000, host: str = "127.0.0.1",
          name: str = "rau", timeout_s: float = 300.0, options: dict | None = None, **args) -> str:
    """Run the app on the Ray cluster this process is connected to (``ray_session.connect()`` if none) and wait
    until ``/readyz`` is 200; returns the base URL. Deployment options come from serve_configs/local.yaml, then
    ``options`` ({deployment name: {option: value}}); ``args`` are ``AppArgs`` fields. The file's checkpoints (the
    shipped pair) are a pair: a caller naming either checkpoint, or another profile, serves without them."""
    conf_args, conf_options = local_options()
    if "api_keys_file" in args:  # keys named: local.yaml's keys-off switch does not apply
        conf_args = {k: v for k, v in conf_args.items() if k != "auth_off_on_loopback"}
    if {"policy_checkpoint", "segmenter_checkpoint"} & set(args) or profile != conf_args.get("profile", profile):
        conf_args = {k: v for k, v in conf_args.items() if k not in ("policy_checkpoint", "segmenter_checkpoint")}
    merged_args = {**conf_args, "profile": profile, **args}
    if not is_loopback(host) and not merged_args.get("api_keys_file"):
        raise ConfigError(f"serve args.api_keys_file is required to serve on {host} (not loopback): without keys "
                          f"every route would be open to the network")
    ray_session.connect()
    merged = {k: dict(v) for k, v in conf_options.items()}
    for dep, o in (options or {}).items():
        merged[dep] = {**merged.get(dep, {}), **o}
    if "RAU_CACHE" in os.environ:  # replicas build/read the tiny models in the caller's cache
        for dep in ("Retriever", "Policy", "Segmenter", "Commander", "Ingress"):
            o = merged.setdefault(dep, {})
            rao = dict(o.get("ray_actor_options") or {})
            env = dict(rao.get("runtime_env") or {})
            env["env_vars"] = {**(env.get("env_vars") or {}), "RAU_CACHE": os.environ["RAU_CACHE"]}
            rao["runtime_env"] = env
            o["ray_actor_options"] = rao
    serve.start(http_options={"host": host, "port": int(port)})
    serve.run(build_graph(merged_args, merged), name=name, route_prefix=route_prefix,
              blocking=False)
    base = f"http://{host}:{port}{route_prefix.rstrip('/')}"
    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        try:
            with urllib.request.urlopen(base + "/readyz", timeout=10) as r:
                if r.status == 200:
                    break
        except urllib.error.HTTPError as e:  # 503: not every deployment answers yet, or a refused pair
            last = e.read().decode(errors="replace")[:2000]
            refused = _refusal_in(last)
            if refused:  # the app is up and answers 503 with the reason; the caller is told now, not at timeout
                raise ConfigError(f"the RAU app at {base} refuses to serve: {refused}") from None
        except Exception as e:  # noqa: BLE001 - not up yet
            last = repr(e)
        if time.monotonic() > deadline:
            raise TimeoutError(f"the RAU app did not become ready within {timeout_s:g} s at {base}: {last}")
        time.sleep(0.5)
    _STARTED.update(name=name, base=base)
    return base


def _refusal_in(body: str) -> str | None:
    """A /readyz 503 body's refusal (the pair check's reason), as opposed to deployments still starting."""
    try:
        answer = json.loads(body)
    except ValueError:
        return None
    return answer.get("error") if isinstance(answer, dict) and "deployments" not in answer else None


def stop() -> None:
    """Shut Serve down on this cluster (every application, the proxy, the controller)."""
    serve.shutdown()
    _STARTED.clear()
