"""Reading the shared hparams into the common routines' settings."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from workers.editing.common.targets import TargetSettings
from workers.editing.hparams import LocateEditHParams


class EditError(ValueError):
    """A request or hparams combination the method cannot run."""


def target_settings(model: PreTrainedModel, hp: LocateEditHParams) -> TargetSettings:
    """The v* optimisation's settings of a locate-then-edit method's hparams."""
    n_layers = int(model.config.num_hidden_layers)
    loss_layer = n_layers - 1 if hp.v_loss_layer is None else hp.v_loss_layer
    for layer in (*hp.layers, loss_layer):
        if layer >= n_layers:
            raise EditError(f"layer {layer} is out of range: the model has {n_layers} layers")
    return TargetSettings(
        steps=hp.v_num_grad_steps,
        lr=hp.v_lr,
        loss_layer=max(loss_layer, max(hp.layers)),
        weight_decay=hp.v_weight_decay,
        clamp_norm_factor=hp.clamp_norm_factor,
        kl_factor=hp.kl_factor,
        prob_threshold=hp.v_prob_threshold,
        fact_token=hp.fact_token,
    )


def second_moment_or_identity(ctx, param: str, d_in: int, use_stats: bool) -> torch.Tensor:
    """C = E[k kᵀ] from the context's statistics provider (fp64), or I."""
    if not use_stats:
        return torch.eye(d_in, dtype=torch.float64)
    c = ctx.second_moment(param).to(torch.float64)
    if tuple(c.shape) != (d_in, d_in):
        raise EditError(f"statistics of {param} have shape {tuple(c.shape)}, expected {d_in}²")
    return c
