"""The front object: a loaded bundle with its router and pipelines. It resolves a model name (a branch,
a pipeline or ``auto``) and is what the CLI and the server hold; the runtime below it never routes.

    import branchmerge
    bundle = branchmerge.load("bundle/")                 # a Bundle, its stored router attached
    front = branchmerge.open_front("bundle/")            # bundle + router + pipelines, for front ends
    front.resolve("auto", "What is a myocardial infarction?")   # -> ("medical", None)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from branchmerge.errors import BranchmergeError, BranchNotFoundError, ConfigError
from branchmerge.router import ROUTER_DIR, Embedder, Router, RouterConfig, build_router, folder_identity, load_router
from branchmerge.runtime.bundle import Bundle
from branchmerge.staged import PipelinesConfig, bundle_pipelines

logger = logging.getLogger(__name__)
_external: dict[tuple[str, str, str], tuple[Any, Any, dict[str, Any]]] = {}  # (path, dtype, device) -> loaded
_external_lock = threading.Lock()


def embedder_factory(bundle: Bundle):
    """A function ``cfg -> (Embedder, identity)`` for ``bundle``: a branch of it, or an HF folder
    (loaded once per process, ``trust_remote_code=False``, safetensors only)."""

    def make(cfg: RouterConfig) -> tuple[Embedder, dict[str, Any]]:
        name = cfg.embedder or bundle.branch_names[0]
        if name in bundle.branch_names:
            g = bundle.runtime_group(name)
            ident = {"bundle_branch": name, "shards": sorted(bundle.reader.manifest.shards.values())}
            select = lambda: g.state.select(branch=g.state.index(name))  # noqa: E731
            return Embedder.from_config(g.model, bundle.tokenizer(name), cfg, select=select), ident
        path = _embedder_path(bundle, name)
        if not (path / "config.json").is_file():
            raise ConfigError(f"router embedder {name!r} is neither a branch of the bundle "
                              f"({', '.join(bundle.branch_names)}) nor an HF model folder")
        key = (str(path.resolve()), str(bundle.dtype), str(bundle.device))
        with _external_lock:
            if key not in _external:
                from transformers import AutoModelForCausalLM, AutoTokenizer

                try:
                    model = AutoModelForCausalLM.from_pretrained(path, dtype=bundle.dtype, trust_remote_code=False,
                                                                 use_safetensors=True)
                    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
                except (OSError, ValueError) as e:
                    raise ConfigError(f"router embedder {path} cannot be loaded (safetensors and built-in "
                                      f"architectures only): {e}") from None
                _external[key] = (model.eval().to(bundle.device), tok, folder_identity(path))
        model, tok, ident = _external[key]
        return Embedder.from_config(model, tok, cfg), ident

    return make


def _embedder_path(bundle: Bundle, name: str) -> Path:
    """An embedder folder: absolute; else relative to the bundle when there, else to the working folder."""
    path = Path(name).expanduser()
    if not path.is_absolute() and (bundle.path / path / "config.json").is_file():
        return bundle.path / path
    return path


def build_bundle_router(bundle: Bundle, cfg: RouterConfig) -> Router:
    """Embed ``cfg``'s samples, store them in ``BUNDLE/router/`` and attach the router to ``bundle``.

    An external embedder folder is stored by its absolute path, so the bundle routes from any working
    folder (and keeps routing if the bundle moves, as long as the embedder stays)."""
    if cfg.embedder and cfg.embedder not in bundle.branch_names:
        cfg = cfg.model_copy(update={"embedder": str(_embedder_path(bundle, cfg.embedder).resolve())})
    bundle.router = build_router(bundle.path / ROUTER_DIR, bundle.branch_names, cfg, embedder_factory(bundle))
    return bundle.router


def attach_router(bundle: Bundle, override: RouterConfig | None = None) -> Router | None:
    """Attach the router stored in ``BUNDLE/router/`` (if any) to ``bundle``; see :func:`load_router`."""
    bundle.router = load_router(bundle.path / ROUTER_DIR, bundle.branch_names, embedder_factory(bundle), override)
    return bundle.router


def embed_with(bundle: Bundle, cfg: RouterConfig, texts: Sequence[str], *, templated: bool = True) -> torch.Tensor:
    """``[N, H]`` embeddings of ``texts`` with ``cfg``'s embedder (``templated=False``: the input alone)."""
    embedder, _ = embedder_factory(bundle)(cfg)
    return embedder.embed(list(texts), templated=templated)


def load(path: str | Path, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         verify: bool = True, router: RouterConfig | None = None, fused: bool | None = None,
         factors: str | None = None, kernels: str = "auto", static_cache: bool = False) -> Bundle:
    """Load a bundle with its stored router attached (``branch="auto"`` then routes).

    Args:
        dtype: compute dtype: a name, an alias (``bf16``, ``fp16``, ``auto``) or a torch dtype.
        router: a :class:`~branchmerge.router.RouterConfig` replacing the stored one (its embedder and
            template must be those the stored sample embeddings were made with).
        fused: layout of the branched layers (see :func:`branchmerge.runtime.bundle.load`).
        factors: ``dequantize`` or keep ``quantized`` int8/int4 factors (see the same).
        kernels, static_cache: Triton kernels and static-cache (CUDA-graph) decoding (see the same).

    Raises:
        BundleError: not a bundle, a shard failing its sha256, or a router whose stored embeddings do not
            match the embedder/template.
    """
    bundle = Bundle(path, device=device, dtype=dtype, verify=verify, fused=fused, factors=factors, kernels=kernels,
                    static_cache=static_cache)
    attach_router(bundle, router)
    return bundle


