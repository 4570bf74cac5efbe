"""Shared fixtures: split x layout parametrisation, an elastic-layer factory, and a reference update."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from dynarank import ElasticLoRALinear

# The benchmarks' fixtures (planted_task.py) and helpers are imported by the tests as top-level modules.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

# The tensors are tiny: one thread is fastest and immune to OpenMP spin-waits on a busy 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT classifier with the packaged MiniLM tokenizer (so real text tokenizes), saved once per module."""
    from tiny_models import save_tiny_model_dir

    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(params=["rows", "cols"])
def split(request) -> str:
    return request.param


@pytest.fixture(params=["own", "shared"])
def layout(request) -> str:
    return request.param


@pytest.fixture
def make_layer():
    """Build a (non-square) elastic layer; ``randomize`` gives every adapter entry a non-zero value."""

    def _make(split="rows", layout="own", *, n_groups=4, r=3, d_in=24, d_out=32, scaling=0.5, randomize=True, seed=0):
        g = torch.Generator().manual_seed(seed)
        base = nn.Linear(d_in, d_out)
        with torch.no_grad():
            base.weight.copy_(torch.randn(d_out, d_in, generator=g) * 0.2)
            base.bias.copy_(torch.randn(d_out, generator=g) * 0.2)
        layer = ElasticLoRALinear(
            base, n_groups=n_groups, split=split, layout=layout, r=r, scaling=scaling, generator=g
        )
        if randomize:
            with torch.no_grad():
                for p in layer.adapter_parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        return layer

    return _make


def _reference_delta(layer: ElasticLoRALinear) -> torch.Tensor:
    """The documented update, one rank at a time (float64): sum over (g, j) of gate * B_gj A_gj, times scaling.

    Storage per docs/architecture.md: group g's rank j uses shared row ``slots[g][j]`` and packed group
    column ``sum(ranks[:g]) + j``; rows: A row = shared, B column = group; cols: A^T column = group, B^T row = shared.
    """
    delta = torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64)
    gate = layer.gate()
    d_g, column = layer.group_size, 0
    for g, slots in enumerate(layer.slots):
        block = slice(g * d_g, (g + 1) * d_g)
        for j, s in enumerate(slots):
            m = 1.0 if gate is None else float(gate[g, j])
            u = layer.group_weight[:, column].detach().double()
            v = layer.shared_weight[s].detach().double()
            if layer.split == "rows":
                delta[block, :] += m * torch.outer(u, v)
            else:
                delta[:, block] += m * torch.outer(v, u)
            column += 1
    return (delta * layer.scaling).float()


@pytest.fixture
def reference_delta():
    return _reference_delta


@pytest.fixture
def unpickled(monkeypatch) -> list:
    """Every torch.load call (a pickle being loaded) is recorded here: a safe loader leaves it empty."""
    calls, real = [], torch.load

    def spy(*args, **kwargs):
        calls.append(args[0] if args else kwargs.get("f"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.fixture
def count_host_reads(monkeypatch):
    """Call it to start counting the ways a tensor's value reaches Python (each one waits for the device)."""

    def start() -> dict:
        reads = {"n": 0}
        for name in ("__bool__", "item", "tolist"):
            real = getattr(torch.Tensor, name)

            def counted(self, *args, _real=real, **kwargs):
                reads["n"] += 1
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)
        return reads

    return start
