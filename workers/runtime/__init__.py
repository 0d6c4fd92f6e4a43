"""The model runtime: one loaded model whose weights equal a ledger version exactly
(:class:`ModelRuntime`, in :mod:`workers.runtime.model`; its docstring has the rules).

- :mod:`~workers.runtime.model` — the runtime: sync, stage, commit, discard, drift;
- :mod:`~workers.runtime.states` — method state besides the weights;
- :mod:`~workers.runtime.snapshots` — the snapshot format;
- :mod:`~workers.runtime.hashing` — tensor hashes;
- the version tree it rebuilds from is the ledger's (:mod:`service.ledger.records`).
"""

from service.ledger.records import ChainError, VersionRecord, plan_replay
from workers.runtime.hashing import IntegrityError, tensor_sha256
from workers.runtime.model import Drift, ModelRuntime, Staged, SyncReport
from workers.runtime.states import AuxState, ChainState, ModuleStates

__all__ = [
    "AuxState",
    "ChainError",
    "ChainState",
    "Drift",
    "IntegrityError",
    "ModelRuntime",
    "ModuleStates",
    "Staged",
    "SyncReport",
    "VersionRecord",
    "plan_replay",
    "tensor_sha256",
]
