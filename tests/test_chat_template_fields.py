"""vLLM's chat-template fields of a chat request (and of ``/tokenize``): ``continue_final_message`` (the answer
goes on from the assistant's last message), ``add_generation_prompt`` and ``chat_template_kwargs`` (variables
such as ``enable_thinking``); and the ones this server does not take (a request's own ``chat_template``,
``documents``, chat ``echo``) refused by name instead of ignored."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

import branchmerge
from branchmerge.config import load_config
from branchmerge.merge import run_merge
from branchmerge.server import create_app
from tests.conftest import make_finetune, make_tiny_llama, save_char_tokenizer, write_config
from tests.serving import serving

# b's template reads a variable, as Qwen3's reads enable_thinking, and renders only the users' messages
THINKING = ("{% for m in messages %}{% if m['role'] == 'user' %}u:{{ m['content'] }}\n{% endif %}{% endfor %}"
            "{% if enable_thinking is defined and not enable_thinking %}/no_think\n{% endif %}"
            "{% if add_generation_prompt %}a:{% endif %}")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("chatfields")
    base = make_tiny_llama(root / "base", seed=0)
    for n, seed in (("a", 1), ("b", 2)):
        make_finetune(base, root / n, seed=seed)
        tok = save_char_tokenizer(root / n, chat=True)
    tok.chat_template = THINKING
    tok.save_pretrained(root / "b")
    cfg = write_config(root / "c.yaml", [{"name": n, "model": str(root / n)} for n in "ab"], compress_rate=0.0)
    run_merge(load_config(cfg), root / "bundle", progress=False)
    bundle = branchmerge.load(root / "bundle", dtype="float32")
    with serving(create_app(bundle, max_batch=4, wait_ms=5)) as url:
        yield {"url": url, "root": root, "bundle": bundle}


def _tokenize(url: str, **body) -> httpx.Response:
    return httpx.post(url + "/tokenize", json=body, timeout=60)


CONVERSATION = [{"role": "user", "content": "rev abc="}, {"role": "assistant", "content": "cb"}]


def test_the_answer_continues_the_assistants_last_message(served):
    """With continue_final_message the prompt is the conversation as transformers renders it with that flag
    (the assistant's turn left open after "cb", no new turn opened), /tokenize gives the same ids, and the
    answer is the one a completion of those ids gets."""
    url, root = served["url"], served["root"]
    want = AutoTokenizer.from_pretrained(root / "a").apply_chat_template(
        CONVERSATION, continue_final_message=True, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    r = _tokenize(url, model="a", messages=CONVERSATION, continue_final_message=True, add_generation_prompt=False)
    assert r.status_code == 200 and r.json()["tokens"] == want
    tok = AutoTokenizer.from_pretrained(root / "a")
    opened = _tokenize(url, model="a", messages=CONVERSATION).json()["tokens"]
    # (the character tokenizer reads a line break as <pad>)
    assert tok.decode(want).endswith("a:cb") and tok.decode(opened) == tok.decode(want) + "<pad>a:"
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    chat = c.chat.completions.create(model="a", messages=CONVERSATION, max_tokens=6, temperature=0,
                                     extra_body={"continue_final_message": True, "add_generation_prompt": False})
    done = c.completions.create(model="a", prompt=want, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == done.choices[0].text and chat.usage.prompt_tokens == len(want)
    # vLLM needs add_generation_prompt false too; here its default gives way (a client may send the flag alone)
    alone = c.chat.completions.create(model="a", messages=CONVERSATION, max_tokens=6, temperature=0,
                                      extra_body={"continue_final_message": True})
    assert alone.choices[0].message.content == done.choices[0].text


def test_template_variables_reach_the_template(served):
    """chat_template_kwargs {"enable_thinking": false} renders b's /no_think line (as Qwen3's template), in
    /tokenize and in the chat's prompt; add_generation_prompt false leaves the answer's turn unopened."""
    url = served["url"]
    msgs = [{"role": "user", "content": "key ab="}]
    plain = _tokenize(url, model="b", messages=msgs, return_token_strs=True).json()
    off = _tokenize(url, model="b", messages=msgs, chat_template_kwargs={"enable_thinking": False},
                    return_token_strs=True).json()
    assert "".join(plain["token_strs"]) == "u:key ab=<pad>a:"  # (a line break reads as <pad>)
    assert "/no_think" not in "".join(plain["token_strs"]) and "/no_think" in "".join(off["token_strs"])
    bare = _tokenize(url, model="b", messages=msgs, add_generation_prompt=False, return_token_strs=True).json()
    assert bare["tokens"] == plain["tokens"][:-2]  # (without "a:")
    c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
    got = c.chat.completions.create(model="b", messages=msgs, max_tokens=4, temperature=0,
                                    extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert got.usage.prompt_tokens == off["count"] == plain["count"] + len("/no_think\n")


@pytest.mark.parametrize("extra, message", [
    ({"chat_template_kwargs": {"tokenize": False}}, "cannot set 'tokenize' \\(a field of the request itself\\)"),
    ({"chat_template_kwargs": {"messages": []}}, "cannot set 'messages'"),
    ({"chat_template_kwargs": {"__class__": 1}}, "cannot set '__class__': variables are identifiers"),
    ({"chat_template_kwargs": {f"v{i}": i for i in range(33)}}, "at most 32 variables"),
    ({"chat_template_kwargs": {"v": "x" * 5000}}, "4096 characters"),
    ({"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true"),
    ({"continue_final_message": True, "messages": [{"role": "user", "content": "rev ab="}]},
     "needs the last message to be the assistant's"),
    ({"chat_template": "{{ messages }}"}, "`chat_template` is not supported"),
    ({"documents": [{"text": "x"}]}, "`documents` is not supported"),
    ({"echo": True}, "`echo` is not supported"),
])
def test_bad_template_fields_are_refused_by_name(served, extra, message):
    body = {"model": "a", "messages": CONVERSATION, "max_tokens": 2, **extra}
    r = httpx.post(served["url"] + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and __import__("re").search(message, r.text), r.text


def test_a_template_that_drops_the_last_message_cannot_continue_it(served):
    """b's template renders only the users' messages: continuing the assistant's is a 400 that says so, at
    /v1/chat/completions and /tokenize, not an answer to another prompt."""
    body = {"model": "b", "messages": CONVERSATION, "continue_final_message": True, "add_generation_prompt": False}
    r = httpx.post(served["url"] + "/v1/chat/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 400 and "cannot continue the last message" in r.text, r.text
    r = _tokenize(served["url"], **body)
    assert r.status_code == 400 and "cannot continue the last message" in r.text, r.text


def test_the_library_takes_the_same_options(served):
    b: branchmerge.Bundle = served["bundle"]
    tok = AutoTokenizer.from_pretrained(Path(served["root"]) / "b")
    want = tok.apply_chat_template([{"role": "user", "content": "ab"}], add_generation_prompt=True,
                                   enable_thinking=False, tokenize=True)
    want = list(want["input_ids"] if hasattr(want, "keys") else want)
    assert b.encode_messages([{"role": "user", "content": "ab"}], "b",
                             template_kwargs={"enable_thinking": False}) == want


def test_a_chat_template_given_at_start_replaces_the_tokenizers(served, tmp_path, capsys):
    """vLLM's --chat-template: set for one branch or every one (Bundle.set_chat_template), rendered as
    transformers renders that template; a template that cannot render a conversation is refused naming the
    branch, and nothing changes. The CLI takes a file, a packaged name or the template, BRANCH=... for one."""
    from branchmerge.errors import BranchNotFoundError, ConfigError
    from tests.cli_util import run_cli

    root = Path(served["root"])
    b = branchmerge.load(root / "bundle", dtype="float32")
    msgs = [{"role": "user", "content": "ab"}]
    before = {n: b.encode_messages(msgs, n) for n in "ab"}
    b.set_chat_template(THINKING, "a")
    assert b.encode_messages(msgs, "a") == before["b"] and b.encode_messages(msgs, "b") == before["b"]
    with pytest.raises(ConfigError, match="the chat template given for branch 'a' refused these messages"):
        b.set_chat_template("{{ raise_exception('no template here') }}")
    with pytest.raises(ConfigError, match="branch 'a'"):
        b.set_chat_template("{% if %}")
    assert b.encode_messages(msgs, "a") == before["b"]  # (unchanged by the refused ones)
    with pytest.raises(BranchNotFoundError):
        b.set_chat_template(THINKING, "nope")
    chatml = b.tokenizer("a").chat_template
    b.set_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")  # every branch
    assert b.encode_messages(msgs, "a") == b.encode_messages(msgs, "b") == b.tokenizer("a")("ab")["input_ids"]
    assert chatml != b.tokenizer("a").chat_template
    bundle = root / "bundle"
    (tmp_path / "t.jinja").write_text("{{ raise_exception('from the file') }}")
    for args, code_ok, said in (
            (["--chat-template", str(tmp_path / "t.jinja")], False, "from the file"),
            (["--chat-template", "b=" + str(tmp_path / "t.jinja")], False, "branch 'b'"),
            (["--chat-template", "{{ raise_exception('inline') }}"], False, "inline"),
            (["--chat-template", "nosuch"], False, "'nosuch' is not a file, a packaged template (alpaca, chatml"),
            (["--chat-template", "chatml"], True, ""),
            (["--chat-template", "a=chatml"], True, "")):
        code, out, err = run_cli(capsys, "generate", bundle, "rev ab=", "--branch", "a", "-n", "2", *args)
        assert (code == 0) == code_ok and said in " ".join(err.split()), (args, err)
    code, _, err = run_cli(capsys, "serve", bundle, "--chat-template", "nosuch")
    assert code != 0 and "is not a file" in " ".join(err.split())
