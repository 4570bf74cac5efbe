"""Specification of the fused update (layer_fused.py): one autograd node with the gradients of finite differences and
of the plain autograd path, for every split and layout (dense, uneven ranks, slots shared by the groups), used exactly
where it applies, and training runs that take the same decisions with it as without it."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from dynarank import DynaRankConfig, ElasticLoRALinear, attach, build_controller, elastic_layers
from dynarank.layer import GateGather
from dynarank.layer_fused import low_rank_update
from test_layer import _backward_ops
from tiny_models import tiny_llama, token_batch

FUSED = "LowRankUpdateBackward"
UNEVEN = {0: [0], 1: [0, 2], 3: [1]}  # r=3, G=4 -> ranks [2, 1, 3, 2]
LAYOUTS = {  # name: (groups, layout, removal): dense, dense with one group, and two gathered layouts
    "dense": (4, "own", None),
    "one-group": (1, "own", None),
    "uneven": (4, "own", UNEVEN),
    "shared-uneven": (4, "shared", UNEVEN),
    "shared-full": (4, "shared", None),
}
CASES = list(itertools.product(["rows", "cols"], LAYOUTS))


def _layer(split, case, dtype=torch.float64, seed=0):
    groups, layout, removal = LAYOUTS[case]
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(16, 24, dtype=dtype) if split == "rows" else nn.Linear(24, 16, dtype=dtype)
    layer = ElasticLoRALinear(base, n_groups=groups, split=split, layout=layout, r=3, scaling=0.7, dtype=dtype)
    if removal:
        layer.remove_slots(removal)
    with torch.no_grad():
        for p in layer.factors():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype))
    return layer


def _fused(y) -> bool:
    """Whether the update of ``y`` ran as the fused node (the output is a view of it, or it directly)."""
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__ == FUSED


def _index(layer):
    return None if layer._dense else (layer.slot_index.reshape(-1), layer.column_index.reshape(-1))


def _outputs_and_grads(layer, x, gate, fused: bool):
    layer.fused = fused
    tensors = [x, *layer.factors()] + ([gate] if gate is not None else [])
    for t in tensors:
        t.grad = None
    y = layer(x)
    (y.sin() * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    return y, [y.detach().clone()] + [t.grad.clone() for t in tensors if t.requires_grad]


@pytest.mark.parametrize("split,case", CASES)
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("with_base", [False, True])
def test_the_fused_update_has_the_gradients_of_finite_differences(split, case, gated, with_base):
    layer = _layer(split, case)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, layer.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    shared, group = (p.detach().clone().requires_grad_() for p in layer.factors())
    shape = layer.slot_index.shape  # (G, r_max)
    gate = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True) if gated else None
    base = torch.randn(2, 3, layer.out_features, generator=g, dtype=torch.float64, requires_grad=True)
    index = _index(layer)

    def update(x, shared, group, gate, base):
        return low_rank_update(x, shared, group, gate, 0.7, split, layer.n_groups, base if with_base else None, index)

    assert torch.autograd.gradcheck(update, (x, shared, group, gate, base))


def _gathered_gate(layer, generator) -> tuple[torch.Tensor, GateGather]:
    """A gate read from a flat vector (T,) as the SVD methods read E: a view of it where the layout is dense, else
    a gather in which padded slots read a zero."""
    width = layer.group_weight.shape[1]
    source = torch.randn(width, generator=generator, dtype=layer.group_weight.dtype, requires_grad=True)
    index = None if layer._dense else torch.where(layer.column_index < width, layer.column_index, width)
    return source, GateGather(source, index, tuple(layer.column_index.shape))


@pytest.mark.parametrize("split,case", CASES)
@pytest.mark.parametrize("with_base", [False, True])
def test_a_gate_gathered_inside_the_node_has_the_gradients_of_finite_differences(split, case, with_base):
    layer = _layer(split, case)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, layer.in_features, generator=g, dtype=torch.float64, requires_grad=True)
    shared, group = (p.detach().clone().requires_grad_() for p in layer.factors())
    source, gather = _gathered_gate(layer, g)
    gate_index = None if gather.index is None else gather.index.reshape(-1)
    base = torch.randn(2, 3, layer.out_features, generator=g, dtype=torch.float64, requires_grad=True)
    index = _index(layer)

    def update(x, shared, group, source, base):
        base = base if with_base else None
        return low_rank_update(x, shared, group, source, 0.7, split, layer.n_groups, base, index, gate_index)

    assert torch.autograd.gradcheck(update, (x, shared, group, source, base))


@pytest.mark.parametrize("split,case", CASES)
def test_a_gathered_gate_runs_no_node_of_its_own_and_gives_the_values_of_the_gate_as_a_tensor(split, case):
    """The SVD methods' gate is each module's part of one vector E; read inside the fused node, the view or the
    gather costs no autograd node per module, and the outputs and every gradient are bitwise those of the same gate
    handed over as a (G, R) tensor (the gather's adjoint adds one value into each position, as autograd's does)."""
    layer = _layer(split, case, dtype=torch.float32)
    source, gather = _gathered_gate(layer, torch.Generator().manual_seed(3))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    results = []
    for read in (lambda _: gather, lambda _: gather.tensor()):
        layer.set_gate(read)
        y, grads = _outputs_and_grads(layer, x, source, fused=True)
        results.append(grads)
        assert _fused(y)
        if read(layer) is gather:  # the node's gate input is the source itself: no view, pad or gather before it
            node = y.grad_fn if type(y.grad_fn).__name__ == FUSED else y.grad_fn.next_functions[0][0]
            gate_edge = node.next_functions[3][0]
            assert type(gate_edge).__name__ == "AccumulateGrad" and gate_edge.variable is source
            assert not _backward_ops(y) & {"IndexBackward0", "ConstantPadNdBackward0"}
    for a, b in zip(*results):
        assert torch.equal(a, b)
    plain_y, plain = _outputs_and_grads(layer, x, source, fused=False)  # the autograd path reads gate() as a tensor
    for a, b in zip(results[0], plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("split,case", CASES)
@pytest.mark.parametrize("gated", [False, True])
def test_a_layer_runs_one_node_with_the_outputs_and_gradients_of_plain_autograd(split, case, gated):
    layer = _layer(split, case, dtype=torch.float32)
    assert layer._dense == (case in ("dense", "one-group"))
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    gate = torch.rand(layer.slot_index.shape, requires_grad=True) if gated else None
    if gated:
        layer.set_gate(lambda _: gate)
    fused_y, fused = _outputs_and_grads(layer, x, gate, fused=True)
    plain_y, plain = _outputs_and_grads(layer, x, gate, fused=False)
    assert _fused(fused_y) and not _fused(plain_y)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_the_gradient_of_a_shared_slot_adds_its_groups_in_a_fixed_order():
    layer = _layer("cols", "shared-full", dtype=torch.float32)
    x = torch.randn(64, 40, layer.in_features)  # every group reads every slot: the scatter adds repeats
    grads = []
    for _ in range(2):
        _, out = _outputs_and_grads(layer, x, None, fused=True)
        grads.append(out)
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_an_input_without_gradient_and_a_non_contiguous_input_are_served():
    layer = _layer("cols", "dense", dtype=torch.float32)
    x = torch.randn(5, 2, layer.in_features).transpose(0, 1)  # (2, 5, d_in), not contiguous, no gradient
    assert not x.is_contiguous()
    fused_y, fused = _outputs_and_grads(layer, x.detach(), None, fused=True)
    plain_y, plain = _outputs_and_grads(layer, x.detach(), None, fused=False)
    assert len(fused) == 3  # the output and the factors' gradients (x has none)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_rank_buckets_mixed_dtypes_and_autocast_keep_the_autograd_path():
    base = nn.Linear(16, 256)
    lopsided = ElasticLoRALinear(base, n_groups=4, split="rows", r=64)
    lopsided.remove_slots({g: list(range(60)) for g in range(1, 4)})  # ranks 64, 4, 4, 4: rank buckets
    assert lopsided._buckets is not None
    assert not _fused(lopsided(torch.randn(3, 16, requires_grad=True)))

    bf16 = nn.Linear(16, 24).to(torch.bfloat16)  # the base's output in bf16, the adapter in fp32
    layer = ElasticLoRALinear(bf16, r=2)
    y = layer(torch.randn(3, 16, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16  # the update fused, then added in the base's dtype
    assert type(y.grad_fn).__name__ == "AddBackward0"  # added outside the node, in the base's dtype
    assert FUSED in _backward_ops(y)  # the update itself is fused

    dense = _layer("rows", "dense", dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = dense(torch.randn(3, dense.in_features, requires_grad=True))
    assert not _fused(z)


def _train(method, knobs, steps=24, fused=True):
    """A short run of ``method`` on a tiny decoder in float64 (float32 rounding is amplified by AdamW's division):
    the final ranks and update matrices."""
    ElasticLoRALinear.fused = fused
    try:
        model = tiny_llama().double()
        attach(model, DynaRankConfig(method=method, target_modules="all-linear", seed=0, **knobs))
        ctrl = build_controller(model, total_steps=steps)
        opt = ctrl.build_optimizer(lr=3e-2)
        for step in range(steps):
            ids = token_batch(4, 8, seed=step)
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad()
        layers = elastic_layers(model)
        ranks = {n: layer.ranks for n, layer in layers.items()}
        return ranks, {n: layer.delta_weight().detach() for n, layer in layers.items()}
    finally:
        ElasticLoRALinear.fused = True


@pytest.mark.parametrize(
    "method,knobs",
    [("elalora", {"r": 2}), ("ard", {"r": 4, "rank_init": "uniform", "warmup_frac": 0.2, "resize_every": 4})],
)
def test_a_run_on_a_tiny_decoder_takes_the_same_rank_decisions_and_weights_with_the_fused_update(method, knobs):
    fused_ranks, fused_weights = _train(method, knobs, fused=True)
    plain_ranks, plain_weights = _train(method, knobs, fused=False)
    assert fused_ranks == plain_ranks
    assert len({tuple(r) for r in fused_ranks.values()}) > 1  # the run moved ranks
    for name, w in fused_weights.items():  # 24 steps on, in float64: equal up to rounding
        assert float((w - plain_weights[name]).norm()) <= 1e-10 * float(plain_weights[name].norm())


def test_evaluation_under_no_grad_and_inference_mode_gives_the_training_forward_s_values():
    layer = _layer("rows", "shared-uneven", dtype=torch.float32)
    x = torch.randn(2, 5, layer.in_features)
    expected = layer(x).detach()
    with torch.no_grad():
        assert torch.equal(layer(x), expected)
    with torch.inference_mode():
        assert torch.equal(layer(x), expected)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_recomputes_the_node_with_the_same_gradients(reentrant):
    from torch.utils.checkpoint import checkpoint

    layer = _layer("cols", "uneven", dtype=torch.float64)
    x = torch.randn(3, 4, layer.in_features, dtype=torch.float64, requires_grad=True)
    expected_y, expected = _outputs_and_grads(layer, x, None, fused=True)
    for t in [x, *layer.factors()]:
        t.grad = None
    y = checkpoint(layer, x, use_reentrant=reentrant)
    (y.sin() * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype)).sum().backward()
    got = [y.detach()] + [t.grad for t in [x, *layer.factors()]]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_the_output_may_be_modified_in_place_as_a_plain_linear_s_may():
    layer = _layer("rows", "dense", dtype=torch.float64)
    x = torch.randn(2, 3, layer.in_features, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _fused(y)
    y.mul_(2.0)  # e.g. a model scaling its queries in place
    y.sum().backward()
    grads = [t.grad.clone() for t in (x, *layer.factors())]
    for t in (x, *layer.factors()):
        t.grad = None
    (2.0 * layer(x)).sum().backward()
    for a, t in zip(grads, (x, *layer.factors())):
        torch.testing.assert_close(a, t.grad)
