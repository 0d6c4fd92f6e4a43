"""The ``downstream`` suite: few-shot classification tasks scored by the model, through
EleutherAI's lm-evaluation-harness (``lm-eval``) with the in-memory model.

Why: sequential editing erodes skills far from the edited facts — sentiment,
paraphrase, entailment, acceptability, MMLU — before the model collapses (Gupta et
al. 2024, "Model editing at scale leads to gradual and catastrophic forgetting";
Lin et al. 2024 on eight downstream tasks). This suite measures those skills on the
task files of ../shared/data/downstream, in the prompt formats of
unified-model-editing's ``glue_eval`` (../shared/data/README.md, "Few-shot prompt
formats"), so every model version gets comparable numbers.

How a local task is scored (docs/evaluation.md has the formats):

- ``<data_dir>/<task>.jsonl``: examples with ``pos`` < 10 are the few-shot pool, the
  rest (``pos`` ≥ 10, in file order, at most ``limit``) are the test examples.
- The prompt is the first ``shots`` pool examples rendered as demonstrations (each
  ending with its gold label word and a newline), then the query. A demonstration
  that would not fit the model's context (its max length less the query and the
  longest label continuation) is dropped with every one after it, as the original.
- lm-eval scores each label word as the continuation ``" " + word`` after the prompt
  (a ``multiple_choice`` task: one log-likelihood request per label) and predicts
  the label with the highest summed log-probability — lm-eval's ``acc`` rule. When
  every label word is one token after the prompt (so for SmolLM2, GPT-2 and LLaMA
  tokenizers on all eight tasks; ``details`` records the counts), that is the same
  choice as the mean per-token log-probability of unified-model-editing's
  ``f1_new``; for longer label words the sum is the probability of the whole word.
- Metrics: weighted F1 over the test examples (scikit-learn's ``average="weighted"``,
  as the studies report) for the two-class tasks, accuracy (and weighted F1) for the
  four-way MMLU and dialogue tasks; ``macro_f1`` is the unweighted mean of the tasks'
  weighted F1s.
- RTE is scored by GLUE's meaning: "True" is the answer for label 0 (entailment).
  unified-model-editing's code says True for label 1 (not_entailment), which asks
  the model to answer the opposite of the question it is shown, and makes a
  degrading model's score rise; the NLI task maps labels correctly in both.

lm-eval does the request building, batching, log-likelihood computation (its
``HFLM`` wraps the model as it is — same device, dtype and object) and the metric
aggregation. Its own few-shot sampler is not used: it renders demonstrations with
the query's template and one delimiter, but unified-model-editing's demonstrations
differ from its queries (SST-2's query has no space after "Review :", CoLA's ends
with a space) and it drops demonstrations by a token budget. So the prompt is built
here and handed to lm-eval as a zero-shot document.

Any other task name is looked up in lm-eval's own task registry (``lm_eval.<name>``
forces that for a name this module shadows, such as ``lm_eval.sst2``) and run with
``shots`` as its ``num_fewshot``, when its data set can be loaded (Hugging Face
``datasets``, which caches on disk as configured by ``HF_DATASETS_CACHE``); a name
that lm-eval does not know, or whose data cannot be reached, raises ``ValueError``.

lm-eval's log records below ERROR and its progress bars are silenced unless the
``lm_eval`` logger has been given a level; nothing is cached on disk for local tasks.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from workers.evaluation.downstream_tasks import (
    LM_EVAL_PREFIX,
    LOCAL_TASKS,
    POOL_SIZE,
    LocalTask,
    Params,
    context_limit,
    label_tokens,
    parse_params,
    read_task_file,
    render_prompt,
)

# rows × tokens per forward pass: bounds the [batch, length, vocab] log-softmax lm-eval
# keeps (4,096 × SmolLM2's 49,152 words × 4 bytes ≈ 0.8 GB)
TOKENS_PER_BATCH = 4096
MAX_BATCH = 32
# lm-eval's fixed seed for named tasks' few-shot sampling (its own default)
FEWSHOT_SEED = 1234

# -- metrics (lm-eval aggregations over (gold, pred) pairs) -------------------------------


def weighted_f1(items: Sequence[tuple[int, int]]) -> float:
    """F1 of each gold class, weighted by its support (scikit-learn's
    ``f1_score(average="weighted")``; a class never predicted nor gold scores 0)."""
    golds = [int(g) for g, _ in items]
    preds = [int(p) for _, p in items]
    if not golds:
        return float("nan")
    total = 0.0
    for c in sorted(set(golds)):
        tp = sum(1 for g, p in zip(golds, preds, strict=True) if g == c and p == c)
        fp = sum(1 for g, p in zip(golds, preds, strict=True) if g != c and p == c)
        fn = sum(1 for g, p in zip(golds, preds, strict=True) if g == c and p != c)
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        total += f1 * (tp + fn)
    return total / len(golds)


def _task_config(task: LocalTask, docs: list[dict]) -> dict[str, Any]:
    """An lm-eval ``multiple_choice`` task config over in-memory documents (each doc
    carries its rendered ``prompt``; ``gold`` is the index of its label word)."""
    import datasets  # noqa: PLC0415  (lm-eval's own dependency; in memory, no cache)

    return {
        "task": f"memedit_{task.name}",
        "custom_dataset": lambda **_: {"test": datasets.Dataset.from_list(docs)},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "prompt",
        "doc_to_target": "gold",
        "doc_to_choice": list(task.choices),
        "target_delimiter": " ",
        "num_fewshot": 0,
        "metric_list": [
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
            {"metric": "f1", "aggregation": weighted_f1, "higher_is_better": True},
            # lm-eval's Brier score of the label distribution (softmax of the labels'
            # log-likelihoods): continuous, so it moves even while the argmax does not
            {"metric": "brier_score", "aggregation": "brier_score", "higher_is_better": False},
        ],
        "metadata": {"version": 1},
    }


# -- running lm-eval ----------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval's INFO/WARNING records and progress bars off, unless its logger was
    configured (a level set on ``lm_eval``)."""
    logger = logging.getLogger("lm_eval")
    if logger.level != logging.NOTSET:
        yield
        return
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bars
            yield
    finally:
        logger.setLevel(logging.NOTSET)


