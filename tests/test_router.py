"""The training-free router: pooling, the pure decision, storage with fingerprints, CLI and bad input."""

import json

import pytest
import torch

import branchmerge
from branchmerge.errors import BundleError, ConfigError
from branchmerge.front import build_bundle_router as build_router
from branchmerge.router import RouterConfig, phrase_mask, pool, route
from tests.cli_util import run_cli


def test_route_pure_max_mean_threshold():
    q = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]), dim=-1)
    s = torch.nn.functional.normalize(torch.tensor([[1.0, 0.1], [0.9, 0.0], [0.0, 1.0], [-1.0, 0.0]]), dim=-1)
    sb = torch.tensor([0, 0, 1, 1])
    choice, scores = route(q, s, sb, 3)
    assert choice.tolist()[:2] == [0, 1]
    assert scores.shape == (3, 3) and torch.isinf(scores[:, 2]).all()  # branch 2 has no samples
    _, mean_scores = route(q, s, sb, 2, aggregate="mean", top_k=2)
    assert mean_scores[0, 1] < scores[0, 1]  # the far sample (-1, 0) pulls branch 1's mean down
    low, _ = route(q, s, sb, 2, threshold=0.99, fallback=1)
    assert low.tolist() == [0, 1, 1]  # query 0 matches a sample exactly (score 1.0); query 2 scores ~0.77


def test_pool_ignores_padding_left_and_right():
    h = torch.randn(2, 5, 4)
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = pool(h, right, "mean")
    torch.testing.assert_close(out[0], torch.nn.functional.normalize(h[0, :3].mean(0), dim=0))
    last = pool(h, right, "last")
    torch.testing.assert_close(last[0], torch.nn.functional.normalize(h[0, 2], dim=0))
    offsets = torch.tensor([[[0, 2], [2, 4], [4, 6]]])
    assert phrase_mask(offsets, [(3, 6)]).tolist() == [[False, True, True]]


def _cfg(**kw):
    samples = {"a": ["add 1+2=", "add 5+5="], "b": ["rev abc=", "rev hello="], "c": ["key zz=", "key ab="]}
    return RouterConfig(samples=samples, **kw)


def test_embeddings_of_a_batch_equal_each_alone_and_leave_the_tokenizer_alone(loaded):
    """Padding a batch does not change an embedding; and embedding never switches padding on in the
    tokenizer's shared state: a request encoding with the same tokenizer on another thread at that moment
    switched it off again, and the batch came out ragged (a 500 under load)."""
    from branchmerge.router import Embedder

    b = loaded[0.9]
    with b.use("a") as m:
        tok = b.tokenizer("a")
        emb = Embedder(m, tok, template="{input} field of", phrase="field of")
        qs = ["add 1+2=", "rev something longer=", "key q="]
        together = emb.embed(qs)
        alone = torch.cat([emb.embed([q]) for q in qs])
        assert tok._tokenizer.padding is None and tok._tokenizer.truncation is None
        errors: list[BaseException] = []

        def encode_meanwhile():
            for k in range(300):
                assert len(tok("rev " + "x" * (k % 40) + "=")["input_ids"]) > 0

        def embed_meanwhile():
            try:
                for k in range(30):
                    emb.embed([f"add {k}+{'9' * (k % 13)}=", "rev a=", "key " + "z" * (k % 17) + "="])
            except BaseException as e:  # noqa: BLE001 - collected for the assertion below
                errors.append(e)

        import threading

        threads = [threading.Thread(target=encode_meanwhile) for _ in range(2)] + [threading.Thread(target=embed_meanwhile)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(3))
    assert errors == []


def test_build_store_reload_and_route(bundles, tmp_path):
    import shutil

    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.9], d)
    b = branchmerge.load(d)
    r = build_router(b, _cfg(template="{input} field of", phrase="field of"))
    assert (d / "router" / "samples.safetensors").is_file()
    names, scores = r.scores(["add 1+2=", "rev abc="])
    assert names == ["a", "b"]  # samples themselves route home
    again = branchmerge.load(d)
    assert torch.equal(again.router.sample_embs, r.sample_embs)
    assert again.router.route(["rev hello="]) == ["b"]
    assert again.generate(["add 5+5="], "auto", max_new_tokens=2) == b.generate(["add 5+5="], "a", max_new_tokens=2)
    with pytest.raises(BundleError, match="another embedder or template"):
        branchmerge.load(d, router=_cfg(template="{input} area of", phrase="area of"))
    code, out, err = run_cli_route(d)
    assert code == 0 and json.loads(out)["branch"] == "b"


