"""Each branch's sampling defaults, as vLLM's ``--generation-config auto``: what a model's creator set in its
generation config (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) answers a request
that leaves the setting out; a request's own value replaces the branch's, never stacks on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

import branchmerge
from branchmerge.config import load_config
from branchmerge.errors import BundleError
from branchmerge.merge import run_merge
from branchmerge.io.generation_config import sampling_defaults
from branchmerge.runtime.sampling import RowSampler, RowSettings
from branchmerge.server import create_app
from tests.cli_util import run_cli
from tests.conftest import make_finetune, make_tiny_llama, save_char_tokenizer, write_config
from tests.serving import serving

# what a's creator set; b's generation config sets nothing of sampling
A_DEFAULTS = {"do_sample": True, "temperature": 1.7, "top_p": 0.95, "top_k": 30, "repetition_penalty": 2.0,
              "max_new_tokens": 7}


def _merge(root: Path, a_config: dict) -> Path:
    base = make_tiny_llama(root / "base", seed=0)
    for n, seed in (("a", 1), ("b", 2)):
        make_finetune(base, root / n, seed=seed)
        save_char_tokenizer(root / n)
    gc = json.loads((root / "a" / "generation_config.json").read_text())
    (root / "a" / "generation_config.json").write_text(json.dumps({**gc, **a_config}))
    cfg = write_config(root / "c.yaml", [{"name": n, "model": str(root / n)} for n in "ab"], compress_rate=0.0)
    run_merge(load_config(cfg), root / "bundle", progress=False)
    return root / "bundle"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gendefaults")
    return {"root": root, "bundle": branchmerge.load(_merge(root, A_DEFAULTS), dtype="float32")}


def test_the_defaults_are_what_the_config_sets_checked():
    assert sampling_defaults(GenerationConfig(temperature=0.6, top_p=0.9, do_sample=True).to_diff_dict(), "x") == \
        {"temperature": 0.6, "top_p": 0.9}
    assert sampling_defaults({"do_sample": True}, "x") == {"temperature": 1.0}  # (transformers samples at 1.0)
    assert sampling_defaults({"top_k": -1, "max_new_tokens": 32.0, "bos_token_id": 1}, "x") == \
        {"top_k": 0, "max_new_tokens": 32}
    for field, value, rule in (("top_p", 0, r"\(0, 1\]"), ("temperature", -1, ">= 0"), ("max_new_tokens", 2.5, "integer"),
                               ("min_p", 1.5, r"\[0, 1\]"), ("repetition_penalty", 0, "> 0"), ("top_k", True, "integer"),
                               ("temperature", "hot", ">= 0"), ("temperature", math.nan, ">= 0")):
        with pytest.raises(ValueError, match=rf"branch 'a': {field} is .*; it must be .*{rule}"):
            sampling_defaults({field: value}, "branch 'a'")
    # what a config sets is a default even where it equals transformers' own (it is the creator's choice)
    assert sampling_defaults(GenerationConfig(temperature=1.0, top_k=50).to_diff_dict(), "x") == \
        {"temperature": 1.0, "top_k": 50}


def _own_generate(folder: Path, prompt: list[int], **kw) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def test_a_rows_repetition_penalty_replaces_its_branchs(made):
    """a's generation config penalizes repeats (2.0). A row that leaves the penalty out gets a's; one that sets
    it gets its own instead (1.0: none, as a's model's ``generate(repetition_penalty=1.0)``), alone and with the
    other kind of row in one call. Before, a request's penalty was applied on top of the branch's."""
    b, root = made["bundle"], made["root"]
    p = [1, 12, 12, 12, 12]
    want = {rp: _own_generate(root / "a", p, **({} if rp is None else {"repetition_penalty": rp}))
            for rp in (None, 1.0, 1.1)}
    assert len({tuple(w) for w in want.values()}) == 3  # (each penalty changes a's answer)
    rows = [RowSettings(repetition_penalty=rp) for rp in want]
    alone = [b.generate_ids([p], ["a"], max_new_tokens=12, row_sampler=RowSampler([r]))[0].new_ids for r in rows]
    assert alone == list(want.values())
    together = b.generate_ids([p] * 3, ["a"] * 3, max_new_tokens=12, row_sampler=RowSampler(rows))
    assert [o.new_ids for o in together] == list(want.values())
    assert b.sampling_defaults("a") == {k: v for k, v in A_DEFAULTS.items() if k != "do_sample"}
    assert b.sampling_defaults("b") == {}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)


def _answer(c: openai.OpenAI, model: str, prompt: str = "rev abc=", **kw) -> tuple[str, int]:
    out = c.completions.create(model=model, prompt=prompt, **kw)
    return out.choices[0].text, out.usage.completion_tokens


def test_the_server_answers_with_each_branchs_defaults(made):
    """Through the openai SDK: a request to a without settings samples as one that sends a's settings
    explicitly (same seed, same text; 7 tokens at most); a request to b without them is greedy; a request's own
    temperature wins. ``--generation-config vllm`` ignores a's (greedy, no penalty), and an override applies to
    every branch over either."""
    b = made["bundle"]
    explicit = {"temperature": 1.7, "top_p": 0.95, "max_tokens": 7,
                "extra_body": {"top_k": 30, "repetition_penalty": 2.0}}
    with serving(create_app(b, max_batch=4, wait_ms=5)) as url:
        c = _client(url)
        for seed in (0, 1, 2):
            text, n = _answer(c, "a", seed=seed)
            assert (text, n) == _answer(c, "a", seed=seed, **explicit) and n <= 7
        sampled = {_answer(c, "a", seed=s)[0] for s in range(4)}
        greedy = _answer(c, "a", temperature=0, max_tokens=7, extra_body={"repetition_penalty": 2.0})[0]
        assert sampled != {greedy}  # (a's defaults do sample)
        assert _answer(c, "a", seed=0, temperature=0)[0] == greedy  # the request's own temperature wins
        assert _answer(c, "b", max_tokens=9) == _answer(c, "b", max_tokens=9, temperature=0)
    with serving(create_app(b, max_batch=4, wait_ms=5, generation_config="vllm")) as url:
        c = _client(url)
        plain = _answer(c, "a", max_tokens=7, temperature=0, extra_body={"repetition_penalty": 1.0})
        assert _answer(c, "a", max_tokens=7) == plain != (greedy, 7)
    with serving(create_app(b, max_batch=4, wait_ms=5, override_generation_config={"temperature": 0})) as url:
        assert _answer(_client(url), "a") == (greedy, 7)  # a's penalty and length, the override's temperature


def test_a_default_length_is_cut_to_what_the_context_leaves(made):
    """b's context is 128 tokens: a 118-token prompt without max_tokens gets at most the 10 left (before, the
    server's default of 256 made it a 400); with max_tokens past the room it is still a 400, by name."""
    with serving(create_app(made["bundle"], max_batch=4, wait_ms=5)) as url:
        c = _client(url)
        prompt = "ab" * 59  # 118 characters, a token each
        out = c.completions.create(model="b", prompt=prompt, temperature=0)
        assert out.usage.prompt_tokens >= 118 and 1 <= out.usage.completion_tokens <= 128 - out.usage.prompt_tokens
        with pytest.raises(openai.BadRequestError, match="maximum context length"):
            _answer(c, "b", prompt, max_tokens=16)


