"""A plain Hugging Face model folder (a merge's or moe's output, a fine-tune) runs where a bundle does, as vLLM
serves a folder: generate, run-batch and serve open it as a bundle of one branch; `auto` is that branch."""

import json
import os
import signal
import subprocess
import sys
import tempfile

import httpx
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli_util import run_cli
from tests.serving import free_port, wait_listening

PROMPT = "add 1+2="


def _greedy(folder, prompt=PROMPT, n=5, eos=True) -> str:
    """What transformers itself continues ``prompt`` with (no chat template, greedy; through an end of text
    with ``eos=False``)."""
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False, **({} if eos else {"eos_token_id": None}))
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=eos)


def test_generate_and_run_batch_on_a_model_folder(family, tmp_path, capsys, monkeypatch):
    a = family["a"][0]
    scratch = tmp_path / "tmp"  # where the temporary bundles go (each removed when its command ends)
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    code, out, err = run_cli(capsys, "generate", a, PROMPT, "--no-chat", "-n", "5")
    assert code == 0, err
    assert out.strip() == _greedy(a).strip()
    want = _greedy(a, eos=False)
    lines = [{"custom_id": "c", "method": "POST", "url": "/v1/completions",
              "body": {"model": "base", "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}},
             {"custom_id": "x", "method": "POST", "url": "/v1/completions",
              "body": {"model": "nope", "prompt": PROMPT, "max_tokens": 5}}]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = run_cli(capsys, "run-batch", a, "-i", src, "-o", tmp_path / "out.jsonl")
    assert code == 0, err
    recs = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert recs[0]["response"]["body"]["choices"][0]["text"] == want
    assert recs[1]["response"]["status_code"] == 404 and "base" in recs[1]["response"]["body"]["error"]["message"]
    assert not list(scratch.iterdir())
    # a folder that is neither a bundle nor a model says so
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, "generate", tmp_path / "empty", PROMPT)
    assert code != 0 and "not a branchmerge bundle" in err


def test_serve_a_model_folder(family, tmp_path):
    a = family["a"][0]
    port, tmp = free_port(), tmp_path / "tmp"
    tmp.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "branchmerge.cli.main", "serve", str(a), "--port", str(port),
                             "--served-model-name", "tiny"], env={**os.environ, "TMPDIR": str(tmp)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        ids = [m["id"] for m in wait_listening(proc, f"http://127.0.0.1:{port}/v1/models").json()["data"]]
        assert ids == ["tiny"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "tiny", "prompt": PROMPT, "max_tokens": 5, "ignore_eos": True}).json()
        assert r["choices"][0]["text"] == _greedy(a, eos=False)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    assert not list(tmp.iterdir())  # (its temporary bundle is gone)
