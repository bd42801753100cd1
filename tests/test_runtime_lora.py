"""PEFT LoRA adapters loaded into a running bundle (vLLM's /v1/load_lora_adapter): each loaded adapter's
logits are PEFT's model's, the branches already there do not change, mixed batches take it, unloading frees
its slot for the next one, and what a loaded adapter cannot be (or a client may not load) is refused by name
with nothing changed."""

from __future__ import annotations

import json
import os
import threading
import time

import httpx
import pytest
import torch

import branchmerge
from branchmerge.errors import BranchNotFoundError, BundleError, ModelInputError
from branchmerge.merge import merge_adapters
from branchmerge.server import create_app
from tests.serving import serving, wait_queued
from tests.test_adapters import make_adapter

SPECS = {  # name -> LoraConfig
    "qv": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "wide": dict(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"o_proj": 3},
                 target_modules=["q_proj", "o_proj", "gate_proj", "down_proj"]),
    "k": dict(r=2, lora_alpha=4, target_modules=["k_proj"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj"]),
    "saved": dict(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "emb": dict(r=4, lora_alpha=8, target_modules=["embed_tokens"]),
}
X = torch.tensor([[1, 5, 9, 14, 3, 22, 7, 30]])


@pytest.fixture(scope="module")
def loras(family, tmp_path_factory):
    """Each adapter of SPECS in ``root/NAME``, with PEFT's merged model."""
    root = tmp_path_factory.mktemp("loras")
    return root, {n: make_adapter(family["base"][1], root / n, 10 + i, **kw) for i, (n, kw) in enumerate(SPECS.items())}


def _logits(bundle, name):
    with torch.no_grad(), bundle.use(name) as m:
        return m(input_ids=X).logits


def _greedy(model, ids, n=5):
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("start", [["qv"], []], ids=["exact-group", "base-alone"])
def test_loaded_adapters_are_pefts_models_and_leave_the_others_alone(family, loras, tmp_path, start):
    root, peft = loras
    base = family["base"][1]
    merge_adapters(family["base"][0], {n: root / n for n in start}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    before = {n: _logits(bundle, n) for n in bundle.branch_names}
    bytes0 = bundle.memory_bytes()

    got = bundle.load_lora("wide", root / "wide")  # rank 8: above the group's 4, every layer re-padded
    assert (got.base, got.rank, got.slot) == ("base", 8, len(start) + 1)
    assert "wide" in bundle.branch_names and bundle.reader.hf_config("wide") == bundle.reader.hf_config("base")
    torch.testing.assert_close(_logits(bundle, "wide"), peft["wide"](X).logits, atol=1e-5, rtol=0)
    for n, t in before.items():  # the branches already there compute as before
        torch.testing.assert_close(_logits(bundle, n), t, atol=1e-6, rtol=0, msg=n)
    assert bundle.memory_bytes() > bytes0
    bundle.load_lora("k", root / "k")
    torch.testing.assert_close(_logits(bundle, "k"), peft["k"](X).logits, atol=1e-5, rtol=0)

    # one mixed batch over the base, the start adapter and both loaded ones: each row its own model's answer
    names = ["base", *start, "wide", "k"]
    models = {"base": base, **{n: peft[n] for n in names[1:]}}
    prompts = [[3 + i, 8, 12 + i, 2] for i in range(len(names))]
    outs = bundle.generate_ids(prompts, names, max_new_tokens=[5] * len(names))
    for n, p, o in zip(names, prompts, outs):
        assert o.new_ids == _greedy(models[n], p), n

    # unloaded: gone by name, its slot zeroed and reused (in place) by the next adapter of a rank that fits
    slot = bundle.loras["wide"].slot
    bundle.unload_lora("wide")
    assert "wide" not in bundle.branch_names and "wide" not in bundle.loras
    with pytest.raises(BranchNotFoundError):
        bundle.tokenizer("wide")
    with pytest.raises(BranchNotFoundError, match="no adapter 'base' was loaded at runtime"):
        bundle.unload_lora("base")
    again = bundle.load_lora("qv2", root / "qv")
    assert again.slot == slot
    torch.testing.assert_close(_logits(bundle, "qv2"), peft["qv"](X).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(bundle, "k"), peft["k"](X).logits, atol=1e-5, rtol=0)
    for n, t in before.items():
        torch.testing.assert_close(_logits(bundle, n), t, atol=1e-6, rtol=0, msg=n)
    bundle.materialize("qv2")  # a hot loaded branch is exactly its factored self
    torch.testing.assert_close(_logits(bundle, "qv2"), peft["qv"](X).logits, atol=1e-5, rtol=0)


def test_what_a_loaded_adapter_cannot_be_is_refused_and_nothing_changes(family, loras, bundles, tmp_path):
    root, _ = loras
    merge_adapters(family["base"][0], {"qv": root / "qv"}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    names, logits = list(bundle.branch_names), _logits(bundle, "qv")
    cases = [
        ("d", root / "dora", {}, ModelInputError, "by DoRA"),
        ("s", root / "saved", {}, ModelInputError, "modules_to_save"),
        ("e", root / "emb", {}, ModelInputError, "embedding LoRA"),
        ("w", root / "wide", {"max_rank": 4}, ModelInputError, "rank 8 .* above this server's limit of 4"),
        ("qv", root / "k", {}, BundleError, "is taken"),
        ("auto", root / "k", {}, BundleError, "is taken"),
        ("../x", root / "k", {}, BundleError, "not a safe name"),
        ("k", tmp_path, {}, ModelInputError, "adapter_config.json cannot be read"),
        ("k", root / "k", {"base": "nope"}, BranchNotFoundError, "unknown branch"),
    ]
    for name, folder, kw, err, needle in cases:
        with pytest.raises(err, match=needle):
            bundle.load_lora(name, folder, **kw)
        assert bundle.branch_names == names and not bundle.loras, name
    bad = tmp_path / "bad"  # a corrupt weights file, and factors that do not fit the base
    bad.mkdir()
    (bad / "adapter_config.json").write_text((root / "k" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    with pytest.raises(ModelInputError, match="not a readable safetensors"):
        bundle.load_lora("bad", bad)
    torch.testing.assert_close(_logits(bundle, "qv"), logits, atol=0, rtol=0)
    # a bundle of several fine-tunes has no one base: the adapter's must be named; never a runtime branch
    other = branchmerge.load(bundles[0.9], dtype="float32")
    with pytest.raises(BundleError, match="name the branch the adapter was trained on"):
        other.load_lora("k", root / "k")
    bundle.load_lora("k", root / "k")
    with pytest.raises(BundleError, match="it was loaded at runtime"):
        bundle.load_lora("k2", root / "k", base="k")


def test_an_adapter_over_a_compressed_fine_tune_applies_to_it_as_stored(family, bundles, tmp_path):
    """Over branch ``a`` of a compressed bundle (r=0.9, ``s_a ≠ 1``) the adapter's branch is exactly PEFT's
    adapter on ``a`` as the bundle stores it (the branch exported); ``a`` and the others do not change."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from branchmerge.export import export_branch

    bundle = branchmerge.load(bundles[0.9], dtype="float32")
    before = {n: _logits(bundle, n) for n in "abc"}
    make_adapter(family["a"][1], tmp_path / "ad", 5, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    got = bundle.load_lora("a-lora", tmp_path / "ad", base="a")
    assert got.base == "a" and bundle.groups["main"].model.model.layers[0].self_attn.q_proj.scales[got.slot] != 1.0
    export_branch(bundles[0.9], "a", tmp_path / "a-stored", progress=False, dtype="float32")
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "a-stored"), tmp_path / "ad")
    with torch.no_grad():
        torch.testing.assert_close(_logits(bundle, "a-lora"), want.eval()(X).logits, atol=1e-5, rtol=0)
    for n, t in before.items():
        torch.testing.assert_close(_logits(bundle, n), t, atol=1e-6, rtol=0, msg=n)
    ids = [[3, 9, 4], [3, 9, 4], [3, 9, 4]]
    outs = bundle.generate_ids(ids, ["a-lora", "a", "b"], max_new_tokens=[4] * 3)  # one mixed batch
    solo = [bundle.generate_ids([ids[0]], [n], max_new_tokens=[4])[0].new_ids for n in ("a-lora", "a", "b")]
    assert [o.new_ids for o in outs] == solo
    with serving(create_app(bundle, lora_dir=tmp_path, lora_base="b")) as url:  # the base per request
        r = _post(url, "/v1/load_lora_adapter", lora_name="a-lora2", lora_path="ad", base="a")
        assert r.status_code == 200, r.text
        assert bundle.loras["a-lora2"].base == "a"
        torch.testing.assert_close(_logits(bundle, "a-lora2"), _logits(bundle, "a-lora"), atol=1e-6, rtol=0)
        assert _post(url, "/v1/unload_lora_adapter", lora_name="a-lora2").status_code == 200
    bundle.unload_lora("a-lora")  # the freed slot takes the next adapter in place, over another branch
    make_adapter(family["b"][1], tmp_path / "bd", 6, r=2, lora_alpha=4, target_modules=["q_proj"])
    again = bundle.load_lora("b-lora", tmp_path / "bd", base="b")
    assert again.slot == got.slot
    export_branch(bundles[0.9], "b", tmp_path / "b-stored", progress=False, dtype="float32")
    want = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "b-stored"), tmp_path / "bd")
    with torch.no_grad():
        torch.testing.assert_close(_logits(bundle, "b-lora"), want.eval()(X).logits, atol=1e-5, rtol=0)


def _post(url, path, **body):
    return httpx.post(f"{url}{path}", json=body, timeout=60)


def test_the_server_loads_and_unloads_adapters_as_vllm_does(family, loras, tmp_path):
    import openai

    root, peft = loras
    merge_adapters(family["base"][0], {}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    outside = tmp_path / "outside"  # an adapter folder the operator did not put in the LoRA folder
    outside.mkdir()
    (outside / "adapter_config.json").write_text((root / "k" / "adapter_config.json").read_text())
    (outside / "adapter_model.safetensors").write_bytes((root / "k" / "adapter_model.safetensors").read_bytes())
    os.symlink(outside, root / "link")
    (root / "filelink").mkdir()  # a folder inside whose weights file links out of it
    (root / "filelink" / "adapter_config.json").write_text((root / "k" / "adapter_config.json").read_text())
    os.symlink(outside / "adapter_model.safetensors", root / "filelink" / "adapter_model.safetensors")
    app = create_app(bundle, lora_dir=root, max_loras=2, max_lora_rank=8, served_model_names=["bee=base"])
    prompt = [4, 9, 2, 17, 5]
    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        r = _post(url, "/v1/load_lora_adapter", lora_name="wide", lora_path="wide")
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'wide' added successfully.", r.text
        listed = {m.id: m for m in client.models.list().data}
        assert listed["wide"].model_extra["parent"] == "base"
        got = client.completions.create(model="wide", prompt=prompt, max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == bundle.tokenizer("wide").decode(_greedy(peft["wide"], prompt))
        refused = {  # each: status, words of the error
            ("wide", "wide"): (400, "already been loaded"),
            ("x", "../outside"): (400, "outside this server's LoRA folder"),
            ("x", str(outside)): (400, "outside this server's LoRA folder"),
            ("x", "link"): (400, "outside this server's LoRA folder"),
            ("x", "filelink"): (400, "outside this server's LoRA folder"),
            ("x", "k\u0000"): (400, "NUL character"),
            ("x", "nope"): (400, "not a PEFT adapter folder"),
            ("x", "dora"): (400, "by DoRA"),
            ("x y", "k"): (400, "not a safe name"),
            ("bee", "k"): (400, "is taken"),  # a --served-model-name (it would shadow the adapter)
        }
        for (name, path), (status, words) in refused.items():
            r = _post(url, "/v1/load_lora_adapter", lora_name=name, lora_path=path)
            assert r.status_code == status and words in r.json()["error"]["message"], (name, path, r.text)
        assert _post(url, "/v1/load_lora_adapter", lora_name="x", lora_path="k", extra=1).status_code == 400
        assert _post(url, "/v1/load_lora_adapter", lora_name="k", lora_path=str(root / "k")).status_code == 200
        r = _post(url, "/v1/load_lora_adapter", lora_name="qv", lora_path="qv")
        assert r.status_code == 400 and "--max-loras" in r.json()["error"]["message"]
        # load_inplace replaces an adapter of that name
        r = _post(url, "/v1/load_lora_adapter", lora_name="k", lora_path="qv", load_inplace=True)
        assert r.status_code == 200
        got = client.completions.create(model="k", prompt=prompt, max_tokens=5, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == bundle.tokenizer("k").decode(_greedy(peft["qv"], prompt))

        # unloading while a request of it waits: no new ones are taken, it ends whole, then the adapter goes
        lines: list[str] = []
        unloaded: list[httpx.Response] = []

        def stream():
            with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                    "model": "wide", "prompt": prompt, "max_tokens": 40, "temperature": 0, "stream": True,
                    "ignore_eos": True}) as s:
                lines.extend(line for line in s.iter_lines() if line.startswith("data: "))

        engine = app.state.engine
        threads = [threading.Thread(target=stream),
                   threading.Thread(target=lambda: unloaded.append(_post(url, "/v1/unload_lora_adapter",
                                                                         lora_name="wide")))]
        with engine.paused():
            threads[0].start()
            wait_queued(engine, 1)
            threads[1].start()
            end = time.monotonic() + 30
            while "wide" not in bundle.retiring:
                assert time.monotonic() < end
                time.sleep(0.01)
            r = _post(url, "/v1/completions", model="wide", prompt=prompt, max_tokens=2)
            assert r.status_code == 404 and "being unloaded" in r.json()["error"]["message"]
            assert "wide" not in {m.id for m in client.models.list().data} and not unloaded
        for th in threads:
            th.join(timeout=120)
        r = unloaded[0]
        assert r.status_code == 200 and r.text == "Success: LoRA adapter 'wide' removed successfully."
        assert lines[-1] == "data: [DONE]"
        text = "".join(json.loads(x[6:])["choices"][0]["text"] for x in lines[:-1])
        assert text == bundle.tokenizer("base").decode(_greedy(peft["wide"], prompt, 40))
        assert "wide" not in {m.id for m in client.models.list().data}
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="wide", prompt=prompt, max_tokens=2)
        r = _post(url, "/v1/unload_lora_adapter", lora_name="wide")
        assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
        r = _post(url, "/v1/unload_lora_adapter", lora_name="base")
        assert r.status_code == 404
        assert _post(url, "/v1/load_lora_adapter", lora_name="qv", lora_path="qv").status_code == 200  # room again
    # without --lora-dir there are no such endpoints; with an API key they need it
    with serving(create_app(bundle)) as url:
        assert _post(url, "/v1/load_lora_adapter", lora_name="z", lora_path="k").status_code == 404
    with serving(create_app(bundle, lora_dir=root, api_key="sesame")) as url:
        assert _post(url, "/v1/load_lora_adapter", lora_name="z", lora_path="k").status_code == 401
        r = _post(url, "/v1/load_lora_adapter", lora_name="base", lora_path="k")  # a name served already
        assert r.status_code == 401
        r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "base", "lora_path": "k"},
                       headers={"Authorization": "Bearer sesame"}, timeout=60)
        assert r.status_code == 400 and "is taken" in r.json()["error"]["message"]


def test_fused_layout_takes_loaded_adapters(family, loras, tmp_path):
    """The fused layout (CUDA's default: W̄ and every V in one weight) grows and reuses slots the same way."""
    root, peft = loras
    merge_adapters(family["base"][0], {"qv": root / "qv"}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32", fused=True)
    assert bundle.groups["main"].model.model.layers[0].self_attn.q_proj.fused
    bundle.load_lora("wide", root / "wide")
    assert bundle.groups["main"].model.model.layers[0].self_attn.q_proj.fused
    for n, m in (("wide", peft["wide"]), ("qv", peft["qv"]), ("base", family["base"][1])):
        torch.testing.assert_close(_logits(bundle, n), m(X).logits, atol=1e-5, rtol=0, msg=n)
    bundle.unload_lora("wide")
    bundle.load_lora("k", root / "k")
    torch.testing.assert_close(_logits(bundle, "k"), peft["k"](X).logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(bundle, "qv"), peft["qv"](X).logits, atol=1e-5, rtol=0)
    static = branchmerge.load(tmp_path / "b", dtype="float32", static_cache=True)
    with pytest.raises(BundleError, match="static_cache"):
        static.load_lora("k", root / "k")


def test_loaded_adapters_run_in_the_triton_kernels(family, loras, tmp_path):
    """With the kernels (Triton's interpreter here), a loaded adapter's layers are grouped with their siblings
    again and a mixed batch through the kernels gives PEFT's logits; unload and reload write in place."""
    root, peft = loras
    merge_adapters(family["base"][0], {"qv": root / "qv"}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32", kernels="triton")
    assert bundle.kernels == "triton"
    bundle.load_lora("wide", root / "wide")
    layer = bundle.groups["main"].model.model.layers[0]
    assert layer.self_attn.q_proj.use_triton and layer.mlp.gate_proj.use_triton  # (k_proj, up_proj: base layers)
    ids = X.repeat(3, 1)
    names = ["wide", "base", "qv"]
    want = torch.cat([peft["wide"](X).logits, family["base"][1](X).logits, peft["qv"](X).logits])
    torch.testing.assert_close(bundle.logits(ids, names), want, atol=1e-4, rtol=1e-4)
    bundle.unload_lora("wide")
    bundle.load_lora("k", root / "k")  # rank 2 fits the freed slot: written in place; k_proj becomes branched
    attn = bundle.groups["main"].model.model.layers[0].self_attn
    assert attn.q_proj.sibling is attn.k_proj.sibling is attn.v_proj.sibling is not None  # q/k/v as one call now
    want = torch.cat([peft["k"](X).logits, family["base"][1](X).logits, peft["qv"](X).logits])
    torch.testing.assert_close(bundle.logits(ids, ["k", "base", "qv"]), want, atol=1e-4, rtol=1e-4)


def test_serve_refuses_a_lora_folder_it_cannot_use(capsys, bundles, tmp_path):
    from tests.cli_util import run_cli

    code, _, err = run_cli(capsys, "serve", bundles[0.9], "--lora-dir", tmp_path)
    assert code == 1 and "name it with --lora-base (one of a, b, c)" in err
    code, _, err = run_cli(capsys, "serve", bundles[0.9], "--lora-dir", tmp_path, "--lora-base", "z")
    assert code == 1 and "--lora-base 'z' is not a branch" in err
    code, _, err = run_cli(capsys, "serve", bundles[0.9], "--lora-dir", tmp_path / "nope")
    assert code == 1 and "is not a folder" in err
    code, _, err = run_cli(capsys, "serve", bundles[0.9], "--lora-on-demand")
    assert code == 2 and "needs --lora-dir" in err


def test_a_qwen2_base_with_biases_takes_adapters_that_train_them(tmp_path):
    """Qwen2's q/k/v carry biases: a loaded adapter's ``lora_bias`` changes its own branch's bias only, in a
    base layer turned branched and in a layer branched already (an adapter merged at start)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from tests.conftest import save_char_tokenizer

    torch.manual_seed(0)
    qwen = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64, tie_word_embeddings=True)).eval()
    with torch.no_grad():
        for n, p in qwen.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.1)
    qwen.save_pretrained(tmp_path / "qwen")
    save_char_tokenizer(tmp_path / "qwen")
    start = make_adapter(qwen, tmp_path / "a" / "v", 1, r=4, lora_alpha=8, target_modules=["v_proj"])
    biased = make_adapter(qwen, tmp_path / "a" / "qk", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                          lora_bias=True)
    merge_adapters(tmp_path / "qwen", {"v": tmp_path / "a" / "v"}, tmp_path / "b", base_name="qwen", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    bundle.load_lora("qk", tmp_path / "a" / "qk")
    attn = bundle.groups["main"].model.model.layers[0].self_attn
    assert attn.q_proj.has_bias and attn.k_proj.__class__.__name__ == "Linear"  # q: base layer made branched
    for name, model in (("qk", biased), ("v", start), ("qwen", qwen)):
        torch.testing.assert_close(_logits(bundle, name), model(X).logits, atol=1e-5, rtol=0, msg=name)
    outs = bundle.generate_ids([[3, 4, 5], [3, 4, 5], [3, 4, 5]], ["qk", "v", "qwen"], max_new_tokens=[4] * 3)
    assert [o.new_ids for o in outs] == [_greedy(m, [3, 4, 5], 4) for m in (biased, start, qwen)]


def test_adapters_load_on_demand_and_the_least_recently_used_makes_room(family, loras, tmp_path):
    """--lora-on-demand (vLLM's filesystem resolver): a request naming an adapter folder of the LoRA folder
    loads it; when the slots are full the least recently used idle adapter is unloaded, unless every one
    was asked for just now (then a 503 to retry)."""
    import openai

    root, peft = loras
    merge_adapters(family["base"][0], {}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    outside = tmp_path / "outside"
    outside.mkdir()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        (outside / f).write_bytes((root / "k" / f).read_bytes())
    if not (root / "away").exists():
        os.symlink(outside, root / "away")
    app = create_app(bundle, lora_dir=root, max_loras=2, lora_on_demand=True)
    loader = app.state.service.loras
    loader.grace_s = 0.0
    prompt = [6, 2, 11, 3]

    def ask(client, model):
        got = client.completions.create(model=model, prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert got.choices[0].text == bundle.tokenizer("base").decode(_greedy(peft[model], prompt, 4)), model

    with serving(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x")
        ask(client, "qv")
        ask(client, "k")
        assert {"qv", "k"} <= {m.id for m in client.models.list().data}
        ask(client, "k")  # k is now the most recently used: qv makes room for wide
        ask(client, "wide")
        assert set(bundle.loras) == {"k", "wide"}
        metrics = httpx.get(f"{url}/metrics").text
        assert "branchmerge_lora_evictions_total 1" in metrics and "branchmerge_lora_loads_total 3" in metrics
        for model, err in (("nope", openai.NotFoundError), ("away", openai.NotFoundError),
                           ("dora", openai.BadRequestError)):
            with pytest.raises(err):
                client.completions.create(model=model, prompt=prompt, max_tokens=2)
        loader.grace_s = 600.0  # both loaded adapters were asked for "just now": none may go
        with pytest.raises(openai.InternalServerError, match="adapter slots"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0).completions.create(
                model="qv", prompt=prompt, max_tokens=2)
        assert set(bundle.loras) == {"k", "wide"}
    with serving(create_app(bundle, lora_dir=root)) as url:  # without on-demand: unknown names stay unknown
        with pytest.raises(openai.NotFoundError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="x").completions.create(model="qv", prompt=prompt,
                                                                               max_tokens=2)


def test_serve_lora_modules_loads_adapters_into_the_base_or_merges_them(family, loras, tmp_path):
    """`serve BASE --lora-modules`: adapters a loaded one can be are loaded into the base alone (fast); one that
    cannot (DoRA) makes the start merge them all. Either way each answers as PEFT's model; adapters given at
    start count toward no --max-loras and are never evicted."""
    from branchmerge.front import open_adapters_front

    root, peft = loras
    fast = open_adapters_front(family["base"][0], {"qv": root / "qv", "wide": root / "wide"}, tmp_path / "fast",
                               base_name="tiny", dtype="float32")
    assert set(fast.bundle.loras) == {"qv", "wide"} and not (tmp_path / "fast" / "merged").exists()
    for n in ("qv", "wide"):
        torch.testing.assert_close(_logits(fast.bundle, n), peft[n](X).logits, atol=1e-5, rtol=0, msg=n)
    slow = open_adapters_front(family["base"][0], {"qv": root / "qv", "dora": root / "dora"}, tmp_path / "slow",
                               base_name="tiny", dtype="float32")
    assert not slow.bundle.loras and {"tiny", "qv", "dora"} <= set(slow.bundle.branch_names)
    assert not (tmp_path / "slow" / "base").exists()
    torch.testing.assert_close(_logits(slow.bundle, "qv"), peft["qv"](X).logits, atol=1e-5, rtol=0)
    assert float((_logits(slow.bundle, "dora") - peft["dora"](X).logits).abs().max()) < 0.05

    app = create_app(fast, lora_dir=root, max_loras=1, lora_on_demand=True)
    app.state.service.loras.grace_s = 0.0
    with serving(app) as url:
        assert _post(url, "/v1/completions", model="k", prompt=[3, 4], max_tokens=2).status_code == 200
        assert _post(url, "/v1/completions", model="emb", prompt=[3, 4], max_tokens=2).status_code == 400
        r = _post(url, "/v1/load_lora_adapter", lora_name="k2", lora_path="k")
        assert r.status_code == 400 and "--max-loras" in r.text  # one runtime slot: k holds it
        assert set(fast.bundle.loras) == {"qv", "wide", "k"}
        assert _post(url, "/v1/unload_lora_adapter", lora_name="qv").status_code == 200  # (as vLLM allows)


def test_the_gateway_loads_adapters_on_its_lora_upstream(family, loras, tmp_path):
    """The gateway sends /v1/load_lora_adapter to its upstream with `lora: true` (a real `serve --lora-dir`
    here) and routes the new name there; unload undoes both; names it serves already are refused."""
    import openai

    from branchmerge.server.app import build_app
    from branchmerge.server.gateway import GatewayConfig, GatewayService

    root, peft = loras
    merge_adapters(family["base"][0], {}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    prompt = [5, 8, 13, 2]
    with serving(create_app(bundle, lora_dir=root)) as up, serving(create_app(bundle)) as plain:
        cfg = GatewayConfig.model_validate({
            "upstreams": {"lora": {"base_url": f"{up}/v1", "lora": True}, "plain": {"base_url": f"{plain}/v1"}},
            "branches": {"base": {"upstream": "lora"}, "other": {"upstream": "plain", "model": "base"}}})
        from branchmerge.front import build_bundle_router
        from branchmerge.router import RouterConfig

        mine = branchmerge.load(tmp_path / "b", dtype="float32")  # the gateway's own router (over the base)
        build_bundle_router(mine, RouterConfig(samples={"base": ["add 1+2="]}))
        service = GatewayService(cfg, router=mine.router)
        with serving(build_app(service)) as gw:
            client = openai.OpenAI(base_url=f"{gw}/v1", api_key="x")
            r = _post(gw, "/v1/load_lora_adapter", lora_name="wide", lora_path="wide", samples=["rev abc="])
            assert r.status_code == 200 and "added successfully" in r.text
            assert mine.router.branches == ["base", "wide"] and bundle.router is None  # (routed at the gateway)
            r = _post(gw, "/v1/completions", model="auto", prompt="rev abc=", max_tokens=2)
            assert r.status_code == 200 and r.json()["branch"] == "wide"
            assert "wide" in {m.id for m in client.models.list().data} and "wide" in bundle.loras
            tok = bundle.tokenizer("base")
            text = tok.decode(prompt)
            got = client.completions.create(model="wide", prompt=text, max_tokens=5, temperature=0,
                                            extra_body={"ignore_eos": True})
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert got.choices[0].text == tok.decode(_greedy(peft["wide"], ids))
            for body, status, words in [
                    ({"lora_name": "other", "lora_path": "k"}, 400, "is taken"),
                    ({"lora_name": "k", "lora_path": "k", "upstream": "plain"}, 400, "does not take adapters"),
                    ({"lora_name": "k", "lora_path": "../x"}, 400, "outside this server's LoRA folder"),
                    ({"lora_name": "k", "lora_path": "dora"}, 400, "by DoRA")]:
                r = httpx.post(f"{gw}/v1/load_lora_adapter", json=body, timeout=60)
                assert r.status_code == status and words in r.json()["error"]["message"], (body, r.text)
            assert "k" not in {m.id for m in client.models.list().data}
            r = _post(gw, "/v1/unload_lora_adapter", lora_name="wide")
            assert r.status_code == 200 and "wide" not in bundle.loras and mine.router.branches == ["base"]
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="wide", prompt=text, max_tokens=2)
            assert _post(gw, "/v1/unload_lora_adapter", lora_name="base").status_code == 404
        r = _post(up, "/v1/load_lora_adapter", lora_name="z", lora_path="k", upstream="x")
        assert r.status_code == 400 and "gateway's field" in r.text


def test_a_loaded_adapter_with_samples_joins_auto_routing(family, loras, tmp_path):
    """`samples` with the load: the bundle's router sends `auto` questions like them to the adapter, from then
    until it is unloaded (remembered routes forgotten both times); a bundle without a router refuses them."""
    from branchmerge.front import build_bundle_router
    from branchmerge.router import RouterConfig

    root, _ = loras
    merge_adapters(family["base"][0], {}, tmp_path / "b", base_name="base", progress=False)
    bundle = branchmerge.load(tmp_path / "b", dtype="float32")
    with serving(create_app(bundle, lora_dir=root)) as url:
        r = _post(url, "/v1/load_lora_adapter", lora_name="wide", lora_path="wide", samples=["rev abc="])
        assert r.status_code == 400 and "no router" in r.text and not bundle.loras
    build_bundle_router(bundle, RouterConfig(samples={"base": ["add 1+2=", "add 5+5="]}))
    router = bundle.router
    assert router.route(["rev abc="]) == ["base"]
    with serving(create_app(bundle, lora_dir=root)) as url:
        r = _post(url, "/v1/load_lora_adapter", lora_name="wide", lora_path="wide", samples=["rev abc=", "rev xyz="])
        assert r.status_code == 200, r.text
        assert router.route(["rev abc=", "add 1+2="]) == ["wide", "base"] and router.branches == ["base", "wide"]
        r = _post(url, "/v1/completions", model="auto", prompt="rev xyz=", max_tokens=3)
        assert r.status_code == 200 and r.headers["X-Branchmerge-Branch"] == "wide"
        bad = _post(url, "/v1/load_lora_adapter", lora_name="k", lora_path="k", samples=[])
        assert bad.status_code == 400 and "k" not in bundle.loras
        assert _post(url, "/v1/unload_lora_adapter", lora_name="wide").status_code == 200
        assert router.route(["rev abc="]) == ["base"] and router.branches == ["base"]
        r = _post(url, "/v1/completions", model="auto", prompt="rev xyz=", max_tokens=3)
        assert r.status_code == 200 and r.headers["X-Branchmerge-Branch"] == "base"
    with pytest.raises(ValueError, match="fallback or its only branch"):
        router.remove_branch("base")


def test_generate_and_chat_take_adapters_for_one_run(capsys, family, loras, bundles, tmp_path, monkeypatch):
    """`generate BASE_FOLDER --lora NAME=PATH --branch NAME` (a base model folder: a temporary bundle) and
    `chat BUNDLE --lora … --lora-base a` answer as the adapter's branch does; bad values are refused by name."""
    import io

    from tests.cli_util import run_cli

    root, _ = loras
    merge_adapters(family["base"][0], {}, tmp_path / "b", base_name="base", progress=False)
    ref = branchmerge.load(tmp_path / "b", dtype="float32")
    ref.load_lora("qv", root / "qv")
    want = ref.generate(["abc"], branch="qv", max_new_tokens=6, chat=False)[0]
    code, out, err = run_cli(capsys, "generate", family["base"][0], "abc", "--lora", f"qv={root / 'qv'}",
                             "--branch", "qv", "-n", "6", "--no-chat", "--dtype", "float32")
    assert code == 0 and "[branch: qv]" in err and out.strip() == want.strip(), (out, err)
    monkeypatch.setattr("sys.stdin", io.StringIO("abc\n\n"))
    code, out, err = run_cli(capsys, "chat", bundles[0.9], "--lora", f"x={root / 'k'}", "--lora-base", "a",
                             "--branch", "x", "-n", "3")
    assert code == 0 and "x> " in out, (out, err)
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "abc", "--lora", "nope", "--branch", "a")
    assert code == 2 and "--lora" in err
    code, _, err = run_cli(capsys, "generate", bundles[0.9], "abc", "--lora", f"x={root / 'dora'}", "--lora-base", "a")
    assert code == 1 and "by DoRA" in err


def test_a_busy_engine_lets_a_load_take_the_weights_lock():
    """A loop that re-takes the weights lock at once (the engine's segments under traffic) lets a waiting
    thread (a load, a materialize) in before its next turn, rather than keeping it out as long as it runs."""
    from branchmerge.runtime.bundle import WeightsLock

    lock, stop, turns = WeightsLock(), threading.Event(), []

    def engine():
        while not stop.is_set():
            lock.let_waiters_first()
            with lock:
                turns.append(time.perf_counter())
                time.sleep(0.005)

    th = threading.Thread(target=engine)
    th.start()
    try:
        time.sleep(0.1)
        waits = []
        for _ in range(20):
            t = time.perf_counter()
            with lock, lock:  # (reentrant)
                waits.append(time.perf_counter() - t)
            time.sleep(0.01)
    finally:
        stop.set()
        th.join()
    assert max(waits) < 0.5 and len(turns) > 20  # (one segment's time at most, and the engine kept going)
