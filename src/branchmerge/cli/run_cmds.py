"""`generate` and `chat`: run a branch of a bundle from the terminal, streaming tokens."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from branchmerge.runtime.sampling import RowSettings


class _Stop:
    """A ``generate`` stopping criterion that ends every row once ``event`` is set (Ctrl-C)."""

    def __init__(self, event) -> None:
        self.event = event

    def __call__(self, input_ids, scores, **kw):
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _stream(bundle, branch: str, ids: list[int], max_new_tokens: int, settings: RowSettings, *,
            interruptible: bool = False, stop: list[str] | None = None, past=None,
            keep_cache: bool = False) -> tuple[str, object]:
    """Generate in a worker thread and echo its tokens as they come; returns the text and, with
    ``keep_cache``, the KV cache its row ended with (``past`` of a chat's next turn, which then prefills
    only the tokens it adds).

    With ``stop`` strings, generation ends at the first, which is not shown: text that may begin one is
    held back until it cannot. An error in the worker ends the stream and is raised here (the loop over
    the streamer would otherwise wait for ever). Ctrl-C stops the generation; with ``interruptible``
    (chat) the reply so far is returned, otherwise the interrupt is raised once the worker has stopped.
    """
    from branchmerge.runtime.text import HeldText

    import threading

    import torch
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    from branchmerge.runtime.sampling import RowSampler

    tok = bundle.tokenizer(branch)
    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    interrupt = threading.Event()
    stops = [x for x in stop or [] if x]
    result: list[str] = []
    failure: list[BaseException] = []
    sampler = RowSampler([settings], bundle.device)  # as the server samples each row

    def work() -> None:
        try:
            with torch.inference_mode():
                r = bundle.generate_ids([ids], [branch], max_new_tokens=max_new_tokens, streamer=streamer,
                                        stop=[stops], stopping_criteria=StoppingCriteriaList([_Stop(interrupt)]),
                                        row_sampler=sampler, past=[past], keep_cache=keep_cache)
            result.append(r[0])
        except BaseException as e:  # noqa: BLE001 - handed to the main thread, which raises it
            failure.append(e)
            streamer.end()

    t = threading.Thread(target=work, daemon=True)
    t.start()
    text, held = "", HeldText(stops)
    try:
        for piece in streamer:
            text += piece
            typer.echo(held.feed(text), nl=False)
        typer.echo(held.finish(), nl=False)
    except KeyboardInterrupt:
        if not interruptible:
            raise
        typer.secho(" [stopped]", nl=False, err=True, fg="yellow")
    finally:
        interrupt.set()
        t.join()
    typer.echo("")
    if failure:
        raise failure[0]
    return (result[0].text, result[0].cache) if result else ("", None)


def _load(bundle_dir: Path, routing: bool, loras: list[str] = (), lora_base: str | None = None,
          stack: ExitStack | None = None, chat_template: list[str] = (), max_model_len: int | None = None, **kw):
    """The bundle, with its router only when this command may route (a named branch needs none), the
    ``--lora NAME=PATH`` adapters loaded into it and the ``--chat-template`` set. With adapters, ``bundle_dir``
    may be a base model folder: it becomes a bundle in a temporary folder (removed when ``stack`` closes), as
    ``serve --lora-modules`` does."""
    from branchmerge.cli.serve_cmd import _lora_modules

    from branchmerge.cli.serve_cmd import chat_templates

    adapters = _lora_modules(loras, "--lora")
    templates = sorted(chat_templates(list(chat_template)).items(), key=lambda kv: kv[0] is not None)
    bundle = _open(bundle_dir, routing, adapters, lora_base, stack, **kw)
    bundle.max_model_len = max_model_len
    for branch, template in templates:  # (every branch's first, then each branch's own)
        bundle.set_chat_template(template, branch)
    return bundle


def _open(bundle_dir: Path, routing: bool, adapters: dict[str, str], lora_base: str | None, stack: ExitStack | None,
          **kw):
    from branchmerge.front import is_base_folder, open_base_front

    if is_base_folder(bundle_dir, adapters=bool(adapters)):
        return open_base_front(bundle_dir, stack, adapters=adapters, base_name=lora_base or "base", **kw).bundle
    if routing:
        import branchmerge

        bundle = branchmerge.load(bundle_dir, **kw)
    else:
        from branchmerge.runtime.bundle import load

        bundle = load(bundle_dir, **kw)
    for name, path in adapters.items():
        bundle.load_lora(name, path, base=lora_base)
    return bundle


_MAX_MODEL_LEN = typer.Option(None, "--max-model-len", min=2, help="At most this many tokens, prompt and answer "
                              "(default: the branch's context).")
_CHAT_TEMPLATE = typer.Option([], "--chat-template", metavar="[BRANCH=]TEMPLATE", help="Render the conversation with this chat template "
                               "instead of the tokenizer's: a .jinja file, a packaged one (chatml, llama3, alpaca, "
                               "mistral) or the template itself; BRANCH=... for one branch.")
_LORA = typer.Option([], "--lora", help="Load the PEFT LoRA adapter at PATH as branch NAME (NAME=PATH; repeat for "
                     "more), kept exactly, for this run only; BUNDLE may then be a base model folder.")
_LORA_BASE = typer.Option(None, "--lora-base", help="With --lora: the branch the adapters were trained on "
                          "(default: the bundle's one base; with a base model folder, its branch name).")


def _top_p(value: float | None) -> float | None:
    if value is not None and not 0.0 < value <= 1.0:
        raise typer.BadParameter(f"{value:g} is not in (0, 1]")
    return value


# sampling options of both `generate` and `chat` (the server's parameters of the same names); each left out
# is the branch's generation config's (what its model's creator set, as `serve --generation-config auto`), else
# greedy and no penalty
_DEFAULT = " [default: the branch's generation config's, else {}]"
_TEMPERATURE = typer.Option(None, "--temperature", "-t", min=0.0, help="0 = greedy." + _DEFAULT.format("0"),
                            show_default=False)
_TOP_P = typer.Option(None, "--top-p", callback=_top_p, show_default=False,
                      help="Nucleus sampling, in (0, 1]: keep the likeliest tokens up to this mass." + _DEFAULT.format("1"))
_TOP_K = typer.Option(None, "--top-k", min=0, show_default=False,
                      help="Sample from the k likeliest tokens only (0: all)." + _DEFAULT.format("0"))
_MIN_P = typer.Option(None, "--min-p", min=0.0, max=1.0, show_default=False,
                      help="Drop tokens less likely than this fraction of the likeliest." + _DEFAULT.format("0"))
_REPETITION_PENALTY = typer.Option(None, "--repetition-penalty", min=0.01, max=2.0, show_default=False,
                                   help="Logits of tokens already seen (prompt and answer) / this."
                                   + _DEFAULT.format("1"))


def _settings(bundle, branch: str, temperature, top_p, top_k, min_p, repetition_penalty, **kw):
    """A row's sampling settings: each option given, else the branch's generation config's, else none."""
    from branchmerge.runtime.sampling import RowSettings

    d = bundle.sampling_defaults(branch)
    pick = lambda v, k, none: v if v is not None else d.get(k, none)  # noqa: E731
    return RowSettings(pick(temperature, "temperature", 0.0), pick(top_p, "top_p", 1.0), pick(top_k, "top_k", 0),
                       pick(min_p, "min_p", 0.0), repetition_penalty=repetition_penalty, **kw)


