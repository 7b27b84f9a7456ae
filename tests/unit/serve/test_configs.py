"""serve_configs/*.yaml are valid Serve configs naming every deployment with its own scaling, resources and health
check, and their args build the application graph; the Commander's LLM fallback args are checked (a key is never
accepted where the NAME of its environment variable belongs)."""

from pathlib import Path

import pytest
import yaml

CONFIGS = Path(__file__).resolve().parents[3] / "serve_configs"
DEPLOYMENTS = {"Ingress", "Retriever", "Policy", "Segmenter", "Commander"}


@pytest.mark.parametrize("name", ["local.yaml", "gpu.yaml"])
def test_serve_config(name):
    from ray.serve.schema import ServeDeploySchema

    conf = yaml.safe_load((CONFIGS / name).read_text())
    ServeDeploySchema.model_validate(conf) if hasattr(ServeDeploySchema, "model_validate") else \
        ServeDeploySchema.parse_obj(conf)
    app = conf["applications"][0]
    assert app["import_path"] == "rau_ray.serve.app:build_app"
    deps = {d["name"]: d for d in app["deployments"]}
    assert set(deps) == DEPLOYMENTS
    for d in deps.values():
        a = d["autoscaling_config"]
        assert 1 <= a["min_replicas"] <= a["max_replicas"] and a["target_ongoing_requests"] > 0
        assert d["max_ongoing_requests"] >= 1 and d["ray_actor_options"]["num_cpus"] > 0
        assert d["health_check_period_s"] > 0
    assert deps["Ingress"]["autoscaling_config"]["max_replicas"] == 1  # sessions live in the Ingress
    if name == "gpu.yaml":
        assert deps["Policy"]["ray_actor_options"]["num_gpus"] == 1
        assert 0 < deps["Segmenter"]["ray_actor_options"]["num_gpus"] < 1
    else:
        assert all("num_gpus" not in d["ray_actor_options"] for d in deps.values())


def test_build_app_args():
    import inspect

    from rau_ray.errors import ConfigError
    from rau_ray.serve.app import build_app, build_graph, local_options

    # Serve calls a config's builder with exactly one argument (the args); it refuses any other signature
    assert len(inspect.signature(build_app).parameters) == 1
    args, options = local_options(CONFIGS / "local.yaml")
    assert build_app(args) is not None and build_graph(args, options) is not None
    with pytest.raises(ConfigError, match="unknown field"):
        build_app({"profile": "tiny", "nope": 1})
    assert args["prompt_decoding"] == "ingress"  # CPU: clicks decoded next to the sessions (no hop per click)
    with pytest.raises(ConfigError, match="prompt_decoding must be 'segmenter' or 'ingress'"):
        build_app({"prompt_decoding": "browser"})
    with pytest.raises(ConfigError, match="ingress_embedding_cache"):
        build_app({"prompt_decoding": "ingress", "ingress_embedding_cache": 0})


def test_serve_run_text_args_take_their_types():
    """`serve run rau_ray.serve.app:build_app threads=4 ...` hands every arg over as text."""
    from rau_ray.errors import ConfigError
    from rau_ray.serve.app import build_app

    app = build_app({"threads": "4", "bank_dir": "null", "policy_batch_wait_s": "0.02", "max_sessions": "8",
                     "prompt_decoding": "ingress", "auth_off_on_loopback": "true"})
    retriever = app._bound_deployment.init_args[0]._bound_deployment  # Ingress(retriever, policy, ...)
    assert retriever.init_kwargs["threads"] == 4 and retriever.init_kwargs["bank_dir"] is None
    with pytest.raises(ConfigError, match=r"serve args.threads: '4x' matches none of"):
        build_app({"threads": "4x"})


def test_command_llm_args():
    from rau_ray.errors import ConfigError
    from rau_ray.serve.app import build_app

    ok = {"command_llm_url": "http://127.0.0.1:8080", "command_llm_model": "m",
          "command_llm_api_key_env": "RAU_COMMAND_LLM_KEY", "command_llm_timeout_s": 5, "auth_off_on_loopback": True}
    assert build_app(ok) is not None
    for bad, words in [({"command_llm_url": "ftp://x", "command_llm_model": "m"}, "http"),
                       ({"command_llm_url": "http://x"}, "command_llm_model"),
                       ({**ok, "command_llm_api_key_env": "sk-live-0123456789abcdef"}, "NAME of an environment"),
                       ({**ok, "command_llm_timeout_s": 0}, "timeout")]:
        with pytest.raises(ConfigError, match=words):
            build_app(bad)
