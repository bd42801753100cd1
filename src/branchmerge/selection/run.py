"""`branchmerge select`: measure every candidate on every task (cached), predict bundle sizes, choose the
set and compress rate that fit the budget, and write merge.yaml, router.yaml, a report and a picture;
with ``verify``, merge the choice and measure the bundle too."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from branchmerge.architectures import for_hf_config
from branchmerge.common import DTYPES
from branchmerge.errors import BranchmergeError, ConfigError, ModelInputError
from branchmerge.io.adapters import ADAPTER_CONFIG, LoraSource, is_adapter, open_model
from branchmerge.io.writer import sha256_file
from branchmerge.selection.choose import Choice, NothingFits, Profile, bundle_bytes, choose
from branchmerge.selection.config import CandidateSpec, SelectConfig
from branchmerge.selection.tasks import LocalTask, read_local_task, write_lm_eval_task

logger = logging.getLogger(__name__)


def shape_profile(spec: CandidateSpec, base: str | None = None
                  ) -> tuple[tuple[tuple[int, int], ...], int, int, list[int] | None]:
    """``(compressed weight shapes, other parameters, weight-file bytes, LoRA ranks)`` from the safetensors
    headers (of ``base`` with the adapter, for a LoRA adapter candidate: the model it makes has its base's
    shapes; its rank on each compressed weight, as :class:`~branchmerge.selection.choose.Profile` takes
    them; zeros for a base candidate, None for another)."""
    src = open_model(spec.name, spec.model, base=base)
    arch = for_hf_config(src.hf_config, source=str(src.path))
    comp, other, ranks = [], 0, []
    for t in src.names():
        shape = src.shape(t)
        if arch.role(t, shape) == "compress":
            comp.append((int(shape[0]), int(shape[1])))
            r = src.change_rank(t) if isinstance(src, LoraSource) else 0
            ranks.append(-1 if r is None else r)
        else:
            other += math.prod(shape)
    lora = ranks if isinstance(src, LoraSource) or spec.role == "base" else None
    return tuple(comp), other, src.base.nbytes() if base else src.nbytes(), lora  # (an adapter: base-sized)


def model_digest(folder: str, base_digest: str | None = None) -> str:
    """What a measurement is cached under: the folder's weights and config (an adapter's, with its base's
    digest)."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    for f in files + [Path(folder) / ("config.json" if base_digest is None else ADAPTER_CONFIG)]:
        h.update(f.name.encode() + sha256_file(f).encode())
    if base_digest is not None:
        h.update(base_digest.encode())
    return h.hexdigest()


def peak_memory(folder: str, dtype: str, device: str = "cpu") -> dict[str, float]:
    """Peak memory (MB) of a fresh process that loads ``folder`` on ``device`` and runs one forward pass:
    its resident ``VmHWM`` (``ru_maxrss`` would start from the parent's size, which a forked child
    inherits) and, on CUDA, ``torch.cuda.max_memory_allocated``."""
    code = ("import json, torch; from transformers import AutoModelForCausalLM as A; "
            f"m = A.from_pretrained({folder!r}, dtype=torch.{dtype}, trust_remote_code=False).eval().to({device!r}); "
            f"torch.no_grad()(m)(torch.tensor([[1, 2, 3]], device={device!r})); "
            "rss = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024; "
            "cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None; "
            "print(json.dumps({'peak_rss_mb': rss, **({'peak_cuda_mb': cuda} if cuda is not None else {})}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=1800,
                         env={"HF_HUB_DISABLE_PROGRESS_BARS": "1", **__import__("os").environ})
    if out.returncode != 0:
        raise ModelInputError(f"{folder} does not load: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def evaluate(model_args: dict[str, Any], tasks: list[str], task_manager: Any, limit: int | None) -> dict[str, float]:
    """Accuracy per task (``acc`` or ``exact_match``) of the ``branchmerge`` lm_eval model; ``task_manager``
    an ``lm_eval.tasks.TaskManager`` (built once per selection: indexing lm_eval's task files takes seconds)."""
    import lm_eval

    from branchmerge.harness import BranchmergeLM

    lm = BranchmergeLM(**model_args)
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, bootstrap_iters=0, task_manager=task_manager)
    out = {}
    for t in tasks:
        r = res["results"][t]
        out[t] = float(next(v for k, v in r.items() if k.split(",")[0] in ("acc", "exact_match")))
    return out


