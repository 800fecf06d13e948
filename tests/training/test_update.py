import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.errors import InputError
from secfedtl.training.update import ClientUpdate, flatten_params, model_with_params, param_names, unflatten_params

names = st.text(alphabet="abcdefgh.", min_size=1, max_size=8)
shapes = st.lists(st.integers(1, 4), min_size=0, max_size=3).map(tuple)


@st.composite
def param_maps(draw):
    spec = draw(st.dictionaries(names, shapes, min_size=1, max_size=5))
    out = {}
    for name, shape in spec.items():
        n = int(np.prod(shape)) if shape else 1
        values = draw(st.lists(st.floats(-1e6, 1e6, width=32), min_size=n, max_size=n))
        out[name] = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return out


@settings(max_examples=60, deadline=None)
@given(params=param_maps())
def test_flatten_round_trip(params):
    vec = flatten_params(params)
    assert vec.dtype == np.float64 and vec.ndim == 1
    assert vec.shape[0] == sum(t.numel() for t in params.values())
    back = unflatten_params(vec, params)
    assert list(back) == param_names(params)
    for name, t in params.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape
        assert torch.equal(back[name], t)


def test_order_is_fixed_by_name_not_insertion():
    a = {"b": torch.tensor([2.0]), "a": torch.tensor([1.0])}
    b = {"a": torch.tensor([1.0]), "b": torch.tensor([2.0])}
    assert np.array_equal(flatten_params(a), flatten_params(b))
    assert flatten_params(a).tolist() == [1.0, 2.0]


def test_unflatten_rejects_bad_vectors():
    like = {"w": torch.zeros(2, 2)}
    with pytest.raises(InputError):
        unflatten_params(np.zeros(3), like)
    with pytest.raises(InputError):
        unflatten_params(np.zeros((2, 2)), like)
    with pytest.raises(InputError):
        unflatten_params(np.array([0.0, 1.0, np.nan, 0.0]), like)
    with pytest.raises(InputError):
        flatten_params({})


def test_client_update_validates_and_copies():
    t = torch.ones(2)
    u = ClientUpdate(model_update={"w": t}, weight=3, event=None)
    t.add_(1.0)
    assert torch.equal(u.model_update["w"], torch.ones(2))
    with pytest.raises(InputError):
        ClientUpdate(model_update={"w": torch.tensor([float("inf")])}, weight=3, event=None)
    with pytest.raises(InputError):
        ClientUpdate(model_update={"w": t}, weight=0, event=None)
    with pytest.raises(TypeError):
        ClientUpdate({"w": t}, 3, None)  # type: ignore[misc]


def test_model_with_params_copies_into_a_copy_and_refuses_unknown_names():
    model = torch.nn.Linear(2, 1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    work = model_with_params(model, {"bias": torch.tensor([5.0])})
    assert torch.equal(work.bias, torch.tensor([5.0])) and torch.equal(work.weight, before["weight"])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # the original is untouched
    with pytest.raises(InputError):
        model_with_params(model, {"not_a_parameter": torch.zeros(1)})