@dataclass
class Front:
    """A bundle with its router (on ``bundle.router``) and pipelines: what a front end serves."""

    bundle: Bundle
    pipelines: PipelinesConfig

    @property
    def router(self) -> Router | None:
        return self.bundle.router  # type: ignore[return-value]

    def model_ids(self) -> list[str]:
        """Every name a request may use as its model: branches, pipelines, and ``auto`` with a router."""
        return [*(b for b in self.bundle.branch_names if b not in self.bundle.retiring),
                *(p.name for p in self.pipelines.pipelines),
                *(["auto"] if self.router is not None else [])]

    def resolve(self, model: str, text: str) -> tuple[str | None, str | None]:
        """``(branch, None)`` or ``(None, pipeline)`` for a request's model name; ``auto`` routes ``text``
        (a routed branch with a pipeline in ``routes`` runs that pipeline).

        Raises:
            BranchmergeError: ``auto`` without a router. BranchNotFoundError: an unknown name.
        """
        if self.pipelines.get(model) is not None:
            return None, model
        if model == "auto":
            return self.route_many([text])[0]
        self.bundle.reader.branch(model)
        if model in self.bundle.retiring:
            raise BranchNotFoundError(f"adapter {model!r} is being unloaded")
        return model, None

    def route_many(self, texts: list[str]) -> list[tuple[str | None, str | None]]:
        """:meth:`resolve` of ``auto`` for several texts in one embedding batch (the server gathers
        concurrent requests' texts into one call)."""
        if self.router is None:
            raise BranchmergeError("model 'auto' needs a router; this bundle has none")
        return [self._target(b) for b in self.router.route(texts)]

    def route_cached(self, text: str) -> tuple[str | None, str | None] | None:
        """:meth:`route_many` of one text the router remembers, without a forward; None when it does not."""
        b = self.router.cached(text) if self.router is not None else None
        return None if b is None else self._target(b)

    def _target(self, branch: str) -> tuple[str | None, str | None]:
        """(branch, None), or (None, pipeline) when a routing rule sends ``branch`` to a pipeline."""
        return (None, self.pipelines.routes[branch]) if branch in self.pipelines.routes else (branch, None)


def open_front(path: str | Path, *, pipelines: PipelinesConfig | None = None, **load_kw: Any) -> Front:
    """Load a bundle (see :func:`load`) with its pipelines (``pipelines`` or ``BUNDLE/pipelines.yaml``)."""
    bundle = load(path, **load_kw)
    return front_for(bundle, pipelines)


def open_adapters_front(base: str | Path, adapters: dict[str, str | Path], work: Path, *, base_name: str = "base",
                        pipelines: PipelinesConfig | None = None, **load_kw: Any) -> Front:
    """A base model folder and its PEFT LoRA ``adapters`` (name → folder) as one served bundle, in ``work``
    (a temporary folder the caller removes): what ``serve BASE --lora-modules`` serves.

    The base alone becomes a bundle and each adapter is loaded into it (:meth:`Bundle.load_lora`: a tenth of
    a second each, where merging them costs a read of the base per adapter). An adapter a loaded one cannot
    be (DoRA, ``modules_to_save``, an embedding LoRA) makes it merge them all at start instead
    (:func:`~branchmerge.merge.merge_adapters`), which keeps every kind; both give the same answers.

    Raises:
        ModelInputError, ConfigError: as the merge's, for adapters that neither way takes.
    """
    import gc
    import shutil

    from branchmerge.merge import merge_adapters

    merge_adapters(base, {}, work / "base", base_name=base_name, progress=False)
    front = open_front(work / "base", pipelines=pipelines, **load_kw)
    try:
        for name, path in adapters.items():
            front.bundle.load_lora(name, path, base=base_name)
        return front
    except BranchmergeError as e:
        logger.info("merging the adapters at start (%s)", e)
    del front
    gc.collect()
    shutil.rmtree(work / "base", ignore_errors=True)
    merge_adapters(base, adapters, work / "merged", base_name=base_name)
    return open_front(work / "merged", pipelines=pipelines, **load_kw)


def is_base_folder(path: str | Path, *, adapters: bool = False) -> bool:
    """Whether ``path`` is opened as a base model in a temporary bundle (:func:`open_base_front`): a plain
    model folder, or (``adapters``: LoRAs go over it) any folder that is not a bundle."""
    return (adapters and not (Path(path) / "manifest.json").is_file()) or is_model_folder(path)


def open_base_front(base: str | Path, stack: ExitStack, *, adapters: dict[str, str | Path] | None = None,
                    **kw: Any) -> Front:
    """:func:`open_adapters_front` in a temporary folder that ``stack`` removes when it closes: how ``serve``,
    ``generate``/``chat`` and ``run-batch`` run a base model folder (with its LoRAs) as a bundle."""
    import tempfile

    work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="branchmerge-base-")))
    return open_adapters_front(base, adapters or {}, work, **kw)


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` is a plain Hugging Face model folder (a ``config.json``, no bundle manifest): what
    ``serve``, ``generate`` and ``run-batch`` open as a bundle of one branch (:func:`open_adapters_front`)."""
    p = Path(path)
    return (p / "config.json").is_file() and not (p / "manifest.json").is_file()


def front_for(bundle: Bundle, pipelines: PipelinesConfig | None = None) -> Front:
    """A :class:`Front` over a loaded bundle; pipelines are checked against its branches."""
    pipes = pipelines if pipelines is not None else bundle_pipelines(bundle)
    pipes.check_branches(bundle.branch_names)
    return Front(bundle, pipes)
