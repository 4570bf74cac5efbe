"""How a rank controller is tied to the optimizers that drive it (:meth:`RankController.bind`, base.py).

* What ``bind`` refuses before anything changes: an optimizer holding none of the controller's model's trainable
  parameters (another model's: the controller would resize a model nothing trains), and, for a method that resizes,
  one whose state cannot follow a resize (``optim_state.unresizable_reason``: Adafactor, 8-bit states), which
  otherwise failed at the first resize, mid-run.
* An optimizer over parameters a bound one already holds replaces it (``build_optimizer()`` or ``bind`` called again):
  the replaced one is unbound and refuses to step from then on, since its tensors stop being the model's at the next
  resize and the controller no longer runs in its step.
* A controller that nothing drives warns once, at the model's first training forward: built, but bound to no
  optimizer, it never steps and the ranks never change (the model is marked controlled, which silences attach's
  warning of a model trained without a controller). A model trained in eval mode (as ``from_pretrained`` gives it)
  makes no training forward: there the warning comes at the first step of an optimizer over its adapters.
* An optimizer over the adapters that the controller is not bound to (another one built over the same parameters,
  the controller bound to the wrong one) warns once, at its first step: the controller does not run in it. What tells
  it from an optimizer that does run the controller (a wrapper stepping the bound one inside its own step) is the
  bound optimizers' step count, unchanged across the step. Gradient accumulation steps no optimizer, so it cannot
  trigger it. Every optimizer's step passes two process-wide hooks (:func:`watch_optimizer_steps`), which judge an
  optimizer at its first step after the bindings last changed and from then on only compare one attribute.
* A step under ``torch.inference_mode()`` is refused: a resize there would make the new adapters inference tensors,
  which the next backward cannot use.
* A load into the model that replaces adapters (their saved slot layout differs) hands the bound optimizers the new
  tensors in the old ones' places (the model's load hooks).
* Every hook a controller puts on its model holds the controller weakly (:func:`hook_on_model`): the model keeps no
  controller alive (nor, through it, the controller's optimizers and the tensors they hold), ``copy.deepcopy(model)``
  copies none, and a dropped controller's hooks do nothing, and are taken off the model when the next controller is
  built on it.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
import weakref
from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.hooks import RemovableHandle

from ..attach import remove_hooks
from ..optim_state import swap_parameter, unresizable_reason

logger = logging.getLogger(__name__)

RETIRED_ATTR = "_dynarank_replaced"  # on an optimizer whose binding a newer one replaced: its refusing hook
JUDGED_ATTR = "_dynarank_judged"  # on an optimizer: the version of the bindings its last judged step ran under
WATCHED_ATTR = "_dynarank_watched"  # on an optimizer, during a judged step: the controllers it may step, weakly
UNBOUND = "unbound"
NOT_BOUND_TO_STEPPED = "stepped-unbound-optimizer"

# model -> the newest controller built on it (weakly: neither is kept alive, nor copied with the model). Only that one
# speaks for the model: an older controller left unbound (one built again, or one whose construction failed) is mute.
_NEWEST: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


_bindings_version = 0  # bumped whenever a controller is built, bound or unbound: every optimizer is judged again
_watching = False  # the process-wide optimizer step hooks are registered


def note_newest(model: nn.Module, controller) -> None:
    _NEWEST[model] = weakref.ref(controller)
    bindings_changed()


def bindings_changed() -> None:
    """A controller was built, bound or unbound: the next step of every optimizer is judged again."""
    global _bindings_version
    _bindings_version += 1


def watch_optimizer_steps() -> None:
    """Register, once per process, the hooks every optimizer step passes (see the module's doc)."""
    global _watching
    if not _watching:
        register_optimizer_step_pre_hook(_before_any_step)
        register_optimizer_step_post_hook(_after_any_step)
        _watching = True


def _before_any_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before an optimizer's first step under the current bindings: the newest rank controller of every model that
    the optimizer is not bound to, with its bound optimizers' step count (held weakly)."""
    if getattr(optimizer, JUDGED_ATTR, None) == _bindings_version:
        return  # every later step: one attribute compared
    watched = []
    for ref in list(_NEWEST.values()):
        controller = ref()
        if controller is not None and controller.resizes_adapters:
            if not any(o is optimizer for o in controller.optimizers):
                watched.append((ref, controller._bound_steps))
    if watched:
        setattr(optimizer, WATCHED_ATTR, watched)
    else:
        setattr(optimizer, JUDGED_ATTR, _bindings_version)


def _after_any_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """After a judged step: a watched controller whose bound optimizers did not step during it, while this optimizer
    holds its adapters, was not run by a step that trained them: said once (:func:`say_not_driven`)."""
    watched = optimizer.__dict__.pop(WATCHED_ATTR, None)
    if watched is None:
        return
    setattr(optimizer, JUDGED_ATTR, _bindings_version)
    held = None
    for ref, bound_steps in watched:
        controller = ref()
        if controller is None or controller._bound_steps != bound_steps:
            continue  # gone, or it ran inside this step (a wrapper stepping the bound optimizer)
        held = held_ids(optimizer) if held is None else held
        if any(id(p) in held for layer in controller.layers.values() for p in layer.factors()):
            say_not_driven(controller)


def say_not_driven(controller) -> None:
    """Warn, once per controller and kind, that the controller does not run while its model trains: it is bound to no
    optimizer, or an optimizer it is not bound to stepped the adapters."""
    kind = NOT_BOUND_TO_STEPPED if controller.optimizers else UNBOUND
    if kind in controller._said_not_driven:
        return
    controller._said_not_driven.add(kind)
    method = controller.config.method
    if kind == UNBOUND:
        controller.forget_unbound_hook()
        message = (
            f"dynarank: the rank controller of this model (method {method!r}) is bound to no optimizer, so it never "
            "runs: its step stays at 0 and the ranks stay where they start. Bind the optimizer that trains the model "
            "before training: controller.bind(optimizer), or build it with controller.build_optimizer()."
        )
    else:
        message = (
            f"dynarank: an optimizer that the rank controller of this model (method {method!r}) is not bound to "
            f"stepped its adapters, so the controller did not run: its step stays at {controller.step} and the ranks "
            "do not move while that optimizer trains them (and after a resize, its tensors are no longer the "
            "model's). Step the optimizer the controller is bound to (controller.optimizers), or bind the one you "
            "step: controller.bind(optimizer), which replaces the one bound before over the same parameters."
        )
    warnings.warn(message, UserWarning, stacklevel=_callers_level())


# Where a warning said from inside a forward or an optimizer step points: the first frame outside torch and dynarank.
_LIBRARIES = (os.path.dirname(torch.__file__) + os.sep, os.path.dirname(os.path.dirname(__file__)) + os.sep)


def _callers_level() -> int:
    """The ``stacklevel`` (for a warning said by the caller of this function) of the first frame outside torch and
    dynarank: the user's line that ran the forward or stepped the optimizer."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_LIBRARIES):
        frame, level = frame.f_back, level + 1
    return level


def held_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    """Ids of every parameter ``optimizer`` holds."""
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def check_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, method: str, resizes: bool) -> None:
    """ValueError, before anything is bound, if ``optimizer`` cannot drive the controller of ``model``: it holds none
    of the model's trainable parameters, or (``resizes``) its state cannot follow a resize."""
    held = held_ids(optimizer)
    if not any(id(p) in held for p in model.parameters() if p.requires_grad):
        raise ValueError(
            "the optimizer holds none of this controller's model's trainable parameters (is it another model's?): "
            "the controller would resize a model that nothing trains. Bind the optimizer that trains this model, built "
            "over controller.param_groups(lr), or use controller.build_optimizer()."
        )
    reason = unresizable_reason(optimizer) if resizes else None
    if reason is not None:
        cls = type(optimizer)
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} {reason}, which cannot follow {method}'s resizes of the adapters "
            "(their optimizer state is carried across each resize entry by entry). Use an optimizer whose state is "
            "one entry per parameter entry: AdamW, Adam, SGD, Adagrad, RMSprop, Lion, or bitsandbytes' 32-bit ones."
        )


