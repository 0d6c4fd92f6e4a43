"""The API process must not import torch, and of the worker package only the
torch-free hyper-parameters (``workers.editing.hparams``, with which it validates
overrides), the architecture facts their defaults read (``workers.models.profiles``)
and the packages above them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import workers

HPARAMS = "workers.editing.hparams"
# the hparams package's modules, read from the tree: a new one is allowed as it
# appears, a module anywhere else in workers/ is not
_HPARAMS_DIR = Path(workers.__file__).parent / "editing" / "hparams"
ALLOWED_WORKERS = {
    "workers",
    "workers.editing",
    "workers.models",
    "workers.models.profiles",
    HPARAMS,
    *(f"{HPARAMS}.{p.stem}" for p in _HPARAMS_DIR.glob("*.py") if p.stem != "__init__"),
}
# torch, and what would bring it (or is only of use with it)
FORBIDDEN_TOP = ("torch", "transformers", "safetensors", "accelerate")


def _loaded_after(code: str) -> list[str]:
    """The modules of ``workers`` and of FORBIDDEN_TOP that a fresh interpreter has
    loaded after running ``code``."""
    script = code + (
        "\nimport sys\n"
        "print('\\n'.join(sorted(m for m in sys.modules"
        f" if m.split('.')[0] in {('workers', *FORBIDDEN_TOP)!r})))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.split()


def _check(loaded: list[str]) -> None:
    forbidden = [m for m in loaded if m.split(".")[0] in FORBIDDEN_TOP]
    assert forbidden == [], forbidden
    others = [m for m in loaded if m not in ALLOWED_WORKERS]
    assert others == [], f"the API process imports worker modules {others}"


def test_service_api_imports_neither_torch_nor_workers_beyond_the_hparams() -> None:
    # a validation run too, in case the hparams are ever imported lazily again
    loaded = _loaded_after(
        "import service.api, service.cli\n"
        "from service.validation import check_hparams\n"
        "check_hparams('memit', {'v_lr': 0.5, 'layers': [3, 4]})\n"
    )
    _check(loaded)
    assert HPARAMS in loaded and f"{HPARAMS}.easyedit" in loaded


def test_hparams_package_is_torch_free() -> None:
    """The package alone, with its defaults computed (they read the profiles)."""
    loaded = _loaded_after(
        f"from {HPARAMS} import METHODS, defaults_for, hparams_from_easyedit_yaml\n"
        "for m in METHODS:\n"
        "    defaults_for(m, 'gpt2', 12, 3072)\n"
        "    defaults_for(m, 'llama', 30, 1536)\n"
    )
    _check(loaded)
    assert "workers.models.profiles" in loaded