def generate(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder."),
    prompt: str = typer.Argument(..., help="The prompt."),
    branch: str = typer.Option("auto", "--branch", "-b", help="Branch name, or 'auto' to route."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", "-n", min=1,
                                              help="Tokens to generate [default: 64, or what the context leaves]."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    repetition_penalty: float = _REPETITION_PENALTY,
    seed: int | None = typer.Option(None, "--seed", help="Sample reproducibly (with -t > 0); the server's `seed` "
                                    "gives the same text."),
    stop: list[str] = typer.Option([], "--stop", "-s", help="End the text where it first holds this string (not "
                                   "shown); repeat for several. \\n and \\t are a line break and a tab."),
    no_chat: bool = typer.Option(False, "--no-chat", help="Do not apply the chat template."),
    dtype: str | None = typer.Option(None, "--dtype", help="Compute dtype (default: the bundle's)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N."),
    pipeline: str | None = typer.Option(None, "--pipeline", "-p", help="Run a staged pipeline by name."),
    pipelines_file: Path | None = typer.Option(None, "--pipelines", help="Pipelines YAML (default: BUNDLE/pipelines.yaml)."),
    json_schema: Path | None = typer.Option(None, "--json-schema", help="The answer is JSON that follows this JSON "
                                            "schema file (structured outputs; also --regex, --choice, --grammar). "
                                            "With --pipeline, the last stage's answer follows it."),
    regex: str | None = typer.Option(None, "--regex", help="The answer matches this regular expression."),
    choice: list[str] = typer.Option([], "--choice", help="The answer is one of these; repeat for each."),
    grammar: Path | None = typer.Option(None, "--grammar", help="The answer follows this EBNF grammar file "
                                        "(root rule `root`, xgrammar's syntax)."),
    chat_template: list[str] = _CHAT_TEMPLATE,
    max_model_len: int | None = _MAX_MODEL_LEN,
    lora: list[str] = _LORA,
    lora_base: str | None = _LORA_BASE,
) -> None:
    """Generate from one branch (or the routed one), streaming tokens to stdout; or run a staged pipeline."""
    structure = _structure(json_schema, regex, choice, grammar)
    with ExitStack() as stack:
        bundle = _load(bundle_dir, branch == "auto" or pipeline is not None or pipelines_file is not None, lora,
                       lora_base, stack, chat_template, max_model_len, device=device, dtype=dtype)
        _generate(bundle, prompt, branch, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
                  stop, no_chat, pipeline, pipelines_file, structure)


def _generate(bundle, prompt, branch, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty, seed,
              stop, no_chat, pipeline, pipelines_file, structure) -> None:
    if pipeline is not None or pipelines_file is not None:
        from branchmerge.staged import answer, bundle_pipelines, load_pipelines

        pipes = load_pipelines(pipelines_file) if pipelines_file else bundle_pipelines(bundle)
        pipes.check_branches(bundle.branch_names)
        stages = answer(bundle, [prompt], pipeline=pipeline, branch=branch, max_tokens=max_new_tokens,
                        pipelines=pipes, structure=structure)[0]
        for s in stages:
            typer.secho(f"[stage {s.stage}: {s.branch}]", err=True, fg="cyan")
            typer.echo(s.text)
        return
    ids_list, names, mt = bundle.prepare([prompt], branch, chat=False if no_chat else None,
                                         max_new_tokens=max_new_tokens)
    if max_new_tokens is None and (own := bundle.sampling_defaults(names[0]).get("max_new_tokens")):
        mt = bundle.fit_max_new_tokens(ids_list, names, default=own)
    typer.secho(f"[branch: {names[0]}]", err=True, fg="cyan")
    _stream(bundle, names[0], ids_list[0], mt, _settings(bundle, names[0], temperature, top_p, top_k, min_p,
                                                         repetition_penalty, seed=seed, structure=structure),
            stop=[x.replace("\\n", "\n").replace("\\t", "\t") for x in stop])


def _structure(json_schema: Path | None, regex: str | None, choice: list[str], grammar: Path | None):
    """The answer's structure from ``generate``'s options (at most one), checked: a bad one fails here, before
    the bundle loads."""
    from branchmerge.runtime.structured import MAX_SPEC_CHARS, Structure

    given = [(n, v) for n, v in (("--json-schema", json_schema), ("--regex", regex), ("--choice", choice or None),
                                 ("--grammar", grammar)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise typer.BadParameter(f"give one of {', '.join(n for n, _ in given)}", param_hint=given[1][0])
    name, value = given[0]
    if isinstance(value, Path):
        if not value.is_file() or value.stat().st_size > MAX_SPEC_CHARS * 4:
            raise typer.BadParameter(f"{value} is not a file of at most {MAX_SPEC_CHARS:,} characters", param_hint=name)
        value = value.read_text(encoding="utf-8", errors="replace")
    st = (Structure("json", value, name) if name == "--json-schema" else Structure("regex", value, name)
          if name == "--regex" else Structure.choices(value, name) if name == "--choice" else
          Structure("grammar", value, name))
    return st.check()


def chat(
    bundle_dir: Path = typer.Argument(..., metavar="BUNDLE", help="Bundle folder."),
    branch: str = typer.Option("auto", "--branch", "-b", help="Branch name, or 'auto' to route each turn."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", "-n", min=1,
                                              help="Tokens per reply [default: 64, or what the context leaves]."),
    temperature: float = _TEMPERATURE,
    top_p: float = _TOP_P,
    top_k: int = _TOP_K,
    min_p: float = _MIN_P,
    repetition_penalty: float = _REPETITION_PENALTY,
    dtype: str | None = typer.Option(None, "--dtype"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    chat_template: list[str] = _CHAT_TEMPLATE,
    max_model_len: int | None = _MAX_MODEL_LEN,
    lora: list[str] = _LORA,
    lora_base: str | None = _LORA_BASE,
) -> None:
    """Interactive chat with a branch; Ctrl-C stops a reply, an empty line or Ctrl-D ends the chat."""
    with ExitStack() as stack:
        bundle = _load(bundle_dir, branch == "auto", lora, lora_base, stack, chat_template, max_model_len,
                       device=device, dtype=dtype)
        _chat(bundle, branch, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty)


def _chat(bundle, branch, max_new_tokens, temperature, top_p, top_k, min_p, repetition_penalty) -> None:
    from branchmerge.errors import BranchmergeError

    history: list[dict[str, str]] = []
    cache = None  # the last reply's KV cache: the next turn prefills only what it adds
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        name = bundle.resolve_branches([line], branch)[0]
        history.append({"role": "user", "content": line})
        try:
            ids = bundle.encode_messages(history, name)
            mt = bundle.fit_max_new_tokens([ids], [name], max_new_tokens,
                                           default=bundle.sampling_defaults(name).get("max_new_tokens"))
        except BranchmergeError as e:
            typer.secho(f"error: {e}", err=True, fg="red")
            history.clear()
            cache = None
            continue
        typer.secho(f"{name}> ", nl=False, fg="cyan")
        reply, cache = _stream(bundle, name, ids, mt, _settings(bundle, name, temperature, top_p, top_k, min_p,
                                                                repetition_penalty),
                               interruptible=True, past=cache, keep_cache=True)
        history.append({"role": "assistant", "content": reply})


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