def retire(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``, whose binding a newer optimizer replaced, refuse to step (:func:`reinstate` undoes it)."""
    if getattr(optimizer, RETIRED_ATTR, None) is None:
        setattr(optimizer, RETIRED_ATTR, optimizer.register_step_pre_hook(_refuse_retired_step))


def reinstate(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer`` is bound again: it steps as any other."""
    handle = getattr(optimizer, RETIRED_ATTR, None)
    if handle is not None:
        handle.remove()
        setattr(optimizer, RETIRED_ATTR, None)


def _refuse_retired_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    raise RuntimeError(
        "this optimizer was replaced: the rank controller was bound to a newer optimizer over the same parameters "
        "(build_optimizer() or bind() called again), so the controller no longer runs in this one's step, and its "
        "tensors stop being the model's at the next resize. Step the newer optimizer (or bind this one again)."
    )


def refuse_inference_mode() -> None:
    """RuntimeError if the controller's step would run under ``torch.inference_mode()`` (see the module's doc)."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "optimizer.step() ran under torch.inference_mode(): the rank controller resizes the adapters inside the "
            "step, and tensors made in inference mode cannot be trained afterwards (the next backward fails). Step "
            "the optimizer outside inference_mode; torch.no_grad() is fine."
        )


def hook_on_model(controller, register: Callable[[Callable], RemovableHandle], hook: Callable) -> RemovableHandle:
    """Put ``hook(controller, module, *args)`` on the controller's model with ``register`` (one of the model's
    ``register_*_hook`` methods), holding the controller weakly.

    The model holds ``partial(_call_for_model, weakref.ref(controller), hook)``: it keeps no controller alive, and
    ``copy.deepcopy(model)`` copies the weak reference as it is, not the controller. The hook runs only while the
    controller lives and only for its own model (a copy's hook does nothing). Its return value is dropped: these hooks
    observe, they never replace an output. The hooks of controllers that are gone, and those a copy brought along, are
    taken off the model here, when a controller is built on it: not when a controller is collected, which may happen
    inside torch's own loop over the model's load hooks, where taking one off would break the loop."""
    _forget_stale_hooks(controller.model)
    return register(partial(_call_for_model, weakref.ref(controller), hook))


def _call_for_model(owner: weakref.ref, hook: Callable, module: nn.Module, *args) -> None:
    controller = owner()
    if controller is not None and module is controller.model:
        hook(controller, module, *args)


def _forget_stale_hooks(model: nn.Module) -> None:
    """Take off ``model`` every :func:`hook_on_model` hook whose controller is gone or is another model's."""
    remove_hooks(model, lambda hook: _is_stale(getattr(hook, "hook", hook), model))  # a load hook is torch-wrapped


def _is_stale(hook, model: nn.Module) -> bool:
    if not (isinstance(hook, partial) and hook.func is _call_for_model):
        return False
    controller = hook.args[0]()
    return controller is None or controller.model is not model


def warn_if_unbound(controller, module: nn.Module, args, output) -> None:
    """The model's forward hook: the first training forward (training mode, gradients on) while its newest controller
    is bound to no optimizer warns, once, that nothing drives the controller."""
    if not (module.training and torch.is_grad_enabled()) or controller.optimizers:
        return
    newest = _NEWEST.get(module)
    if newest is None or newest() is not controller:
        return
    say_not_driven(controller)


def note_parameters_before_load(controller, module: nn.Module, *args) -> None:
    """The model's load pre-hook: its parameters as they are before a load (see RankController.__init__)."""
    controller._before_load = dict(module.named_parameters())


def rebind_loaded_parameters(controller, module: nn.Module, incompatible_keys) -> None:
    """The model's load post-hook: every parameter the load replaced takes its predecessor's place in the bound
    optimizers; state the predecessor had (an optimizer loaded before the model) is dropped, and said."""
    before, controller._before_load = controller._before_load, {}
    after = dict(module.named_parameters())
    dropped = 0
    for name, old in before.items():
        new = after.get(name)
        if new is not None and new is not old:
            dropped += sum(swap_parameter(opt, old, new) for opt in controller.optimizers)
    # Said at the next optimizer step, if one comes: a load after the run's last step (a Trainer's
    # load_best_model_at_end) trains no more, and loses nothing.
    controller._dropped_by_load += dropped
