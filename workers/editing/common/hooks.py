"""Forward hooks and temporary model state that are always undone.

Every helper here is a context manager: hooks are removed, weights restored and
flags reset in ``finally``, whatever happens inside the block (the Editor protocol
promises a bit-identical model back; cf. kmeng01/memit ``util/nethook.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from workers.editing.types import LowRankUpdate, low_rank_dense


class StopForward(Exception):  # noqa: N818 - a control-flow signal, not an error
    """Raised by a hook to end a forward pass once the last needed module has run."""


def get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise KeyError(f"model has no module {name!r}") from None


def get_parameter(model: nn.Module, name: str) -> nn.Parameter:
    try:
        return model.get_parameter(name)
    except AttributeError:
        raise KeyError(f"model has no parameter {name!r}") from None


def first_tensor(output: object) -> torch.Tensor:
    """A module's main output: the tensor itself or the first element of a tuple
    (GPT-J's blocks return ``(hidden, ...)``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, tuple | list) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find the hidden-state tensor in a {type(output).__name__}")


def replace_first(output: object, tensor: torch.Tensor) -> object:
    if isinstance(output, torch.Tensor):
        return tensor
    return (tensor, *output[1:])


@contextmanager
def forward_hooks(
    model: nn.Module,
    *,
    record_inputs: Sequence[str] = (),
    record_outputs: Sequence[str] = (),
    edit_outputs: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    stop_after: str | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Record module inputs (first positional argument) and outputs (main tensor),
    optionally rewrite outputs, and optionally stop the forward pass after a module.

    Yields a dict filled during the forward pass: ``"in:<name>"`` / ``"out:<name>"``
    → tensor (not detached: the caller decides). ``edit_outputs[name](hidden)``
    returns the replacement hidden-state tensor. With ``stop_after`` set the
    forward raises :class:`StopForward` after that module; catch it with
    :func:`run_forward`.
    """
    seen: dict[str, torch.Tensor] = {}
    handles: list[torch.utils.hooks.RemovableHandle] = []
    edit_outputs = dict(edit_outputs or {})

    def pre_hook(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            seen[f"in:{name}"] = args[0]

        return hook

    def post_hook(name: str):
        def hook(_module: nn.Module, _args: tuple, output: object) -> object:
            new_output = output
            if name in edit_outputs:
                new_output = replace_first(output, edit_outputs[name](first_tensor(output)))
            if name in record_outputs:
                seen[f"out:{name}"] = first_tensor(new_output)
            if name == stop_after:
                raise StopForward(name)
            return new_output if new_output is not output else None

        return hook

    try:
        for name in record_inputs:
            handles.append(get_module(model, name).register_forward_pre_hook(pre_hook(name)))
        post = set(record_outputs) | set(edit_outputs) | ({stop_after} if stop_after else set())
        for name in post:
            handles.append(get_module(model, name).register_forward_hook(post_hook(name)))
        yield seen
    finally:
        for h in handles:
            h.remove()


def run_forward(module: nn.Module, **inputs: torch.Tensor) -> object | None:
    """Call ``module(**inputs)``; return None if a hook stopped it with StopForward."""
    try:
        return module(**inputs)
    except StopForward:
        return None


@contextmanager
def frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients inside the block; the flags come back after."""
    was_training = model.training
    needs_grad = [p for p in model.parameters() if p.requires_grad]
    try:
        model.eval()
        for p in needs_grad:
            p.requires_grad_(False)
        yield
    finally:
        for p in needs_grad:
            p.requires_grad_(True)
        model.train(was_training)


@contextmanager
def patched_weights(model: nn.Module) -> Iterator[Callable[[LowRankUpdate], None]]:
    """Lets the caller add low-rank updates to weights temporarily.

    Yields ``apply(update)``, which adds ``update.dense()`` to the parameter in fp32
    (as the runtime will) and keeps a pristine copy the first time a parameter is
    touched. Every touched parameter is copied back bit for bit on exit.
    """
    originals: dict[str, torch.Tensor] = {}

    def apply(update: LowRankUpdate) -> None:
        p = get_parameter(model, update.param)
        if update.param not in originals:
            originals[update.param] = p.detach().clone()
        dense = low_rank_dense(update.left, update.right).to(p.device)
        with torch.no_grad():
            p.copy_((p.detach().to(torch.float32) + dense).to(p.dtype))

    try:
        yield apply
    finally:
        with torch.no_grad():
            for name, value in originals.items():
                get_parameter(model, name).copy_(value)