class Selection:
    """One `select` run: the config, its tasks written for lm_eval, cached evaluations."""

    def __init__(self, cfg: SelectConfig, out: Path) -> None:
        self.cfg, self.out = cfg, Path(out)
        self.include = self.out / "tasks"
        self.cache = self.out / "cache"
        self.local: dict[str, LocalTask] = {}
        for t in cfg.tasks:
            if t.path:
                self.local[t.name] = read_local_task(t.name, t.path, t.kind, cfg.dev_items)
        # evaluations are cached per model digest and this key: the tasks, their files' content, the limit
        files = [sha256_file(Path(t.path)) for t in cfg.tasks if t.path]
        self.task_key = hashlib.sha256(json.dumps([self.task_names(), cfg.limit, files]).encode()).hexdigest()[:16]
        self.include.mkdir(parents=True, exist_ok=True)
        for lt in self.local.values():
            write_lm_eval_task(lt, self.include)
        self._task_manager: Any = None
        self._check_tasks()

    @property
    def task_manager(self) -> Any:
        """One ``lm_eval`` TaskManager for every evaluation of this run: the local tasks' folder, and lm_eval's
        own thousands of task files only when a task names one of them (indexing those takes seconds, and
        every ``simple_evaluate`` given no manager would do it again)."""
        if self._task_manager is None:
            from lm_eval.tasks import TaskManager

            self._task_manager = TaskManager(include_path=str(self.include),
                                             include_defaults=any(t.lm_eval for t in self.cfg.tasks))
        return self._task_manager

    def _check_tasks(self) -> None:
        names = [t.lm_eval for t in self.cfg.tasks if t.lm_eval]
        if not names:
            return
        known = set(self.task_manager.all_tasks)
        bad = [n for n in names if n not in known]
        if bad:
            raise ConfigError(f"unknown lm_eval task(s) {bad}; `lm_eval ls tasks` lists them")

    def task_names(self) -> list[str]:
        return [t.lm_eval or t.name for t in self.cfg.tasks]

    def base_of(self, spec: CandidateSpec) -> str | None:
        """The base model folder of a LoRA adapter candidate (its ``base`` candidate's), else None."""
        if not is_adapter(Path(spec.model)):
            return None
        base = next((c for c in self.cfg.candidates if c.name == spec.base), None)
        if spec.role != "finetune" or base is None:
            raise ConfigError(f"candidate {spec.name!r}: {spec.model} is a PEFT adapter: give it `role: finetune` "
                              "and `base:` naming the candidate it was trained on")
        return base.model

    def measure(self, spec: CandidateSpec) -> dict[str, Any]:
        """Accuracy per task (cached per model digest, task content and limit), shapes, bytes, peak RSS (an
        adapter candidate's peak is its base's: merged, it is a model of its base's size)."""
        base = self.base_of(spec)
        comp, other, nbytes, lora = shape_profile(spec, base)
        dense = model_digest(base) if base else None  # (each model's weights are hashed once)
        digest = model_digest(spec.model, dense)
        self.cache.mkdir(parents=True, exist_ok=True)
        f = self.cache / f"{digest[:24]}-{self.task_key}.json"
        acc = (_read_cache(f) or {}).get("accuracy")
        if not isinstance(acc, dict) or not set(self.task_names()) <= set(acc):
            args = {"pretrained": spec.model} if base is None else {"pretrained": base, "peft": spec.model}
            acc = evaluate({**args, "device": self.cfg.device}, self.task_names(), self.task_manager,
                           self.cfg.limit)
            _write_atomic(f, json.dumps({"accuracy": acc}))
        m = self.cache / f"{(dense or digest)[:24]}-mem2-{self.cfg.dtype}-{self.cfg.device.replace(':', '')}.json"
        mem = _read_cache(m)
        if mem is None or not isinstance(mem.get("peak_rss_mb"), (int, float)):
            mem = peak_memory(base or spec.model, self.cfg.dtype, self.cfg.device)
            _write_atomic(m, json.dumps(mem))
        return {"accuracy": acc, "compress_shapes": comp, "other_numel": other, "file_bytes": nbytes,
                "lora_ranks": lora,
                "params": sum(a * b for a, b in comp) + other, **mem}

    def profile(self, spec: CandidateSpec, rec: dict[str, Any]) -> Profile:
        by_domain: dict[str, list[float]] = {}
        for t in self.cfg.tasks:
            by_domain.setdefault(t.area, []).append(rec["accuracy"][t.lm_eval or t.name])
        group = spec.base if spec.role == "finetune" else spec.name
        return Profile(spec.name, group, {d: sum(v) / len(v) for d, v in by_domain.items()},
                       tuple(map(tuple, rec["compress_shapes"])), rec["other_numel"],
                       None if rec.get("lora_ranks") is None else tuple(rec["lora_ranks"]))


