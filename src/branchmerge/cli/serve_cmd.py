"""`branchmerge serve` (an OpenAI-compatible server over a bundle) and `branchmerge gateway` (one in front of
other OpenAI-compatible servers)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _lora_modules(values: list[str], flag: str = "--lora-modules") -> dict[str, str]:
    """vLLM's ``--lora-modules`` values: ``NAME=PATH`` or ``{"name": ..., "path": ...}``."""
    out: dict[str, str] = {}
    for v in values:
        if v.lstrip().startswith("{"):
            try:
                d = json.loads(v)
                name, path = d["name"], d["path"]
            except (ValueError, KeyError, TypeError):
                raise typer.BadParameter(f'expected {{"name": ..., "path": ...}}, got {v!r}',
                                         param_hint=flag) from None
        else:
            name, _, path = v.partition("=")
        if not isinstance(name, str) or not isinstance(path, str) or not name or not path:
            raise typer.BadParameter(f"expected NAME=PATH, got {v!r}", param_hint=flag)
        if name in out:
            raise typer.BadParameter(f"{name!r} is given twice", param_hint=flag)
        out[name] = path
    return out


def chat_templates(values: list[str], flag: str = "--chat-template") -> dict[str | None, str]:
    """vLLM's ``--chat-template`` values, each ``VALUE`` (every branch) or ``BRANCH=VALUE``; a VALUE is a file, a
    packaged name or a template (:func:`~branchmerge.io.hf.chat_template_text`), read here, before loading."""
    from branchmerge.common import SAFE_NAME
    from branchmerge.errors import ConfigError
    from branchmerge.io.hf import chat_template_text

    out: dict[str | None, str] = {}
    for v in values:
        name, sep, rest = v.partition("=")
        branch, value = (name, rest) if sep and SAFE_NAME.match(name) and not Path(v).is_file() else (None, v)
        try:
            out[branch] = chat_template_text(value, flag)
        except ConfigError as e:
            raise typer.BadParameter(str(e).removeprefix(f"{flag}: "), param_hint=flag) from None
    return out


def _check_tls(keyfile: Path | None, certfile: Path | None) -> None:
    """Both TLS files or neither; each a readable file holding a PEM block (checked before the bundle loads)."""
    if (keyfile is None) != (certfile is None):
        raise typer.BadParameter("give --ssl-keyfile and --ssl-certfile together",
                                 param_hint="--ssl-keyfile" if keyfile is None else "--ssl-certfile")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path is None:
            continue
        try:
            head = path.read_bytes()[:1 << 16] if path.is_file() else None
        except OSError as e:
            raise typer.BadParameter(f"{path} cannot be read: {e.strerror}", param_hint=flag) from None
        if head is None or b"-----BEGIN " not in head:
            raise typer.BadParameter(f"{path} is not a PEM file", param_hint=flag)


def _generation_overrides(mode: str, text: str | None) -> dict | None:
    """``--generation-config`` checked and ``--override-generation-config``'s JSON read and checked, before the
    bundle loads."""
    from branchmerge.io.generation_config import SAMPLING_FIELDS, sampling_defaults
    from branchmerge.server.api import GENERATION_CONFIGS

    if mode not in GENERATION_CONFIGS:
        raise typer.BadParameter(f"one of {', '.join(GENERATION_CONFIGS)}, got {mode!r}",
                                 param_hint="--generation-config")
    if text is None:
        return None
    hint = "--override-generation-config"
    try:
        values = json.loads(text)
    except ValueError as e:
        raise typer.BadParameter(f"not JSON: {e}", param_hint=hint) from None
    if not isinstance(values, dict):
        raise typer.BadParameter(f"a JSON object, got {text!r}", param_hint=hint)
    unknown = sorted(set(values) - set(SAMPLING_FIELDS))
    if unknown:
        raise typer.BadParameter(f"{', '.join(map(repr, unknown))} cannot be overridden; it takes "
                                 f"{', '.join(SAMPLING_FIELDS)}", param_hint=hint)
    try:
        sampling_defaults(values, "the override")
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint=hint) from None
    return values


