import pytest
import torch
from torch import nn

from secfedtl.errors import InputError, ModelError
from secfedtl.transfer.models import load_source_model, load_state_dict_file, state_hash


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_safetensors_round_trip(tmp_path):
    from safetensors.torch import save_file

    src = _net()
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    dst = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    load_source_model(dst, tmp_path / "w.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)
    assert state_hash(dst) == state_hash(src)


def test_torch_file_loaded_with_weights_only(tmp_path):
    src = _net()
    torch.save({"state_dict": src.state_dict()}, tmp_path / "w.pt")
    dst = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    load_source_model(dst, tmp_path / "w.pt")
    assert state_hash(dst) == state_hash(src)


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"x": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelError):
        load_state_dict_file(tmp_path / "evil.pt")


def test_shape_mismatch_names_every_tensor_and_leaves_model_unchanged():
    src = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    dst = _net()
    before = _snapshot(dst)
    with pytest.raises(ModelError) as info:
        load_source_model(dst, src.state_dict())
    msg = str(info.value)
    for name in ("0.weight", "0.bias", "2.weight"):
        assert name in msg
    for k, v in dst.state_dict().items():
        assert torch.equal(v, before[k])


def test_missing_and_unexpected_names():
    dst = _net()
    state = dict(_net().state_dict())
    state["extra"] = torch.zeros(1)
    del state["2.bias"]
    with pytest.raises(ModelError, match=r"2\.bias.*extra|missing.*2\.bias"):
        load_source_model(dst, state)
    # non-strict ignores them but still checks shapes of common names
    load_source_model(dst, state, strict=False)


def test_non_finite_weights_refused():
    state = dict(_net().state_dict())
    state["0.weight"] = torch.full((3, 4), float("nan"))
    with pytest.raises(InputError):
        load_source_model(_net(), state)


def test_missing_file(tmp_path):
    with pytest.raises(ModelError):
        load_state_dict_file(tmp_path / "nope.safetensors")


def test_state_hash_changes_with_weights():
    a = _net()
    h = state_hash(a)
    with torch.no_grad():
        a[0].weight[0, 0] += 1e-3
    assert state_hash(a) != h
