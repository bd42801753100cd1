"""`branchmerge run-batch`: OpenAI's batch file format answered offline (vLLM's ``run_batch``)."""

from __future__ import annotations

from pathlib import Path

import typer

from branchmerge.cli.serve_cmd import _generation_overrides, chat_templates


def run_batch_cmd(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder."),
    input_file: Path = typer.Option(..., "--input-file", "-i", help="JSONL of requests, one per line: "
                                    "{\"custom_id\", \"method\": \"POST\", \"url\": \"/v1/chat/completions\" | "
                                    "\"/v1/completions\" | \"/v1/responses\", \"body\": {...}}."),
    output_file: Path = typer.Option(..., "--output-file", "-o", help="JSONL of responses, one per input line, "
                                     "in input order (written whole at the end)."),
    pipelines: Path | None = typer.Option(None, "--pipelines", help="Pipelines YAML (default: BUNDLE/pipelines.yaml)."),
    max_batch: int = typer.Option(16, "--max-batch", min=1, help="Most rows decoding together."),
    max_in_flight: int = typer.Option(256, "--max-in-flight", min=1, help="Most requests read and running at once "
                                      "(memory stays bounded on any file)."),
    max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", min=1, help="Largest max_tokens accepted."),
    tool_call_parser: str | None = typer.Option(None, "--tool-call-parser", help="As serve: tool_choice \"auto\" "
                                                "reads calls out of free answers in this format."),
    generation_config: str = typer.Option("auto", "--generation-config", help="As serve: 'auto' (each branch's "
                                          "generation config's sampling defaults) or 'vllm' (greedy, 256 tokens)."),
    override_generation_config: str | None = typer.Option(None, "--override-generation-config",
                                                          help="As serve: JSON over those defaults."),
    chat_template: list[str] = typer.Option([], "--chat-template", metavar="[BRANCH=]TEMPLATE",
                                            help="As serve: another chat template, for every branch or one."),
    max_model_len: int | None = typer.Option(None, "--max-model-len", min=2, help="As serve: tokens per request "
                                             "at most."),
    served_model_name: list[str] = typer.Option([], "--served-model-name", metavar="NAME[=MODEL]", help="As serve: "
                                                "another name requests may use for a model (repeat the flag)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype: float32, bf16, fp16 (default: the bundle's)."),
) -> None:
    """Answer a JSONL file of OpenAI requests offline, as vLLM's run_batch: every line through the same path
    as `serve` (routing with model "auto", pipelines, mixed-branch batches, tools, structured outputs,
    limits), without a server. Each output line is {"id", "custom_id", "response": {"status_code",
    "request_id", "body"}, "error"}: a request the server would refuse gets its 4xx and OpenAI's error body;
    a line that is not a request (bad JSON, no custom_id, another url) gets "error" naming the line. The
    output is written to a temporary file and renamed at the end; the exit status is 0 when every line was
    read, whatever the answers."""
    from contextlib import ExitStack

    from branchmerge.front import is_base_folder, open_base_front, open_front
    from branchmerge.server import ServerLimits
    from branchmerge.server.batch import run_batch_file
    from branchmerge.server.tools import PARSERS
    from branchmerge.staged import load_pipelines

    if tool_call_parser is not None and tool_call_parser not in PARSERS:
        raise typer.BadParameter(f"one of {', '.join(PARSERS)}, got {tool_call_parser!r}",
                                 param_hint="--tool-call-parser")
    if not input_file.is_file():
        raise typer.BadParameter(f"{input_file} is not a file", param_hint="--input-file")
    overrides = _generation_overrides(generation_config, override_generation_config)
    templates = chat_templates(chat_template)
    pipes = load_pipelines(pipelines) if pipelines is not None else None
    with ExitStack() as stack:
        if is_base_folder(bundle_dir):  # a plain HF folder: a bundle of one branch, `base`, in a temporary folder
            front = open_base_front(bundle_dir, stack, device=device, dtype=dtype, pipelines=pipes)
        else:
            front = open_front(str(bundle_dir), device=device, dtype=dtype, pipelines=pipes)
        if max_model_len is not None:
            front.bundle.max_model_len = max_model_len
        for branch, template in sorted(templates.items(), key=lambda kv: kv[0] is not None):
            front.bundle.set_chat_template(template, branch)
        counts = run_batch_file(front, input_file, output_file, max_batch=max_batch, max_in_flight=max_in_flight,
                                limits=ServerLimits(max_tokens=max_tokens_limit), tool_call_parser=tool_call_parser,
                                generation_config=generation_config, override_generation_config=overrides,
                                served_model_names=served_model_name)
    typer.echo(f"wrote {output_file}: {counts['lines']} requests, {counts['succeeded']} succeeded, "
               f"{counts['failed']} failed")


def register(app: typer.Typer) -> None:
    app.command("run-batch")(run_batch_cmd)