_ALLOWED_ORIGINS = typer.Option([], "--allowed-origins", metavar="ORIGIN", help="As vLLM: web pages from this "
                                "origin (https://app.example.com, or * for any) may call the API from a browser "
                                "(CORS); repeat for more, or give a JSON list. Default: none may.")
_SSL_KEYFILE = typer.Option(None, "--ssl-keyfile", help="Serve HTTPS with this private key (PEM), with "
                            "--ssl-certfile.")
_SSL_CERTFILE = typer.Option(None, "--ssl-certfile", help="Serve HTTPS with this certificate (PEM), with "
                             "--ssl-keyfile.")
_ROOT_PATH = typer.Option("", "--root-path", help="As vLLM: the path prefix a proxy serves this under (/llm).")


def _origins(values: list[str]) -> list[str]:
    """``--allowed-origins`` values: each an origin, or a JSON list of them (vLLM's form)."""
    out: list[str] = []
    for v in values:
        if v.strip().startswith("["):
            try:
                got = json.loads(v)
            except json.JSONDecodeError as e:
                raise typer.BadParameter(f"not a JSON list: {e.msg}", param_hint="--allowed-origins") from None
            if not isinstance(got, list) or not all(isinstance(x, str) for x in got):
                raise typer.BadParameter("a JSON list of strings", param_hint="--allowed-origins")
            out += got
        else:
            out.append(v)
    for o in out:
        if o != "*" and not (o.startswith(("http://", "https://")) and "/" not in o.split("://", 1)[1]):
            raise typer.BadParameter(f"{o!r} is not an origin (scheme://host[:port], no path) or *",
                                     param_hint="--allowed-origins")
    return out


