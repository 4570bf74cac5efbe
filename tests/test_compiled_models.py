"""A ``torch.compile``'d model is the model it compiled for every file dynarank reads or writes: an adapter loads into
it with the outputs of the uncompiled model, and a checkpoint names its modules without the compile wrapper, so one
written from a compiled model resumes into an uncompiled one and the other way round.

``backend="eager"`` makes the wrapper (``OptimizedModule``) without the cost of a real compilation."""

from __future__ import annotations

import pytest
import torch

import dynarank
from dynarank import DynaRankConfig, checkpoint, elastic_layers
from tiny_models import randomize_adapters, tiny_bert, token_batch, train_on_one_batch

CONFIG = dict(method="elalora", r=4, target_modules=["query", "value"], target_rank=2, seed=0)
T = 20


def compiled(model):
    return torch.compile(model, backend="eager")


def test_an_adapter_loads_into_a_compiled_model_with_the_outputs_of_the_uncompiled_one(tmp_path):
    trained = dynarank.attach(tiny_bert(), DynaRankConfig(method="dynarank-lora", r=4, target_modules="all-linear"))
    randomize_adapters(trained)
    dynarank.save_adapter(trained, tmp_path / "adapter")
    plain = dynarank.load_adapter(tiny_bert(), tmp_path / "adapter")
    wrapper = compiled(tiny_bert())

    assert dynarank.load_adapter(wrapper, tmp_path / "adapter") is wrapper
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(wrapper(input_ids=ids).logits, plain(input_ids=ids).logits, rtol=0, atol=0)


def _trained(steps: int = 4):
    """(model, controller, optimizer) of an ElaLoRA run some steps in (E apart, ranks moving)."""
    model = dynarank.attach(tiny_bert(seed=0), DynaRankConfig(**CONFIG)).train()
    controller = dynarank.build_controller(model, total_steps=T)
    optimizer = controller.build_optimizer(lr=1e-2)
    train_on_one_batch(model, optimizer, steps)
    return model, controller, optimizer


def _fresh():
    model = dynarank.attach(tiny_bert(seed=1), DynaRankConfig(**CONFIG))
    controller = dynarank.build_controller(model, total_steps=T, restoring=True)
    return model, controller, controller.build_optimizer(lr=1e-2)


@pytest.mark.parametrize("written_from, resumed_into", [("compiled", "plain"), ("plain", "compiled")])
def test_a_checkpoint_names_modules_as_the_uncompiled_model_does_and_resumes_either_way(
    tmp_path, written_from, resumed_into
):
    model, controller, optimizer = _trained()
    saving = compiled(model) if written_from == "compiled" else model
    checkpoint.save(tmp_path, saving, optimizer, None, controller, step=controller.step)
    state, tensors = checkpoint.read(checkpoint.list_checkpoints(tmp_path)[-1])
    assert not [k for k in [*state["layout"], *state["output_scales"], *tensors] if "_orig_mod" in k]

    fresh, fresh_controller, fresh_optimizer = _fresh()
    target = compiled(fresh) if resumed_into == "compiled" else fresh
    checkpoint.restore_model(target, state, tensors)
    checkpoint.restore_training(fresh_optimizer, None, fresh_controller, state, tensors)
    assert {n: layer.slots for n, layer in elastic_layers(fresh).items()} == {
        n: layer.slots for n, layer in elastic_layers(model).items()
    }
    saved = {n: p for n, p in model.named_parameters() if p.requires_grad}
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p, saved[name], rtol=0, atol=0)
    assert fresh_controller.step == controller.step


@pytest.mark.parametrize("method", ["ard", "elalora", "adalora-physical"])
def test_a_controller_built_on_a_compiled_model_controls_the_model_it_compiled(method):
    """build_controller on the wrapper failed for ARD (the wrapper holds no alphas) and gave ElaLoRA's state
    `_orig_mod.` names: it controls the uncompiled model, as if it had been given that."""
    config = DynaRankConfig(method=method, r=4, target_modules=["query", "value"], seed=0)
    model = dynarank.attach(tiny_bert(seed=0), config).train()
    wrapper = compiled(model)
    controller = dynarank.build_controller(wrapper, total_steps=T)
    assert controller.model is model
    assert not any(name.startswith("_orig_mod") for name in controller.layers)
    optimizer = controller.build_optimizer(lr=1e-2)
    wrapper(input_ids=token_batch(batch=8), labels=torch.tensor([0, 1] * 4)).loss.backward()
    optimizer.step()
    assert controller.step == 1
    assert not any(key.startswith("_orig_mod") for key in str(controller.state_dict()).split("'"))