# log-likelihood requests scored between two progress reports, in batches
_REPORT_EVERY_BATCHES = 1

Counted = Callable[[int, int], None]  # (requests scored, requests in all)


def _make_lm(
    model: torch.nn.Module, tok: Any, batch_size: int, counted: Counted | None = None
) -> Any:
    """lm-eval's HFLM over the model as it is (no move, cast or copy); with
    ``counted``, it scores the requests in slices of a few batches and reports after
    each slice."""
    from lm_eval.models.huggingface import HFLM  # noqa: PLC0415  (lm-eval loads slowly)

    step = batch_size * _REPORT_EVERY_BATCHES

    class _HFLM(HFLM):
        # the same computation with its progress bars off, and progress per slice
        def loglikelihood(self, requests: Any, disable_tqdm: bool = False) -> Any:
            if counted is None:
                return super().loglikelihood(requests, disable_tqdm=True)
            out: list[Any] = []
            for start in range(0, len(requests), step):
                out += super().loglikelihood(requests[start : start + step], disable_tqdm=True)
                counted(min(len(requests), start + step), len(requests))
            return out

    if tok.pad_token_id is None:
        # HFLM would add or set a pad token on the tokenizer: give it a copy
        import copy  # noqa: PLC0415

        tok = copy.deepcopy(tok)
    return _HFLM(
        pretrained=model, tokenizer=tok, batch_size=batch_size, softmax_dtype=torch.float32
    )


