"""Second-moment statistics C = E[k kᵀ] of the MLP output projections' inputs.

ROME (eq. 2) and MEMIT (eq. 14) weigh an update by C, the uncentred second moment
of the keys a layer sees on ordinary text (kmeng01/rome ``rome/layer_stats.py``
collects it over Wikipedia). Here:

- **corpora** (:func:`parse_corpus`): ``"self"`` — text the model samples itself,
  the offline default; ``"file:<path>"`` — a local text file or folder of ``.txt``
  / ``.jsonl`` files; ``"hf:<name>[:<config>[:<split>]]"`` — a Hugging Face dataset
  via ``datasets.load_dataset`` (a hub id, or a local folder / data file; with
  ``HF_HUB_OFFLINE=1`` nothing is downloaded);
- **one pass for several layers**: pre-hooks on every requested projection
  accumulate kᵀk per batch in fp32 into fp64 sums; a text corpus is run forward only
  up to the deepest requested layer; a self-sampled corpus is collected *while* it is
  generated (sampling needs the full forward anyway), batched with a KV cache;
- **a cache** (:class:`StatsCache`): one safetensors file per (model fingerprint,
  parameter, corpus, sample count, sequence length, seed), optionally backed by a
  store shared between processes (:class:`SharedStats`).

``n_samples`` counts sequences (as ``mom2_n_samples`` in ROME/MEMIT/EasyEdit) and
``sample_tokens`` their length in tokens; the statistics use every position
except a sequence's first (the start token, an attention sink unlike text).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from safetensors.torch import load, load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from workers.editing.common.hooks import forward_hooks, get_module, run_forward
from workers.editing.common.sampling import sample
from workers.editing.common.tokens import pad_id, pad_right
from workers.models.profiles import profile_for

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
T = TypeVar("T")
# a computation in steps: yields (fraction done, message) after each step, returns T
Steps = Generator[tuple[float, str], None, T]
SELF_BATCH = 64  # sequences sampled at once (KV cache); measured in docs/editing.md
TEXT_BATCH = 32


class StatsError(ValueError):
    pass


@dataclass(frozen=True)
class CorpusSpec:
    kind: str  # "self" | "file" | "hf"
    location: str = ""  # path or dataset name
    config: str | None = None
    split: str = "train"

    @property
    def slug(self) -> str:
        """Short, filename-safe and unique name of the corpus."""
        if self.kind == "self":
            return "self"
        raw = f"{self.kind}:{self.location}:{self.config}:{self.split}"
        readable = re.sub(r"[^A-Za-z0-9]+", "-", Path(self.location).name or self.location)
        return f"{self.kind}-{readable[:40]}-{hashlib.sha256(raw.encode()).hexdigest()[:10]}"


def parse_corpus(spec: str) -> CorpusSpec:
    if spec == "self":
        return CorpusSpec("self")
    if spec.startswith("file:") and len(spec) > 5:
        return CorpusSpec("file", spec[5:])
    if spec.startswith("hf:") and len(spec) > 3:
        parts = spec[3:].split(":")
        if len(parts) > 3 or not parts[0]:
            raise StatsError(f"corpus {spec!r}: expected hf:<name>[:<config>[:<split>]]")
        config = parts[1] if len(parts) > 1 and parts[1] else None
        split = parts[2] if len(parts) > 2 and parts[2] else "train"
        return CorpusSpec("hf", parts[0], config, split)
    raise StatsError(f"unknown corpus {spec!r}: use 'self', 'file:<path>' or 'hf:<name>'")


# -- accumulation ---------------------------------------------------------------------------


class _Accumulator:
    """Σ k kᵀ and the count per module, from a pre-hook on each module; only the
    positions in ``self.mask`` ([B, S] bool, None = skip the call) count. Partial
    sums are kept in fp32 for at most ``FLUSH_KEYS`` keys, then added to fp64 totals."""

    FLUSH_KEYS = 8192

    def __init__(self, modules: Sequence[str]) -> None:
        self.modules = list(modules)
        self.sums: dict[str, torch.Tensor] = {}
        self.partial: dict[str, torch.Tensor] = {}
        self.count = 0
        self.pending = 0
        self.mask: torch.Tensor | None = None

    def collect(self, seen: dict[str, torch.Tensor]) -> None:
        if self.mask is None:
            return
        for name in self.modules:
            k = seen.pop(f"in:{name}")[self.mask].to(torch.float32)
            if name in self.partial:
                self.partial[name].addmm_(k.T, k)
            else:
                self.partial[name] = k.T @ k
        n = int(self.mask.sum())
        self.count += n
        self.pending += n
        if self.pending >= self.FLUSH_KEYS:
            self.flush()

    def flush(self) -> None:
        for name, part in self.partial.items():
            if name in self.sums:
                self.sums[name] += part.to(torch.float64)
            else:
                self.sums[name] = part.to(torch.float64)
            part.zero_()
        self.pending = 0

    def moments(self) -> dict[str, torch.Tensor]:
        self.flush()
        if self.count == 0:
            raise StatsError("the corpus gave no tokens")
        return {n: (s / self.count).to(torch.float32).cpu() for n, s in self.sums.items()}


def _start_token(tok: PreTrainedTokenizerBase) -> int:
    """The token a document starts after: ``<|endoftext|>`` when the vocabulary has it
    (GPT-2, SmolLM2, …), else BOS, else EOS."""
    vocab = tok.get_vocab()
    for candidate in ("<|endoftext|>",):
        if candidate in vocab:
            return int(vocab[candidate])
    for candidate in (tok.bos_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise StatsError("the tokenizer has no start token to sample from")


def _collect_self(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    modules: Sequence[str],
    n_samples: int,
    sample_tokens: int,
    seed: int,
    batch_size: int = SELF_BATCH,
) -> Steps[tuple[dict[str, torch.Tensor], int]]:
    acc = _Accumulator(modules)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    start = _start_token(tok)
    done = 0
    while done < n_samples:
        b = min(batch_size, n_samples - done)
        # hooks only while a batch runs: between steps the model is the caller's
        with torch.no_grad(), forward_hooks(model, record_inputs=modules) as seen:

            def on_step(i: int, b: int = b) -> None:
                # the hooks of forward i have fired by the time forward i + 1 starts
                if i > 0:
                    acc.collect(seen)
                acc.mask = None if i == 0 else torch.ones(b, 1, dtype=torch.bool)

            sample(model, tok, [[start]] * b, sample_tokens, generator=generator,
                   on_step=on_step)  # fmt: skip
            acc.collect(seen)
            acc.mask = None
        done += b
        yield done / n_samples, f"sampled {done}/{n_samples} sequences"
    return acc.moments(), acc.count


def _iter_texts(spec: CorpusSpec) -> Iterator[str]:
    if spec.kind == "file":
        root = Path(spec.location).expanduser()
        if not root.exists():
            raise StatsError(f"corpus path not found: {root}")
        files = sorted(root.rglob("*")) if root.is_dir() else [root]
        for path in files:
            if path.suffix == ".jsonl":
                with path.open(encoding="utf-8") as f:
                    for line in f:
                        if line.strip():
                            yield str(json.loads(line).get("text", ""))
            elif path.suffix in (".txt", "") and path.is_file():
                yield from path.read_text(encoding="utf-8").split("\n\n")
        return
    if spec.kind == "hf":
        import datasets  # optional, heavy: only for this corpus kind

        ds = datasets.load_dataset(spec.location, spec.config, split=spec.split)
        column = "text" if "text" in ds.column_names else ds.column_names[0]
        for row in ds:
            yield str(row[column])
        return
    raise StatsError(f"not a text corpus: {spec}")


def _collect_text(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    modules: Sequence[str],
    stop_after: str,
    spec: CorpusSpec,
    n_samples: int,
    sample_tokens: int,
) -> Steps[tuple[dict[str, torch.Tensor], int]]:
    acc = _Accumulator(modules)
    device = next(model.parameters()).device
    pending: list[list[int]] = []
    done = 0

    def flush() -> None:
        batch = pad_right(pending, pad_id(tok)).to(device)
        mask = batch.attention_mask.bool()
        mask[:, 0] = False
        acc.mask = mask
        with (
            torch.no_grad(),
            forward_hooks(model, record_inputs=modules, stop_after=stop_after) as seen,
        ):
            run_forward(model.base_model, input_ids=batch.input_ids,
                        attention_mask=batch.attention_mask, use_cache=False)  # fmt: skip
            acc.collect(seen)
        pending.clear()

    for text in _iter_texts(spec):
        ids = tok(text, truncation=True, max_length=sample_tokens)["input_ids"]
        if len(ids) < 2:
            continue
        pending.append(list(ids))
        done += 1
        if len(pending) == TEXT_BATCH:
            flush()
            yield min(1.0, done / n_samples), f"read {done}/{n_samples} texts"
        if done >= n_samples:
            break
    if pending:
        flush()
    if done < n_samples:
        log.warning("corpus %s gave %d texts, fewer than %d", spec, done, n_samples)
    yield 1.0, f"read {done} texts"
    return acc.moments(), acc.count


def second_moment_steps(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    params: Sequence[str],
    corpus: str,
    n_samples: int,
    sample_tokens: int,
    *,
    seed: int = 0,
) -> Steps[tuple[dict[str, torch.Tensor], int]]:
    """:func:`compute_second_moments` one batch at a time: a generator that yields
    ``(fraction, message)`` after each batch and returns the moments and the key
    count. No hook stays on the model between steps, so the caller may use the
    model in between (a worker answers reads there); the result does not depend
    on it as long as the weights are left as they were."""
    profile = profile_for(model)
    modules = [p.removesuffix(".weight") for p in params]
    layers = [profile.layer_of_param(p) for p in params]
    if any(layer is None for layer in layers):
        raise StatsError(f"not all of {list(params)} are layer parameters")
    for m in modules:
        get_module(model, m)  # fail early on a wrong name
    spec = parse_corpus(corpus)
    if spec.kind == "self":
        moments, count = yield from _collect_self(
            model, tok, modules, n_samples, sample_tokens, seed
        )
    else:
        deepest = modules[layers.index(max(layers))]
        moments, count = yield from _collect_text(
            model, tok, modules, deepest, spec, n_samples, sample_tokens
        )
    return {p: moments[m] for p, m in zip(params, modules, strict=True)}, count


def run_steps(steps: Steps[T], progress: Progress | None = None) -> T:
    """Run a step generator to its end, reporting each step to ``progress``."""
    while True:
        try:
            fraction, message = next(steps)
        except StopIteration as done:
            return done.value
        if progress is not None:
            progress(fraction, message)


def compute_second_moments(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    params: Sequence[str],
    corpus: str,
    n_samples: int,
    sample_tokens: int,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], int]:
    """E[k kᵀ] [d_in, d_in] fp32 for each ``params`` (MLP output projection weights),
    in one pass over the corpus; also the number of keys used."""
    steps = second_moment_steps(model, tok, params, corpus, n_samples, sample_tokens, seed=seed)
    return run_steps(steps, progress)


# -- cache ----------------------------------------------------------------------------------


class SharedStats(Protocol):
    """Where other processes' statistics are found and this one's are offered: the
    service backs it with its ledger and artifact store, so that every worker of a
    base model (a replica, another machine) uses the same statistics. ``key`` names
    one file: ``fingerprint``, ``param``, ``corpus``, ``n_samples``,
    ``sample_tokens`` and ``seed``, all strings."""

    def fetch(self, key: Mapping[str, str]) -> bytes | None: ...
    def publish(self, key: Mapping[str, str], data: bytes) -> None: ...


class StatsCache:
    """Second moments on disk, one safetensors file each, under
    ``root / <model fingerprint> /``; and in memory once read. With ``shared``, a
    file missing here is looked for there before it is computed, and a computed one
    is offered there."""

    def __init__(
        self, root: Path | str, model_fingerprint: str, shared: SharedStats | None = None
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", model_fingerprint):
            raise StatsError(f"model fingerprint {model_fingerprint!r} is not filename-safe")
        self.fingerprint = model_fingerprint
        self.dir = Path(root) / model_fingerprint
        self.shared = shared
        self._memory: dict[Path, torch.Tensor] = {}

    def key(
        self, param: str, corpus: str, n_samples: int, sample_tokens: int, seed: int
    ) -> dict[str, str]:
        """What names one statistics file wherever it is kept (:class:`SharedStats`)."""
        return {
            "fingerprint": self.fingerprint,
            "param": param,
            "corpus": corpus,
            "n_samples": str(n_samples),
            "sample_tokens": str(sample_tokens),
            "seed": str(seed),
        }

    def _from_shared(self, key: Mapping[str, str], path: Path) -> torch.Tensor | None:
        blob = self.shared.fetch(key) if self.shared is not None else None
        if blob is None:
            return None
        tensor = load(blob)["mom2"]
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(blob, path)
        log.info("statistics of %s read from the shared store", key["param"])
        return tensor

    def path(self, param: str, corpus: str, n_samples: int, sample_tokens: int, seed: int) -> Path:
        slug = parse_corpus(corpus).slug
        return self.dir / f"{param}__{slug}__n{n_samples}_t{sample_tokens}_s{seed}.safetensors"

    def get_or_compute(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        params: Sequence[str],
        corpus: str,
        n_samples: int,
        sample_tokens: int,
        *,
        seed: int = 0,
        progress: Progress | None = None,
    ) -> dict[str, torch.Tensor]:
        """C for each parameter: from memory, from disk, or computed in one pass
        for all the missing ones and written atomically."""
        steps = self.steps(model, tok, params, corpus, n_samples, sample_tokens, seed=seed)
        return run_steps(steps, progress)

    def steps(
        self,
        model: PreTrainedModel,
        tok: PreTrainedTokenizerBase,
        params: Sequence[str],
        corpus: str,
        n_samples: int,
        sample_tokens: int,
        *,
        seed: int = 0,
    ) -> Steps[dict[str, torch.Tensor]]:
        """:meth:`get_or_compute` as a step generator (see :func:`second_moment_steps`)."""
        out: dict[str, torch.Tensor] = {}
        missing: list[str] = []
        for p in params:
            path = self.path(p, corpus, n_samples, sample_tokens, seed)
            if path in self._memory:
                out[p] = self._memory[path]
            elif path.is_file():
                self._memory[path] = out[p] = load_file(str(path))["mom2"]
            elif (
                found := self._from_shared(
                    self.key(p, corpus, n_samples, sample_tokens, seed), path
                )
            ) is not None:
                self._memory[path] = out[p] = found
            else:
                missing.append(p)
        if missing:
            started = time.perf_counter()
            moments, count = yield from second_moment_steps(
                model, tok, missing, corpus, n_samples, sample_tokens, seed=seed
            )
            seconds = time.perf_counter() - started
            log.info("statistics of %d layers from %d keys in %.1fs", len(missing), count, seconds)
            self.dir.mkdir(parents=True, exist_ok=True)
            for p, c in moments.items():
                path = self.path(p, corpus, n_samples, sample_tokens, seed)
                meta = {
                    "param": p,
                    "corpus": corpus,
                    "n_samples": str(n_samples),
                    "sample_tokens": str(sample_tokens),
                    "seed": str(seed),
                    "keys": str(count),
                    "seconds": f"{seconds:.1f}",
                }
                _save_atomically({"mom2": c.contiguous()}, meta, path)
                self._memory[path] = out[p] = c
                if self.shared is not None:
                    key = self.key(p, corpus, n_samples, sample_tokens, seed)
                    self.shared.publish(key, path.read_bytes())
        yield 1.0, "statistics ready"
        return {p: out[p] for p in params}


def _save_atomically(tensors: dict[str, torch.Tensor], meta: dict[str, str], path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_atomically(data: bytes, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stats_provider(
    cache: StatsCache,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    params: Sequence[str],
    corpus: str,
    n_samples: int,
    sample_tokens: int,
    *,
    seed: int = 0,
    progress: Progress | None = None,
) -> Callable[[str], torch.Tensor]:
    """An ``EditContext.stats_provider``: the first call computes (or loads) the
    statistics of all ``params`` together, so that a MEMIT window costs one pass."""

    def provide(param: str) -> torch.Tensor:
        wanted = list(params) if param in params else [*params, param]
        return cache.get_or_compute(
            model, tok, wanted, corpus, n_samples, sample_tokens, seed=seed, progress=progress
        )[param]

    return provide