def test_bad_defaults_are_refused_by_name(tmp_path, capsys, made):
    """A generation config out of range fails the server's start, naming the branch and the field; a bad
    --generation-config or --override-generation-config exits non-zero naming the flag, before loading."""
    b = branchmerge.load(_merge(tmp_path, {"top_p": 5.0}), dtype="float32")
    with pytest.raises(BundleError, match=r"branch 'a': .*generation_config.json: top_p is 5.0; it must be a number in"):
        create_app(b)
    with pytest.raises(ValueError, match="'temprature' cannot be overridden"):
        create_app(made["bundle"], override_generation_config={"temprature": 0.5})
    bundle = tmp_path / "bundle"
    for args, message in ((["--generation-config", "model"], "one of auto, vllm"),
                          (["--override-generation-config", "{temperature: 1}"], "not JSON"),
                          (["--override-generation-config", "[1]"], "a JSON object"),
                          (["--override-generation-config", '{"temprature": 1}'], "'temprature' cannot be overridden"),
                          (["--override-generation-config", '{"top_k": 2.5}'], "top_k is 2.5; it must be an integer")):
        code, _, err = run_cli(capsys, "serve", bundle, *args)
        assert code != 0 and message in " ".join(err.split()), err
    code, out, err = run_cli(capsys, "generate", bundle, "rev ab=", "--branch", "b", "-n", "3")
    assert code == 0 and out.strip(), err  # (b's config is fine)
    code, _, err = run_cli(capsys, "generate", bundle, "rev ab=", "--branch", "a", "-n", "3")
    assert code != 0 and "top_p is 5.0" in err