def serve_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder (with --lora-modules: the base "
                                      "model's folder)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="BRANCHMERGE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics."),
    pipelines: Path | None = typer.Option(None, "--pipelines", help="Pipelines YAML (default: BUNDLE/pipelines.yaml)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most rows decoding together; requests join and leave a running batch "
                                   "(continuous batching; 1 = one at a time)."),
    wait_ms: float = typer.Option(10.0, "--batch-wait-ms", min=0, help="How long the first request waits for others."),
    max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", min=1, help="Largest max_tokens accepted."),
    max_prompts: int = typer.Option(64, "--max-prompts", min=1, help="Most prompts in one request."),
    max_choices: int = typer.Option(128, "--max-choices", min=1, help="Most prompts × n in one request."),
    max_stored_responses: int = typer.Option(1024, "--max-stored-responses", min=0, help="/v1/responses kept in "
                                             "memory for previous_response_id and GET (least recently used out "
                                             "first; 0: none)."),
    prefix_cache_tokens: int = typer.Option(8192, "--prefix-cache-tokens", min=0,
                                            help="Finished requests' KV caches kept, in tokens, for later requests "
                                            "that begin the same way (a chat's next turn, a shared system "
                                            "prompt): they prefill only what they add. 0: off."),
    tool_call_parser: str | None = typer.Option(None, "--tool-call-parser",
                                                help="tool_choice \"auto\" (the default with tools) answers "
                                                "freely and reads the calls out of the answer as tool_calls, in the "
                                                "model's format: hermes (<tool_call> blocks: Qwen2.5/Qwen3, Hermes), "
                                                "llama3_json (Llama 3.1/3.3), mistral ([TOOL_CALLS]), pythonic "
                                                "([f(a=1)]: Llama 3.2/4). Without: auto is refused; required and "
                                                "named functions work either way."),
    generation_config: str = typer.Option("auto", "--generation-config", help="As vLLM: 'auto' answers a request "
                                          "that leaves out temperature, top_p, top_k, min_p, repetition_penalty "
                                          "or max_tokens with its branch's generation config's (what the model's "
                                          "creator set); 'vllm' with the server's own (greedy, no penalty, 256 "
                                          "tokens)."),
    override_generation_config: str | None = typer.Option(None, "--override-generation-config",
                                                          help="As vLLM: JSON over those defaults for every "
                                                          "branch, e.g. '{\"temperature\": 0.5, "
                                                          "\"max_new_tokens\": 128}'."),
    chat_template: list[str] = typer.Option([], "--chat-template", metavar="[BRANCH=]TEMPLATE", help="As vLLM: render conversations with this "
                                            "chat template instead of the tokenizer's: a .jinja file, a packaged "
                                            "one (chatml, llama3, alpaca, mistral) or the template itself; "
                                            "BRANCH=... for one branch (repeat the flag for more)."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=2, help="As vLLM: at most this many "
                                             "tokens per request, prompt and answer (default: each branch's "
                                             "context); bounds one request's KV cache and prefill."),
    enable_auto_tool_choice: bool = typer.Option(False, "--enable-auto-tool-choice", help="As vLLM (which needs "
                                                 "it with --tool-call-parser): accepted; --tool-call-parser "
                                                 "alone turns tool_choice \"auto\" on."),
    ssl_keyfile: Path | None = _SSL_KEYFILE,
    ssl_certfile: Path | None = _SSL_CERTFILE,
    allowed_origins: list[str] = _ALLOWED_ORIGINS,
    root_path: str = _ROOT_PATH,
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype: float32, bf16, fp16 (default: the bundle's)."),
    lora_modules: list[str] = typer.Option([], "--lora-modules", help="As vLLM: serve BUNDLE, a base model folder, "
                                           "with the PEFT LoRA adapter at PATH as model NAME (NAME=PATH or "
                                           "{\"name\": ..., \"path\": ...}; repeat the flag for more), each "
                                           "kept exactly: loaded into the base in a temporary bundle (merged "
                                           "with it, for DoRA and modules_to_save), removed at exit."),
    served_model_name: list[str] = typer.Option([], "--served-model-name", metavar="NAME[=MODEL]", help="As vLLM: "
                                                "another name requests may use (repeat the flag for more). NAME "
                                                "alone stands for auto (a bundle with a router) or the one model "
                                                "served; NAME=MODEL for a branch, pipeline or auto. With "
                                                "--lora-modules or --lora-dir over a base folder, the first NAME "
                                                "names the base (default: base)."),
    lora_dir: Path | None = typer.Option(None, "--lora-dir", help="Turn on vLLM's POST /v1/load_lora_adapter and "
                                         "/v1/unload_lora_adapter: clients load PEFT LoRA adapters from inside "
                                         "this folder (links resolved; nothing outside it) as new models, kept "
                                         "exactly, in memory only. BUNDLE may be a base model folder."),
    max_loras: int = typer.Option(8, "--max-loras", min=1, help="With --lora-dir: most adapters loaded at once."),
    max_lora_rank: int = typer.Option(64, "--max-lora-rank", min=1, help="With --lora-dir: largest LoRA rank "
                                      "accepted."),
    lora_base: str | None = typer.Option(None, "--lora-base", help="With --lora-dir: the branch adapters are "
                                         "loaded over (default: the bundle's one base branch)."),
    lora_on_demand: bool = typer.Option(False, "--lora-on-demand", help="With --lora-dir: a request whose model "
                                        "is a folder of DIR holding an adapter loads it first (vLLM's filesystem "
                                        "LoRA resolver); when --max-loras are loaded, the least recently used idle "
                                        "one is unloaded."),
) -> None:
    """Serve GET /v1/models, POST /v1/chat/completions, /v1/completions and /v1/responses (streaming too),
    /health and /metrics (Prometheus).

    Every request is bounded (max_tokens, prompts, prompts × n, characters, body size) and the engine
    takes turns between requests; a client that disconnects stops its generation.
    """
    from branchmerge.server import ServerLimits, serve
    from branchmerge.server.tools import PARSERS
    from branchmerge.staged import load_pipelines

    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise typer.BadParameter(f"one of {', '.join(PARSERS)}, got {tool_call_parser!r}",
                                 param_hint="--tool-call-parser")

    if enable_auto_tool_choice and tool_call_parser is None:
        raise typer.BadParameter("needs --tool-call-parser (the format to read calls in)",
                                 param_hint="--enable-auto-tool-choice")
    _check_tls(ssl_keyfile, ssl_certfile)
    overrides = _generation_overrides(generation_config, override_generation_config)
    templates = chat_templates(chat_template)
    adapters = _lora_modules(lora_modules)
    limits = ServerLimits(max_tokens=max_tokens_limit, max_prompts=max_prompts, max_choices=max_choices,
                          max_stored_responses=max_stored_responses)
    pipes = load_pipelines(pipelines) if pipelines is not None else None
    kw = dict(host=host, port=port, api_key=api_key, max_batch=max_batch, wait_ms=wait_ms, device=device, dtype=dtype,
              pipelines=pipes, limits=limits, prefix_cache_tokens=prefix_cache_tokens,
              tool_call_parser=tool_call_parser, lora_dir=lora_dir, max_loras=max_loras, max_lora_rank=max_lora_rank,
              lora_base=lora_base, lora_on_demand=lora_on_demand, generation_config=generation_config,
              override_generation_config=overrides, chat_templates=templates, max_model_len=max_model_len,
              ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile, allowed_origins=_origins(allowed_origins),
              root_path=root_path, served_model_names=served_model_name)
    if lora_on_demand and lora_dir is None:
        raise typer.BadParameter("needs --lora-dir", param_hint="--lora-on-demand")
    from branchmerge.front import is_base_folder

    # a base model folder (with --lora-modules or --lora-dir: any folder not a bundle), served as a bundle of its
    # own in a temporary folder
    if not is_base_folder(bundle_dir, adapters=bool(adapters) or lora_dir is not None):
        return serve(str(bundle_dir), **kw)  # (a bundle; or a folder that is neither: its error says why)
    plain = [n for n in served_model_name if "=" not in n]
    base_name = plain[0] if plain else "base"  # (over a base folder, the first bare name is the base's own)
    kw["served_model_names"] = [n if "=" in n else f"{n}={base_name}" for n in served_model_name if n != base_name]
    if lora_base is None:
        kw["lora_base"] = base_name
    import signal
    import sys
    from contextlib import ExitStack

    from branchmerge.front import open_base_front

    # uvicorn re-raises the SIGTERM that stopped it once it has shut down: exit through Python then, so the
    # temporary bundle is removed (SIGTERM's default action would end the process without cleanup)
    prev = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        with ExitStack() as stack:
            serve(open_base_front(bundle_dir, stack, adapters=adapters, base_name=base_name, device=device,
                                  dtype=dtype, pipelines=pipes), **kw)
    finally:
        signal.signal(signal.SIGTERM, prev)


def gateway_cmd(
    config: Path = typer.Argument(..., metavar="GATEWAY_YAML", help="Upstreams, branch → upstream, router, pipelines."),
    host: str = typer.Option("127.0.0.1", "--host", help="Bind address (loopback by default)."),
    port: int = typer.Option(8080, "--port", min=0, max=65535, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="BRANCHMERGE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1/* and /metrics."),
    ssl_keyfile: Path | None = _SSL_KEYFILE,
    ssl_certfile: Path | None = _SSL_CERTFILE,
    allowed_origins: list[str] = _ALLOWED_ORIGINS,
    root_path: str = _ROOT_PATH,
) -> None:
    """An OpenAI-compatible gateway in front of OpenAI-compatible backends (vLLM, branchmerge serve): each branch
    maps to an upstream, `auto` routes with a bundle's stored router, pipelines run their stages across
    upstreams, streaming passes through, /health probes every upstream. `branchmerge export-vllm` writes a
    gateway.yaml for its vLLM server."""
    from branchmerge.server.gateway import gateway

    _check_tls(ssl_keyfile, ssl_certfile)
    gateway(config, host=host, port=port, api_key=api_key, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile,
            allowed_origins=_origins(allowed_origins), root_path=root_path)


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
    app.command("gateway")(gateway_cmd)