def test_routed_questions_are_remembered(bundles, tmp_path):
    """A question routed before is answered from memory (same branch and scores, no forward); distinct
    questions of one call are embedded once each; the least recently used go first past ``cache_size``;
    ``cache_size: 0`` embeds every time."""
    import shutil

    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.9], d)
    b = branchmerge.load(d)
    r = build_router(b, _cfg(template="{input} field of", phrase="field of", cache_size=2))
    qs = ["add 4+4=", "rev xyz=", "add 4+4="]
    names, scores = r.scores(qs)
    assert r.embedded == 2 and names[0] == names[2] and torch.equal(scores[0], scores[2])
    fresh = branchmerge.load(d, router=_cfg(template="{input} field of", phrase="field of", cache_size=0))
    want_names, want = fresh.router.scores(qs)
    assert names == want_names and torch.allclose(scores, want, atol=1e-5)  # what embedding each gives
    n1, s1 = r.scores(["rev xyz="])
    assert n1 == [names[1]] and torch.equal(s1[0], scores[1]) and r.embedded == 2  # from memory
    r.route(["key aa="])  # a third question: the least recently used ("add 4+4=") goes
    assert r.embedded == 3
    r.route(["rev xyz="])
    assert r.embedded == 3
    r.route(["add 4+4="])
    assert r.embedded == 4
    fresh.router.route(["add 4+4=", "add 4+4="])
    assert fresh.router.embedded == 2 + 1  # no memory: embedded again (once for the two copies)


def test_a_remembered_question_does_not_wait_behind_a_routing_batch(bundles, tmp_path):
    """The server's routing batcher answers a question the router remembers at once, while a batch of new
    questions is still embedding; the front maps a remembered branch through its routing rules."""
    import asyncio
    import shutil
    import time
    from concurrent.futures import ThreadPoolExecutor

    from branchmerge.front import front_for
    from branchmerge.server.routing import RouteBatcher
    from branchmerge.staged import PipelinesConfig

    def slow(texts):
        time.sleep(0.8)
        return ["new"] * len(texts)

    async def run():
        rb = RouteBatcher(slow, ThreadPoolExecutor(1), cached=lambda t: "known" if t == "seen" else None)
        first = asyncio.ensure_future(rb.route("unseen"))
        await asyncio.sleep(0.1)  # its batch is embedding now
        t = time.monotonic()
        assert await rb.route("seen") == "known" and time.monotonic() - t < 0.3
        assert await first == "new"

    asyncio.run(run())
    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.9], d)
    b = branchmerge.load(d)
    build_router(b, _cfg(template="{input} field of", phrase="field of"))
    front = front_for(b, PipelinesConfig.model_validate(
        {"pipelines": [{"name": "p", "stages": [{"branch": "a"}]}], "routes": {"c": "p"}}))
    assert front.route_cached("key zz=") is None  # not routed yet
    assert front.route_many(["key zz=", "rev abc="]) == [(None, "p"), ("b", None)]
    assert front.route_cached("key zz=") == (None, "p") and front.route_cached("rev abc=") == ("b", None)
    assert b.router.cached("add 1+2=") is None


def run_cli_route(d):
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "branchmerge.cli.main", "route", str(d), "rev abc=", "--json"],
                       capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.mark.parametrize(
    "kw, msg",
    [
        ({"samples": {"a": []}}, "branch 'a' has no samples"),
        ({"samples": {"a": ["  "]}}, "empty sample"),
        ({"samples": {"a": ["x"]}, "template": "no placeholder"}, "{input}"),
        ({"samples": {"a": ["x"]}, "template": "{input} hmm", "phrase": "field of"}, "does not occur"),
        ({"samples": {"a": ["x"]}, "threshold": 0.5}, "needs a `fallback`"),
    ],
)
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg if msg != "{input}" else r"\{input\}"):
        RouterConfig(**kw)


def test_build_errors(loaded):
    b = loaded[0.9]
    with pytest.raises(ConfigError, match=r"unknown branch\(es\) \['zz'\]"):
        build_router(b, RouterConfig(samples={"a": ["x"], "b": ["y"], "c": ["z"], "zz": ["w"]}))
    with pytest.raises(ConfigError, match=r"\['c'\] have no router samples"):
        build_router(b, RouterConfig(samples={"a": ["x"], "b": ["y"]}))


def test_cli_router_build_eval_and_errors(capsys, bundles, tmp_path):
    import shutil

    import yaml

    d = tmp_path / "bundle"
    shutil.copytree(bundles[0.9], d)
    cfg = tmp_path / "router.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(template="{input} field of", phrase="field of").model_dump()))
    code, out, err = run_cli(capsys, "router", "build", d, cfg)
    assert code == 0, err
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps({"question": q, "branch": b}) for q, b in
                              [("add 2+2=", "a"), ("rev xyz=", "b"), ("key ab=", "c"), ("add 9+1=", "a")]))
    code, out, err = run_cli(capsys, "router", "eval", d, data, "--no-baselines")
    assert code == 0, err
    assert "router accuracy" in out and "confusion" in out and (tmp_path / "data.confusion.png").is_file()
    data.write_text('{"question": "", "branch": "a"}\n')
    code, _, err = run_cli(capsys, "router", "eval", d, data)
    assert code != 0 and "empty question" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"samples": {"a": ["x"]}, "template": "nothing"}))
    code, _, err = run_cli(capsys, "router", "build", d, bad)
    assert code != 0 and "template" in err and "{input}" in err
    code, _, err = run_cli(capsys, "route", d, "   ")
    assert code != 0 and "empty question" in err