def _with_config(bundle_dir: Path, values: dict) -> None:
    path = bundle_dir / "branches" / "a" / "generation_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def test_a_generation_config_cannot_change_how_a_branch_decodes(tmp_path, caplog):
    """A branch's generation_config.json is input: its end tokens, sampling defaults, penalties and bans are
    honored; what would change how every call of the branch decodes, or break it (beam search, several
    sequences, a dict output, a time limit, stop strings without a tokenizer, a KV cache that needs another
    package, classifier-free guidance, a watermark, prompt lookup, a minimum length) is ignored, named in a
    warning. Before, the first two made every request to the branch fail and the others changed its answers."""
    d = _merge(tmp_path, {"repetition_penalty": 2.0})
    p, q = [1, 12, 12, 12, 12], [1, 7, 8]
    rows = [RowSettings(temperature=0.9, seed=3), RowSettings()]

    def answers() -> list:
        b = branchmerge.load(d, dtype="float32")
        return [b.generate_ids([p], ["a"], max_new_tokens=6)[0].new_ids,
                [o.new_ids for o in b.generate_ids([p, q], ["a", "b"], max_new_tokens=6, row_sampler=RowSampler(rows))],
                b.beam_search(p, "a", beams=2, max_new_tokens=6)[0].new_ids]

    want = answers()
    ignored = {"num_beams": 4, "return_dict_in_generate": True, "output_scores": True, "max_time": 0.0,
               "stop_strings": ["a"], "cache_implementation": "quantized", "guidance_scale": 2.0,
               "watermarking_config": {"greenlist_ratio": 0.25}, "prompt_lookup_num_tokens": 3, "min_new_tokens": 5}
    _with_config(d, ignored)
    with caplog.at_level("WARNING", logger="branchmerge"):
        assert answers() == want
    named = " ".join(r.getMessage() for r in caplog.records if "ignores" in r.getMessage())
    assert all(k in named for k in ignored if k not in ("return_dict_in_generate", "output_scores")), named
    assert "output_scores" not in named  # (output formats are ignored without a word)


@pytest.mark.parametrize("values, message", [
    ({"bad_words_ids": [[3, 1000000]]}, "bad_words_ids names token 1000000, not an id in the vocabulary of 64"),
    ({"suppress_tokens": [-1]}, "suppress_tokens names token -1"),
    ({"begin_suppress_tokens": [64]}, "begin_suppress_tokens names token 64"),
    ({"sequence_bias": [[[70], 1.0]]}, "sequence_bias names token 70"),
    ({"sequence_bias": [[3, 1.0]]}, r"sequence_bias entries are \[\[token ids\], bias\]"),
    ({"bad_words_ids": [3]}, "bad_words_ids is .*; it must be a list of lists"),
    ({"bad_words_ids": [list(range(40))] * 2000}, "its bans and biases name over 65536 token ids"),
    ({"repetition_penalty": -1.0}, "repetition_penalty is -1.0; it must be a number > 0"),
    ({"no_repeat_ngram_size": "two"}, "no_repeat_ngram_size is 'two'"),
])
def test_a_bad_generation_config_is_named(tmp_path, values, message):
    """Bans or biases naming a token outside the branch's vocabulary (a device assert on a GPU, an index
    error on a CPU), too many of them, malformed entries or a penalty out of range: the branch's first
    generation fails naming the file, the field and the value, and the other branch still answers."""
    d = _merge(tmp_path, {})
    _with_config(d, values)
    b = branchmerge.load(d, dtype="float32")
    with pytest.raises(BundleError, match=rf"branch 'a': .*generation_config.json: {message}"):
        b.generate_ids([[1, 5]], ["a"], max_new_tokens=2)
    assert len(b.generate_ids([[1, 5]], ["b"], max_new_tokens=2)[0].new_ids) == 2


def test_inspect_shows_what_each_branchs_generation_config_does(tmp_path, capsys):
    """`inspect` reports each branch's sampling defaults, the fields generation ignores, and a config the
    runtime would refuse, with the reason (before any server starts)."""
    d = _merge(tmp_path, {"temperature": 0.6, "top_p": 0.9, "num_beams": 4})
    code, out, err = run_cli(capsys, "inspect", d)
    assert code == 0 and "each branch's generation config" in out, err
    code, out, _ = run_cli(capsys, "inspect", d, "--json")
    branches = json.loads(out)["branches"]
    assert branches["a"]["generation"] == {"defaults": {"temperature": 0.6, "top_p": 0.9}, "ignored": ["num_beams"],
                                           "error": None}
    assert branches["b"]["generation"] == {"defaults": {}, "ignored": [], "error": None}
    _with_config(d, {"bad_words_ids": [[999]]})
    code, out, _ = run_cli(capsys, "inspect", d, "--json")
    assert "bad_words_ids names token 999" in json.loads(out)["branches"]["a"]["generation"]["error"]