def _read_cache(path: Path) -> dict[str, Any] | None:
    """A cache entry, or None when it is missing or unreadable (edited, or from an older layout)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        logger.warning("ignoring the unreadable cache entry %s (%s); measuring again", path, e)
        return None
    return data if isinstance(data, dict) else None


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file and a rename: a run killed meanwhile leaves no half-written file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def run_select(cfg: SelectConfig, out: str | Path, *, verify: bool = False, progress: bool = True) -> dict[str, Any]:
    """Measure, choose, write ``merge.yaml``, ``router.yaml``, ``report.md`` and ``select.png`` into ``out``.

    Raises:
        ConfigError: a bad task file or task name. NothingFits: nothing fits the budget (what the
            smallest set needs is said).
    """
    (Path(out) / "select.json").unlink(missing_ok=True)  # written last: present only after a whole run
    cfg = _import_ggufs(cfg, Path(out) / "models")
    sel = Selection(cfg, Path(out))
    domains = list(dict.fromkeys(t.area for t in cfg.tasks))
    records, errors = {}, {}
    for spec in tqdm(cfg.candidates, desc="measuring candidates", disable=not progress):
        try:
            records[spec.name] = sel.measure(spec)
        except (BranchmergeError, OSError, ValueError, RuntimeError) as e:  # one bad candidate: the rest go on
            errors[spec.name] = str(e)
            logger.warning("candidate %s failed: %s", spec.name, e)
    specs = [s for s in cfg.candidates if s.name in records]
    profiles = [sel.profile(s, records[s.name]) for s in specs]
    esize = DTYPES[cfg.dtype].itemsize
    budget = int((cfg.budget_gb - cfg.kv_headroom_gb) * 1e9)
    if budget <= 0:
        raise NothingFits(f"kv_headroom_gb {cfg.kv_headroom_gb} leaves nothing of budget_gb {cfg.budget_gb}")
    choice = choose(profiles, domains, cfg.compress_rates, budget, esize)
    result = {"domains": domains, "candidates": {p.name: {**records[p.name], "domain_accuracy": dict(p.accuracy),
                                                          "group": p.group} for p in profiles},
              "errors": errors, "choice": choice.__dict__, "budget_gb": cfg.budget_gb, "dtype": cfg.dtype}
    base_of = {s.name: s.base for s in cfg.candidates}
    for s in specs:
        result["candidates"][s.name]["tuned_for"] = s.domain
    for name, rec in result["candidates"].items():
        b = base_of.get(name)
        if b in result["candidates"]:
            rec["gain_over_base"] = {d: rec["domain_accuracy"][d] - result["candidates"][b]["domain_accuracy"][d]
                                     for d in domains}
    result["routing"] = _write_configs(sel, cfg, choice, profiles, domains)
    if verify:
        result["verify"] = _verify(sel, cfg, choice, profiles, domains)
    from branchmerge.selection.report import write_report

    write_report(result, sel.out, esize)
    _write_atomic(sel.out / "select.json", json.dumps(result, indent=2))
    return result


def _import_ggufs(cfg: SelectConfig, folder: Path) -> SelectConfig:
    """GGUF candidates become HF folders under ``folder`` (imported once, at the selection's dtype)."""
    from branchmerge.io.gguf import import_gguf

    cands = []
    for c in cfg.candidates:
        if c.model.endswith(".gguf"):
            dest = folder / c.name
            if not (dest / "config.json").is_file():
                import_gguf(c.model, dest, dtype=cfg.dtype, force=True)
            c = c.model_copy(update={"model": str(dest)})
        cands.append(c)
    return cfg.model_copy(update={"candidates": cands})


def _winners(choice: Choice, profiles: list[Profile], domains: list[str]) -> dict[str, str]:
    """The chosen branch that answers each domain (its best)."""
    chosen = [p for p in profiles if p.name in choice.members]
    return {d: max(chosen, key=lambda p: p.accuracy.get(d, 0.0)).name for d in domains}


def _write_configs(sel: Selection, cfg: SelectConfig, choice: Choice, profiles: list[Profile],
                   domains: list[str]) -> dict[str, Any]:
    """Write merge.yaml and router.yaml; returns the routing curve (samples per branch → accuracy)."""
    by = {p.name: p for p in profiles}
    spec = {s.name: s for s in cfg.candidates}
    groups: dict[str, list[str]] = {}
    for n in choice.members:
        groups.setdefault(by[n].group, []).append(n)
    branches = []
    for n in choice.members:
        entry: dict[str, Any] = {"name": n, "model": spec[n].model}
        if (base := sel.base_of(spec[n])) is not None:
            entry["base"] = base
        if len(groups[by[n].group]) == 1 and spec[n].role == "other":
            entry["standalone"] = True
        else:
            entry["group"] = by[n].group
        branches.append(entry)
    merge = {"branches": branches, "compress_rate": choice.rate, "dtype": cfg.dtype}
    _write_atomic(sel.out / "merge.yaml", yaml.safe_dump(merge, sort_keys=False))
    dev, test = _routing_items(sel, cfg, choice, profiles, domains)
    first = spec[choice.members[0]]  # (an adapter's curve is measured on its base: close, and no merged copy)
    curve = routing_curve(sel.base_of(first) or first.model, dev, test, cfg.router_counts) if len(dev) > 1 else {}
    n = recommended_count(curve) or cfg.samples_per_branch
    router = {"samples": {b: qs[:n] or ["TODO: a representative question"] for b, qs in dev.items()},
              "embedder": choice.members[0], "pooling": ROUTER_POOLING, "layer": ROUTER_LAYER}
    _write_atomic(sel.out / "router.yaml", yaml.safe_dump(router, sort_keys=False, allow_unicode=True))
    return {"curve": curve, "recommended": n, "test_items": sum(map(len, test.values()))}


# the embedding settings bench/router.py found best on real questions (template phrase, last token, last layer)
ROUTER_POOLING, ROUTER_LAYER = "last", -1


def _routing_items(sel: Selection, cfg: SelectConfig, choice: Choice, profiles: list[Profile],
                   domains: list[str]) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    """Per chosen branch, router-sample candidates (the dev items of the domains it answers) and held-out
    questions (their evaluated items) to measure routing on."""
    win = _winners(choice, profiles, domains)
    dev: dict[str, list[str]] = {n: [] for n in choice.members}
    test: dict[str, list[str]] = {n: [] for n in choice.members}
    for t in cfg.tasks:
        lt = sel.local.get(t.name)
        if lt is not None:  # dev items only as samples: never the evaluated ones
            test[win[t.area]] += [r["question"] for r in lt.test]
    per_task: dict[str, list[list[str]]] = {n: [] for n in choice.members}
    for t in cfg.tasks:
        lt = sel.local.get(t.name)
        if lt is not None:
            per_task[win[t.area]].append([r["question"] for r in lt.dev])
    for b, lists in per_task.items():  # a branch answering several domains gets samples of each, in turn
        dev[b] = [q for group in itertools.zip_longest(*lists) for q in group if q is not None]
    keep = [b for b in choice.members if dev[b] and test[b]]
    return {b: dev[b] for b in keep}, {b: test[b] for b in keep}


def routing_curve(embedder: str, dev: dict[str, list[str]], test: dict[str, list[str]],
                  counts: list[int]) -> dict[int, float]:
    """Routing accuracy on the held-out questions with the first ``c`` dev questions of each branch as
    samples, for each ``c`` of ``counts`` (capped by the dev items there are)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from branchmerge.router import DEFAULT_PHRASE, DEFAULT_TEMPLATE, Embedder, route

    model = AutoModelForCausalLM.from_pretrained(embedder, dtype=torch.float32, trust_remote_code=False).eval()
    emb = Embedder(model, AutoTokenizer.from_pretrained(embedder, trust_remote_code=False), template=DEFAULT_TEMPLATE,
                   phrase=DEFAULT_PHRASE, pooling=ROUTER_POOLING, layer=ROUTER_LAYER, batch_size=8)
    names = list(dev)
    top = max(counts)
    d_embs = {b: emb.embed(dev[b][:top]) for b in names}
    qs = [(q, i) for i, b in enumerate(names) for q in test[b][:64]]
    q_embs = emb.embed([q for q, _ in qs])
    gold = torch.tensor([i for _, i in qs])
    curve = {}
    for c in sorted(set(min(c, max(len(v) for v in dev.values())) for c in counts)):
        s_embs = torch.cat([d_embs[b][:c] for b in names])
        s_ids = torch.tensor([i for i, b in enumerate(names) for _ in range(min(c, len(dev[b])))])
        choice, _ = route(q_embs, s_embs, s_ids, len(names))
        curve[c] = float((choice == gold).float().mean())
    return curve


def recommended_count(curve: dict[int, float]) -> int | None:
    """The fewest samples per branch within one point of the best routing accuracy."""
    if not curve:
        return None
    best = max(curve.values())
    return min(c for c, a in curve.items() if a >= best - 0.01)


def _verify(sel: Selection, cfg: SelectConfig, choice: Choice, profiles: list[Profile],
            domains: list[str]) -> dict[str, Any]:
    """Merge the choice, build its router, and evaluate the bundle: oracle branch per domain, and auto."""
    import branchmerge
    from branchmerge.config import load_config
    from branchmerge.front import build_bundle_router
    from branchmerge.merge import run_merge
    from branchmerge.router import load_router_config

    bundle = sel.out / "bundle"
    run_merge(load_config(sel.out / "merge.yaml"), bundle, force=True, progress=False)
    b = branchmerge.load(bundle, dtype=cfg.dtype)  # held as it is stored: the memory the budget is about
    build_bundle_router(b, load_router_config(sel.out / "router.yaml"))
    win = _winners(choice, profiles, domains)
    oracle = {}
    for t in cfg.tasks:
        name = t.lm_eval or t.name
        oracle[name] = evaluate({"bundle": str(bundle), "branch": win[t.area]}, [name], sel.task_manager,
                                cfg.limit)[name]
    auto = evaluate({"bundle": str(bundle), "branch": "auto"}, sel.task_names(), sel.task_manager, cfg.limit)
    return {"bundle": str(bundle), "bundle_bytes": b.reader.manifest.total_bytes, "memory_bytes": b.memory_bytes(),
            "predicted_bytes": bundle_bytes([p for p in profiles if p.name in choice.members], choice.rate,
                                            DTYPES[cfg.dtype].itemsize),
            "oracle": oracle, "auto": auto}
