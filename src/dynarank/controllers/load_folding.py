"""Weights saved mid-run, loaded into a model whose controller has since dropped its gate.

A rank-changing run computes with a gate until its controller drops it: ARD's mask until the final phase,
the SVD methods' E until the end, when E is folded into the group side. A checkpoint saved before that
point holds weights that are only right together with the gate. When such weights are loaded into a model
that no longer applies the gate (``load_best_model_at_end`` after training, for one), this pre-hook of the
model's ``load_state_dict`` folds the saved gate into the saved group-side weights first, so the model
computes what the checkpoint computed, whatever loads it.

The layers' own load hooks (layer.py) give each layer the saved slot layout; this hook rewrites the
state dict: the group-side columns of layer l are its slots in group order, as the saved ``slot_layout``
says.

A model prepared for a controller not built yet (``prepare_parameters``: E or the alphas exist, the layers have no
gate, as under DynaRankCallback before a Trainer loads its checkpoint) takes the saved gate into those parameters;
this hook then gives its layers the gate the controller gives them, so that the model computes what the saved one
did before the controller exists (the controller, built, sets the same). A model with no place for the gate at all
refuses the load (layer.dropped_gate_error).
"""

from __future__ import annotations

import torch
from torch import nn

from ..attach import elastic_layers
from ..layer import decode_slots
from .ard_gates import ARD_ATTR, mask_gate
from .ard_settings import mask_settings
from .svd import SVD_ATTR, ValuesGate

HOOK_ATTR = "_dynarank_fold_hook"


def install_gate_folding(model: nn.Module) -> None:
    """Register the pre-hook on ``model`` (once)."""
    if getattr(model, HOOK_ATTR, None) is None:
        setattr(model, HOOK_ATTR, model.register_load_state_dict_pre_hook(_fold_dropped_gates))


@torch.no_grad()
def _fold_dropped_gates(model: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    layers = elastic_layers(model)
    values_key = f"{prefix}{SVD_ATTR}.values"
    model_values = getattr(model, SVD_ATTR, None)
    if values_key in state_dict and model_values is not None:
        _gate_ungated(layers, lambda name: ValuesGate(model_values, name))
    elif values_key in state_dict:  # this model's run has folded its E
        values, offset = state_dict.pop(values_key), 0
        for name in layers:
            key = f"{prefix}{name}.group_weight"
            width = state_dict[key].shape[1]
            state_dict[key] = state_dict[key] * values[offset : offset + width].to(state_dict[key].dtype)
            offset += width
    gated_key = f"{prefix}{ARD_ATTR}.gated"
    gates = getattr(model, ARD_ATTR, None)
    # this model's run has reached its final phase (a model made on the meta device has no run: nothing dropped)
    dropped = gates is not None and not gates.gated.is_meta and not bool(gates.gated)
    saved_gated = gated_key in state_dict and bool(state_dict[gated_key])
    if saved_gated and gates is not None and not dropped:
        r0, floor, soft = mask_settings(model.dynarank_config)
        _gate_ungated(layers, lambda name: mask_gate(gates, name, r0, floor, soft_only=soft))
    if saved_gated and dropped:
        r0, floor, soft = mask_settings(model.dynarank_config)
        alpha, start = state_dict[f"{prefix}{ARD_ATTR}.alpha"].float(), 0
        for name, layer in layers.items():
            key = f"{prefix}{name}.group_weight"
            layout = state_dict.get(f"{prefix}{name}.slot_layout")
            ranks = [len(g) for g in decode_slots(layout)] if layout is not None else layer.ranks
            columns = [_mask(r0 * float(alpha[start + g]), r, floor, soft) for g, r in enumerate(ranks)]
            start += layer.n_groups
            if columns:
                state_dict[key] = state_dict[key] * torch.cat(columns).to(state_dict[key])
        state_dict[gated_key] = torch.zeros_like(state_dict[gated_key])


def _gate_ungated(layers: dict[str, nn.Module], make_gate) -> None:
    """Give every layer without a gate ``make_gate(name)``: the gate its controller, not built yet, will give it."""
    for name, layer in layers.items():
        if not layer.has_gate:
            layer.set_gate(make_gate(name))


def _mask(scaled: float, rank: int, floor: int, soft: bool) -> torch.Tensor:
    """The forward value of one group's mask over its ``rank`` slots (ard_gates.mask_gate)."""
    x = scaled - torch.arange(rank, dtype=torch.float32)
    on = torch.arange(rank) < floor
    if soft:
        return torch.where(on, torch.ones_like(x), x.clamp(0.0, 1.0))
    return (on | (x > 0.5)).float()
