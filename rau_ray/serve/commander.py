"""The Commander deployment: natural-language command -> the operations of ``rau_ray.commands``, or ``NotUnderstood``.

A module of its own, apart from the model deployments (``rau_ray.serve.deployments``): its replica imports the
parser and Ray Serve only, not torch, transformers or SAM2, so it starts in about a second instead of the model
replicas' eight (each Serve replica is a process of its own). Called by the Ingress through a ``DeploymentHandle``
(``rau_ray.serve.pipeline``); wired by ``rau_ray.serve.app``; usable in-process via ``Commander.func_or_class``.
"""

from __future__ import annotations

import os

from ray import serve

from rau_ray.commands import CommandError, OpenAICompatibleFallback, parse_command
from rau_ray.serve.messages import NotUnderstood


@serve.deployment(name="Commander", ray_actor_options={"num_cpus": 0.05}, max_ongoing_requests=64,
                  health_check_period_s=10)
class Commander:
    """Natural-language command -> the operations of ``rau_ray.commands`` (``NotUnderstood`` when it is none).

    With ``llm_url`` (AppArgs ``command_llm_url``), text the deterministic parser refuses goes to an
    OpenAI-compatible chat completions server (``OpenAICompatibleFallback``); its answer is only accepted when it
    validates against the operation schema and is grounded in the text, and text that looks hostile is never sent.
    The API key is read from the environment variable named ``llm_api_key_env`` in this replica's environment."""

    def __init__(self, llm_url: str | None = None, llm_model: str | None = None,
                 llm_api_key_env: str | None = None, llm_timeout_s: float = 10.0):
        self.fallback = None
        if llm_url:
            key = None
            if llm_api_key_env:
                key = os.environ.get(llm_api_key_env)
                if not key:
                    raise RuntimeError(f"command_llm_api_key_env names {llm_api_key_env!r}, but that environment "
                                       "variable is not set where the Commander replica runs (set it on the Ray "
                                       "nodes, e.g. from a Kubernetes Secret)")
            self.fallback = OpenAICompatibleFallback(llm_url, llm_model or "", api_key=key,
                                                     timeout=float(llm_timeout_s))

    def parse(self, text: str) -> list[dict] | NotUnderstood:
        try:
            return parse_command(text, fallback=self.fallback)
        except CommandError as e:
            return NotUnderstood(str(e))
        except Exception as e:  # noqa: BLE001 - a language model server misbehaving (a broken reply) is no 500
            if self.fallback is None:
                raise
            return NotUnderstood(f"not a command the parser reads, and the language model failed "
                                 f"({type(e).__name__}: {e})"[:500])

    def check_health(self) -> None:
        return None
