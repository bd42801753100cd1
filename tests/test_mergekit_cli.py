"""mergekit's command lines work with branchmerge's commands in front of them: `mergekit-yaml CONFIG OUT
--flags` as `merge`, mergekit-moe's as `moe`, mergekit-multimerge's as `multimerge`, mergekit-extract-lora's
option names on `extract-lora`. Flags that act are checked by what they do; the rest change nothing."""

import torch
import yaml
from safetensors.torch import load_file

from tests.cli_util import run_cli


def _tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _linear(family, tmp_path, method="linear", **kw):
    density = {"density": 0.5} if method != "linear" else {}
    cfg = {"merge_method": method, "dtype": "float32", **kw,
           "models": [{"model": str(family[n][0]), "parameters": {"weight": 1.0, **density}} for n in "ab"]}
    path = tmp_path / f"{method}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_mergekit_yaml_command_line(family, tmp_path, capsys):
    cfg = _linear(family, tmp_path)
    code, _, err = run_cli(capsys, "merge", cfg, "-o", tmp_path / "plain", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "merge", cfg, tmp_path / "mk", "--lazy-unpickle",
                           "--allow-crimes", "--copy-tokenizer", "--safe-serialization", "--out-shard-size", "20K",
                           "--no-write-model-card", "--no-progress")
    assert code == 0, err
    shards = sorted((tmp_path / "mk").glob("*.safetensors"))
    assert len(shards) > 3 and not (tmp_path / "mk" / "README.md").exists()
    assert (tmp_path / "plain" / "README.md").exists() and len(list((tmp_path / "plain").glob("*.safetensors"))) == 1
    a, b = _tensors(tmp_path / "plain"), _tensors(tmp_path / "mk")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --random-seed seeds the random methods: the same seed repeats, another differs
    dare = _linear(family, tmp_path, "dare_linear", base_model=str(family["base"][0]))
    for seed, out in (("3", "s3"), ("3", "s3b"), ("4", "s4")):
        code, _, err = run_cli(capsys, "merge", dare, tmp_path / out, "--random-seed", seed, "--no-progress")
        assert code == 0, err
    s3, s3b, s4 = (_tensors(tmp_path / o) for o in ("s3", "s3b", "s4"))
    k = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(s3[k], s3b[k]) and not torch.equal(s3[k], s4[k])


def test_mergekit_flags_that_cannot_work_are_named(family, tmp_path, capsys):
    cfg = _linear(family, tmp_path)
    cases = [(["--trust-remote-code"], "never runs code from a model's folder"),
             (["--compres-rate", "0.5"], "No such option: --compres-rate (did you mean --compress-rate?)"),
             ([tmp_path / "other"], "two outputs"),
             (["--out-shard-size", "5X"], "--out-shard-size '5X'"),
             (["--out-shard-size"], "--out-shard-size needs a value"),
             (["--random-seed", "x"], "--random-seed 'x' is not an integer"),
             ([tmp_path / "o2", tmp_path / "o3"], "unexpected extra argument")]
    for extra, needle in cases:
        args = ["merge", cfg, *(["-o", tmp_path / "out"] if extra[0] != tmp_path / "o2" else []), *extra]
        code, _, err = run_cli(capsys, *args)
        assert code == 2 and needle in " ".join(err.split()), (extra, err)
        assert not (tmp_path / "out").exists()
    code, _, err = run_cli(capsys, "merge", cfg)
    assert code == 2 and "give the output folder" in err


def test_mergekit_moe_and_multimerge_lines(family, tmp_path, capsys):
    a = str(family["a"][0])
    moe = tmp_path / "moe.yml"
    moe.write_text(yaml.safe_dump({"base_model": a, "gate_mode": "random", "dtype": "float32",
                                   "experts": [{"source_model": a}, {"source_model": a}]}))
    code, _, err = run_cli(capsys, "moe", moe, tmp_path / "moe", "--i-understand-this-is-not-useful-without-training",
                           "--out-shard-size", "50K", "--random-seed", "7", "--no-progress")
    assert code == 0, err
    assert len(list((tmp_path / "moe").glob("*.safetensors"))) > 1
    code, _, err = run_cli(capsys, "moe", moe, tmp_path / "moe2", "--random-seed", "8", "--no-progress")
    g7, g8 = (_tensors(tmp_path / m)["model.layers.0.mlp.gate.weight"] for m in ("moe", "moe2"))
    assert code == 0 and not torch.equal(g7, g8)
    # mergekit-multimerge's --out-path, and a merge flag that changes every merge's fingerprint
    docs = [{"name": "ab", "merge_method": "linear", "dtype": "float32",
             "models": [{"model": str(family[n][0])} for n in "ab"]},
            {"merge_method": "linear", "dtype": "float32", "models": [{"model": "ab"}, {"model": a}]}]
    multi = tmp_path / "multi.yml"
    multi.write_text(yaml.safe_dump_all(docs))
    args = ["multimerge", multi, "-I", tmp_path / "inter", "--out-path", tmp_path / "final", "--no-progress"]
    code, out, err = run_cli(capsys, *args, "--lazy-unpickle")
    assert code == 0 and out.count("built") == 2, err
    code, out, err = run_cli(capsys, *args, "--out-shard-size", "20K", "--force")
    assert code == 0 and out.count("built") == 2, err  # (another shard size: another output, so rebuilt)
    assert len(list((tmp_path / "final").glob("*.safetensors"))) > 3
    code, _, err = run_cli(capsys, *args, tmp_path / "extra")
    assert code == 2 and "unexpected extra argument" in err


def test_mergekit_extract_lora_option_names(family, tmp_path, capsys):
    ft, base = family["a"][0], family["base"][0]
    code, _, err = run_cli(capsys, "extract-lora", ft, "--base", base, "-o", tmp_path / "ours", "--rank", "4",
                           "--include", "q_proj", "--no-progress")
    assert code == 0, err
    code, _, err = run_cli(capsys, "extract-lora", "--model", ft, "--base-model", base, "--out-path", tmp_path / "mk",
                           "--max-rank", "4", "--include-regex", "q_proj", "--distribute-scale", "--no-progress")
    assert code == 0, err
    a, b = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "mk"))
    assert a.keys() == b.keys() and all("q_proj" in k for k in a) and all(torch.equal(a[k], b[k]) for k in a)
    code, _, err = run_cli(capsys, "extract-lora", "--base-model", base, "--out-path", tmp_path / "x")
    assert code == 2 and "give the fine-tuned model folder" in err