def _evaluate(lm: Any, task_obj: Any, name: str, limit: int | None) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate  # noqa: PLC0415

    return evaluate(
        lm=lm,
        task_dict={"tasks": {name: task_obj}, "groups": {}},
        limit=limit,
        bootstrap_iters=0,
        log_samples=True,
    )


def _run_local(
    model: torch.nn.Module, tok: Any, task: LocalTask, p: Params, counted: Counted | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    from lm_eval.api.task import ConfigurableTask  # noqa: PLC0415

    assert p.data_dir is not None  # parse_params checked it
    pool, tests = read_task_file(task, p.data_dir / f"{task.name}.jsonl")
    if p.shots > len(pool):
        raise ValueError(f"task {task.name!r} has {len(pool)} few-shot examples, {p.shots} asked")
    if p.limit is not None:
        tests = tests[: p.limit]
    if not tests:
        raise ValueError(f"task {task.name!r} has no test examples (pos ≥ {POOL_SIZE})")
    max_length = context_limit(model)
    docs = []
    for d in tests:
        prompt, kept = render_prompt(task, pool, d, p.shots, tok, max_length)
        docs.append({"prompt": prompt, "demos": kept, "gold": task.gold(d), "pos": d.get("pos")})
    longest = max(len(tok(d["prompt"] + " " + w)["input_ids"]) for d in docs for w in task.choices)
    batch = max(1, min(MAX_BATCH, TOKENS_PER_BATCH // longest))
    task_obj = ConfigurableTask(config=_task_config(task, docs))
    result = _evaluate(_make_lm(model, tok, batch, counted), task_obj, task_obj.config.task, None)
    scores = result["results"][task_obj.config.task]
    acc, f1 = float(scores["acc,none"]), float(scores["f1,none"])
    brier = float(scores["brier_score,none"])
    examples = []
    for s in sorted(result["samples"][task_obj.config.task], key=lambda s: s["doc_id"]):
        lls = [float(r[0]) for r in s["filtered_resps"]]
        examples.append(
            {"pos": s["doc"]["pos"], "gold": s["target"], "pred": _argmax(lls), "lls": lls}
        )
    metrics = {f"{task.name}_f1": f1}
    if task.headline == "acc":
        metrics[f"{task.name}_acc"] = acc
    details = {
        "examples": len(docs),
        "shots": p.shots,
        "acc": acc,
        "f1": f1,
        "brier": brier,
        "headline": task.headline,
        "choices": list(task.choices),
        "label_tokens": dict(zip(task.choices, label_tokens(tok, task), strict=True)),
        "longest_input_tokens": longest,
        # demonstrations that fit the context (fewer than shots: cut by the budget)
        "demos_min": min(d["demos"] for d in docs),
        "predictions": examples,
    }
    return metrics, details


def _argmax(values: Sequence[float]) -> int:
    # first maximum, as numpy's argmax that lm-eval uses
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _run_named(
    model: torch.nn.Module, tok: Any, name: str, p: Params, counted: Counted | None = None
) -> tuple[dict[str, float], dict[str, Any]]:
    """A task from lm-eval's registry, with its own prompts, few-shot sampler and metrics."""
    try:
        loaded = _task_manager().load([name])
    except Exception as exc:  # lm-eval raises KeyError, datasets connection errors, …
        raise ValueError(f"lm-eval task {name!r} could not be loaded: {exc}") from exc
    tasks = loaded.get("tasks") or {}
    if not tasks:
        raise ValueError(f"lm-eval knows no task {name!r}")
    for task_obj in tasks.values():
        if task_obj.get_config("num_fewshot") != 0:
            task_obj.set_config(key="num_fewshot", value=p.shots)
        task_obj.set_fewshot_seed(seed=FEWSHOT_SEED)
    result = _evaluate_loaded(_make_lm(model, tok, 8, counted), loaded, p.limit)
    metrics: dict[str, float] = {}
    per_task: dict[str, Any] = {}
    for sub, scores in result["results"].items():
        per_task[sub] = {k: v for k, v in scores.items() if _finite_number(v)}
        for key, value in scores.items():
            metric, _, filt = key.partition(",")
            if not filt or metric.endswith("_stderr") or not _finite_number(value):
                continue
            label = metric if filt == "none" else f"{metric}_{filt}"
            metrics[f"{sub}_{label}"] = float(value)
    return metrics, {"lm_eval_results": per_task, "shots": p.shots}


@functools.cache
def _task_manager() -> Any:
    """lm-eval's index of its task YAML files (built once: it reads thousands of files)."""
    from lm_eval.tasks import TaskManager  # noqa: PLC0415

    return TaskManager()


def _evaluate_loaded(lm: Any, loaded: Any, limit: int | None) -> dict[str, Any]:
    from lm_eval.evaluator import evaluate  # noqa: PLC0415

    return evaluate(lm=lm, task_dict=loaded, limit=limit, bootstrap_iters=0, log_samples=False)


def _finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# -- the suite ----------------------------------------------------------------------------


def _reporter(
    progress: Callable[[float, str], None] | None, task: str, index: int, tasks: int, began: float
) -> Counted | None:
    """Progress within task ``index`` of ``tasks``: the share of its requests scored,
    with the time left at the pace so far."""
    if progress is None:
        return None

    def counted(done: int, total: int) -> None:
        fraction = (index + done / max(1, total)) / tasks
        elapsed = time.perf_counter() - began
        left = elapsed * (1 - fraction) / fraction if fraction > 0 else None
        eta = "" if left is None else f", about {_duration(left)} left"
        progress(fraction, f"{task} ({index + 1} of {tasks}): {done}/{total} scores{eta}")

    return counted


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def run_suite(
    model: torch.nn.Module,
    tok: Any,
    params: Mapping[str, Any],
    *,
    progress: Callable[[float, str], None] | None = None,
) -> dict[str, Any]:
    """Score the model on the downstream tasks in ``params`` (see the module docstring).

    ``metrics``: ``<task>_f1`` per local task (plus ``<task>_acc`` for MMLU and
    dialogue), lm-eval's metrics of named tasks as ``<task>_<metric>``, and
    ``macro_f1`` (the mean of the tasks' weighted F1s; named tasks take part when
    they report ``f1``). ``details[task]``: examples, shots, per-example predictions
    and label log-likelihoods, seconds.
    """
    p = parse_params(params)
    modes = {m: m.training for m in model.modules()}
    params_before = {n: t for n, t in model.named_parameters(remove_duplicate=False)}
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {}
    f1s: list[float] = []
    began = time.perf_counter()
    try:
        model.eval()
        with _quiet_lm_eval(), torch.inference_mode():
            for i, name in enumerate(p.tasks):
                start = time.perf_counter()
                counted = _reporter(progress, name, i, len(p.tasks), began)
                if name in LOCAL_TASKS:
                    m, d = _run_local(model, tok, LOCAL_TASKS[name], p, counted)
                    f1s.append(m[f"{name}_f1"])
                else:
                    named = name.removeprefix(LM_EVAL_PREFIX)
                    m, d = _run_named(model, tok, named, p, counted)
                    f1s += [v for k, v in m.items() if k.endswith("_f1")]
                d["seconds"] = round(time.perf_counter() - start, 3)
                metrics.update(m)
                details[name] = d
                if progress is not None:
                    progress((i + 1) / len(p.tasks), f"{name} done ({i + 1} of {len(p.tasks)})")
    finally:
        for module, mode in modes.items():
            module.training = mode
    after = dict(model.named_parameters(remove_duplicate=False))
    if after.keys() != params_before.keys() or any(
        after[n] is not t for n, t in params_before.items()
    ):
        raise RuntimeError("lm-eval replaced parameters of the model (tied weights?)")
    if f1s:
        metrics["macro_f1"] = sum(f1s) / len(f1s)
    return {"metrics": metrics, "details": details}
