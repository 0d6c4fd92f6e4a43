"""Fixtures every worker test shares: one torch thread, the tiny models' word
tokenizer, a statistics cache folder per module, the tiny LLaMA saved as a model folder."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from service.settings import GuardPolicy, ModelSpec, Settings
from tests.tiny_models import save_tiny, word_tokenizer


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread start-up costs more than it saves on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return word_tokenizer()


@pytest.fixture(scope="module")
def stats_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stats")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA (seed 0) saved once as a local model folder: what the end-to-end
    tests' workers load. Read only (a test that needs other weights saves its own)."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def single_edit_settings(model_settings: Callable[..., Settings], tiny_dir: Path) -> Settings:
    """The tiny LLaMA as model ``tiny``, one edit per version (``max_batch`` 1), no
    guard, reads waiting up to a minute (the reconciler, roles and chaos tests)."""
    spec = ModelSpec(source=str(tiny_dir), max_batch=1, guard=GuardPolicy(enabled=False))
    return model_settings("tiny", spec, sync_timeout_s=60.0)
