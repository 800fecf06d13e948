import sys
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError, InputError, PrivacyBudgetExceeded, TrainingError
from secfedtl.privacy.randomness import Randomness
from secfedtl.training.client import PrivateClient
from secfedtl.training.config import DPTrainingConfig
from secfedtl.training.update import flatten_params, unflatten_params
from secfedtl.transfer.distillation import DistillationLoss, cross_entropy_loss
from secfedtl.transfer.freezing import HeadOnly, LastBlocks
from secfedtl.transfer.models import state_hash
from secfedtl.transfer.regularizers import L2SP


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()),
            nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten()),
        )
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        return self.fc(self.layers(x))


def _model(policy=None) -> Net:
    torch.manual_seed(0)
    m = Net()
    m.train()
    with torch.no_grad():
        m(torch.randn(32, 1, 8, 8) + 0.5)  # non-trivial BN statistics
    (policy or HeadOnly(head="fc")).apply(m)
    return m


def _data(n=48, seed=1):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))


def _cfg(**kw):
    base = dict(lr=0.5, expected_batch_size=8, max_grad_norm=1.0, steps=4, noise_multiplier=0.5, public_dataset_size=48)
    base.update(kw)
    return DPTrainingConfig(**base)


def _client(guard, model=None, **kw):
    kw.setdefault("config", _cfg())
    return PrivateClient(client_id="h1", model=model or _model(), train_data=kw.pop("data", _data()), guard=guard, **kw)


def _snapshot(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _bitwise_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_charges_then_returns_update_of_trainable_params_only(guard):
    client = _client(guard)
    start = client.trainable_state()
    frozen_before = {k: v for k, v in _snapshot(client.model).items() if not k.startswith("fc.")}
    update = client.train_round(global_state=start, round=0, model_hash="abc")
    assert set(update.model_update) == {"fc.weight", "fc.bias"} == set(client.trainable_names)
    assert any(float(d.abs().max()) > 0 for d in update.model_update.values())
    event, rnd, h = guard.completed[0]
    assert (rnd, h) == (0, "abc") and update.event is event
    assert event.sample_rate == pytest.approx(8 / 48)
    assert event.noise_multiplier == 0.5 and event.steps == 4
    assert update.weight == 48
    # the client model now holds global + update; frozen parts (incl. BN statistics) are untouched
    for name, t in client.trainable_state().items():
        assert torch.allclose(t, start[name] + update.model_update[name])
    after = _snapshot(client.model)
    assert all(torch.equal(after[k], v) for k, v in frozen_before.items())


def test_refused_budget_trains_nothing(refusing_guard):
    calls = []

    def loss(model, x, y):
        calls.append(1)
        return cross_entropy_loss(model, x, y)

    client = _client(refusing_guard, loss_fn=loss, randomness=Randomness.insecure_seeded(4))
    before = _snapshot(client.model)
    rng_before = client.randomness._rng.bit_generator.state
    with pytest.raises(PrivacyBudgetExceeded):
        client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert calls == []
    assert _bitwise_equal(_snapshot(client.model), before)
    assert client.randomness._rng.bit_generator.state == rng_before  # no batch was drawn


def test_non_finite_update_leaves_model_unchanged(guard):
    class Overflowing:  # public inputs that overflow (e.g. a huge learning rate)
        def add_gradient(self, model):
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))

    client = _client(guard, regularizer=Overflowing())
    before = _snapshot(client.model)
    with pytest.raises(TrainingError):
        client.train_round(global_state=client.trainable_state(), round=2, model_hash="h")
    assert _bitwise_equal(_snapshot(client.model), before)
    assert len(guard.failed) == 1 and not guard.completed


def test_a_record_that_breaks_the_loss_does_not_fail_the_round(guard):
    def exploding(model, x, y):
        return cross_entropy_loss(model, x, y) * float("inf")

    client = _client(guard, loss_fn=exploding)
    update = client.train_round(global_state=client.trainable_state(), round=2, model_hash="h")
    assert all(torch.isfinite(d).all() for d in update.model_update.values())  # noise only
    assert len(guard.completed) == 1


def test_global_weights_beyond_the_public_bound_are_refused_before_charging(guard):
    client = _client(guard)
    state = {k: v.clone() for k, v in client.trainable_state().items()}
    state["fc.weight"][0, 0] = 1e7
    with pytest.raises(InputError, match="bound"):
        client.train_round(global_state=state, round=0, model_hash="h")
    assert guard.pending == []


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.pop("fc.bias"),
        lambda s: s.__setitem__("layers.0.0.weight", torch.zeros(3, 1, 3, 3)),  # frozen param
        lambda s: s.__setitem__("fc.bias", torch.zeros(4)),
        lambda s: s.__setitem__("fc.bias", torch.tensor([0.0, float("nan"), 0.0])),
    ],
)
def test_bad_global_state_refused_before_charging(guard, mutate):
    client = _client(guard)
    state = client.trainable_state()
    mutate(state)
    before = _snapshot(client.model)
    with pytest.raises(InputError):
        client.train_round(global_state=state, round=0, model_hash="h")
    assert guard.pending == [] and _bitwise_equal(_snapshot(client.model), before)


def test_bad_round_arguments(guard):
    client = _client(guard)
    with pytest.raises(InputError):
        client.train_round(global_state=client.trainable_state(), round=-1, model_hash="h")
    with pytest.raises(InputError):
        client.train_round(global_state=client.trainable_state(), round=0, model_hash="")


def test_global_state_is_loaded_and_update_flattens(guard):
    client = _client(guard)
    glob = {k: torch.full_like(v, 0.01) for k, v in client.trainable_state().items()}
    update = client.train_round(global_state=glob, round=1, model_hash=state_hash(client.model))
    vec = flatten_params(update.model_update)
    back = unflatten_params(vec, update.model_update)
    for name in glob:
        assert torch.allclose(client.trainable_state()[name], glob[name] + back[name])


def test_cached_client_equals_uncached_client(guard):
    results = []
    for cached in (False, True):
        model = _model()
        reg = L2SP(strength=0.3, source={n: torch.zeros_like(p) for n, p in model.fc.named_parameters(prefix="fc")})
        client = _client(
            guard, model=model, cache_features=cached, head="fc", randomness=Randomness.insecure_seeded(9),
            config=_cfg(steps=6), regularizer=reg,
        )
        update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
        results.append(flatten_params(update.model_update))
    assert abs(results[0]).max() > 0
    assert results[0] == pytest.approx(results[1], abs=1e-5)


def test_cache_refused_when_backbone_trains(guard):
    with pytest.raises(ConfigError, match="outside the head"):
        _client(guard, model=_model(LastBlocks(k=1, blocks="layers", head="fc")), cache_features=True, head="fc")
    with pytest.raises(ConfigError):
        _client(guard, cache_features=True)  # no head named


def test_trainable_batchnorm_replaced_with_warning(guard):
    m = _model(LastBlocks(k=2, blocks="layers", head="fc"))
    with pytest.warns(UserWarning, match="statistics are lost"):
        client = _client(guard, model=m)
    assert isinstance(client.model.layers[0][1], nn.GroupNorm)
    assert isinstance(m.layers[0][1], nn.BatchNorm2d)  # caller's model untouched
    update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert "layers.0.1.weight" in update.model_update


def test_frozen_batchnorm_kept_and_not_updated(guard):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        client = _client(guard)
    bn = client.model.layers[0][1]
    assert isinstance(bn, nn.BatchNorm2d)
    stats = bn.running_mean.clone()
    client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert torch.equal(client.model.layers[0][1].running_mean, stats)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_calibrated_noise_multiplier(guard):
    cfg = DPTrainingConfig(
        lr=0.5, expected_batch_size=8, max_grad_norm=1.0, epochs=1,
        target_epsilon=1.0, target_delta=1e-5, planned_rounds=5, public_dataset_size=48,
    )
    client = _client(guard, config=cfg)
    assert client.local_steps == 6  # 1 epoch at q = 8/48
    calibrate = sys.modules["secfedtl.privacy.accountants"].calibrate_noise_multiplier
    expected = calibrate(target_epsilon=1.0, target_delta=1e-5, sample_rate=8 / 48, steps=30, accountant="rdp")
    assert client.noise_multiplier == pytest.approx(expected)
    assert client.make_event().noise_multiplier == pytest.approx(expected)


def test_distillation_and_l2sp_in_a_round(guard):
    teacher = _model()
    model = _model()
    reg = L2SP.from_model(model, strength=0.1)
    client = _client(guard, model=model, loss_fn=DistillationLoss(teacher=teacher, alpha=0.5, temperature=2.0), regularizer=reg)
    update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert all(torch.isfinite(d).all() for d in update.model_update.values())


def test_constructor_validation(guard):
    with pytest.raises(InputError):
        PrivateClient(client_id="", model=_model(), train_data=_data(), config=_cfg(), guard=guard)
    with pytest.raises(InputError):
        PrivateClient(client_id="a", model=_model(), train_data=_data(), config=_cfg(), guard=object())
    with pytest.raises(ConfigError):
        PrivateClient(client_id="a", model=_model(), train_data=_data(), config=_cfg(secure_mode=True),
                      guard=guard, randomness=Randomness.insecure_seeded(0))
    with pytest.raises(ConfigError, match="public_dataset_size"):  # the rate may not come from len(data)
        PrivateClient(client_id="a", model=_model(), train_data=_data(), config=_cfg(public_dataset_size=None),
                      guard=guard)
    frozen = _model()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(ConfigError):
        PrivateClient(client_id="a", model=frozen, train_data=_data(), config=_cfg(), guard=guard)
    with pytest.raises(InputError):
        PrivateClient(client_id="a", model=_model(), train_data=_data(0), config=_cfg(), guard=guard)


@pytest.mark.parametrize("clipping", ["flat", "ghost"])
def test_training_conv_blocks_with_frozen_bn(guard, clipping):
    # the last conv block is trained (per-sample conv gradients), the first block keeps frozen BN
    m = _model(LastBlocks(k=1, blocks="layers", head="fc"))
    client = _client(guard, model=m, config=_cfg(clipping=clipping, steps=3))
    stats = client.model.layers[0][1].running_var.clone()
    update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert set(update.model_update) == {"layers.1.0.weight", "layers.1.0.bias", "fc.weight", "fc.bias"}
    assert float(update.model_update["layers.1.0.weight"].abs().max()) > 0
    assert torch.equal(client.model.layers[0][1].running_var, stats)


def test_two_rounds_use_fresh_batches(guard):
    client = _client(guard, randomness=Randomness.insecure_seeded(1))
    state = client.trainable_state()
    a = client.train_round(global_state=state, round=0, model_hash="h")
    b = client.train_round(global_state=state, round=1, model_hash="h")
    assert [e[1] for e in guard.completed] == [0, 1]
    assert not torch.allclose(a.model_update["fc.weight"], b.model_update["fc.weight"])


def test_noise_is_not_predictable_from_torch_global_seed(guard):
    """Seeding torch's global generator (as a job does with its public seed) must not fix the DP
    noise: the same data, sampling seed and global seed give different noisy updates."""
    updates = []
    for _ in range(2):
        torch.manual_seed(0)
        client = _client(guard)
        update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="abc")
        updates.append(torch.cat([d.flatten() for d in update.model_update.values()]))
    assert not torch.equal(updates[0], updates[1])
    # ...while an explicit (test-only) noise generator makes runs reproducible
    runs = []
    for _ in range(2):
        client = _client(guard, randomness=Randomness.insecure_seeded(5))
        update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="abc")
        runs.append(torch.cat([d.flatten() for d in update.model_update.values()]))
    assert torch.equal(runs[0], runs[1])


def _real_guard(tmp_path, accountant):
    from secfedtl.privacy.budget import BudgetGuard, PrivacyBudget
    from secfedtl.privacy.ledger import Ledger

    tmp_path.mkdir(parents=True, exist_ok=True)
    budget = PrivacyBudget(epsilon=1.0, delta=1e-5, accountant=accountant)
    return BudgetGuard(client="h1", budget=budget, ledger=Ledger(tmp_path / "ledger.jsonl"))


def test_prv_calibration_spends_the_whole_prv_budget_with_less_noise(tmp_path):
    calibrate = sys.modules["secfedtl.privacy.accountants"].calibrate_noise_multiplier
    kw = dict(lr=0.5, expected_batch_size=8, max_grad_norm=1.0, epochs=1, target_epsilon=1.0,
              target_delta=1e-5, planned_rounds=2, public_dataset_size=48)
    prv = _client(_real_guard(tmp_path / "a", "prv"), config=DPTrainingConfig(accountant="prv", **kw))
    rdp = _client(_real_guard(tmp_path / "b", "rdp"), config=DPTrainingConfig(**kw))
    assert prv.noise_multiplier < rdp.noise_multiplier  # PRV is the tighter accountant
    assert prv.noise_multiplier == pytest.approx(
        calibrate(target_epsilon=1.0, target_delta=1e-5, sample_rate=8 / 48, steps=12, accountant="prv"))
    state = prv.trainable_state()
    for r in range(2):  # both planned rounds fit the PRV budget
        prv.train_round(global_state=state, round=r, model_hash="h")


@pytest.mark.parametrize(("calibrated_by", "kept_by"), [("prv", "rdp"), ("rdp", "prv")])
def test_noise_calibrated_for_another_accountant_than_the_budget_is_refused(tmp_path, calibrated_by, kept_by):
    cfg = DPTrainingConfig(lr=0.5, expected_batch_size=8, max_grad_norm=1.0, epochs=1, target_epsilon=1.0,
                           target_delta=1e-5, planned_rounds=2, accountant=calibrated_by)
    with pytest.raises(ConfigError, match="accountant"):
        _client(_real_guard(tmp_path, kept_by), config=cfg)


def test_unknown_accountant_is_refused():
    with pytest.raises(ConfigError, match="accountant"):
        _cfg(accountant="moments")


def test_two_clients_draw_different_poisson_batches_whatever_the_seeds(guard, monkeypatch):
    """Batch membership comes from os.urandom: the same data, config, torch seed and numpy seed
    give different batches (the public job seed cannot predict them)."""
    import numpy as np

    from secfedtl.privacy import randomness as rmod

    drawn = []
    real = rmod.secure_poisson_mask

    def spy(n, rate):
        mask = real(n, rate)
        drawn.append(mask.copy())
        return mask

    monkeypatch.setattr(rmod, "secure_poisson_mask", spy)
    for _ in range(2):
        torch.manual_seed(0)
        np.random.seed(0)
        client = _client(guard, config=_cfg(steps=3))
        client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert len(drawn) == 6 and all(d.shape == (48,) for d in drawn)
    assert any(not np.array_equal(a, b) for a, b in zip(drawn[:3], drawn[3:]))
    assert guard.fields["randomness"] == "csprng"


def test_mechanism_is_a_function_of_public_config_only(guard):
    """Neighbouring datasets (one record added or removed) run the same mechanism: the event and
    every ledger parameter are identical, and the weight is the declared count."""
    cfg = _cfg(steps=None, epochs=2, noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5,
               planned_rounds=3, public_dataset_size=50)
    seen = []
    for n in (47, 48, 49):
        client = _client(guard, data=_data(n), config=cfg)
        update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
        seen.append((client.make_event(), guard.fields["params"], update.weight))
    assert seen[0] == seen[1] == seen[2]
    assert seen[0][0].sample_rate == pytest.approx(8 / 50) and seen[0][2] == 50
    assert seen[0][1] == {"clip_norm": 1.0, "normaliser": 8, "public_dataset_size": 50, "secure_mode": False,
                          "clipping": "flat"}


def test_insecure_seeded_randomness_is_written_into_the_charge(guard):
    client = _client(guard, randomness=Randomness.insecure_seeded(2))
    client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert guard.fields["randomness"] == "insecure_seeded"


def test_clients_cache_into_row_slices_of_one_shared_buffer(guard):
    """``feature_buffer``: each client writes its float32 features into its own slice of one buffer
    and trains on that storage itself (no per-client copy); it trains the same as a client whose
    cache is its own."""
    data = [_data(n=20, seed=1), _data(n=28, seed=2)]
    buffer = torch.full((48, 64), float("nan"))
    rows = [(0, 20), (20, 48)]
    clients = [_client(guard, data=d, cache_features=True, head="fc", feature_buffer=buffer[a:b],
                       randomness=Randomness.insecure_seeded(5))
               for d, (a, b) in zip(data, rows)]
    assert torch.isfinite(buffer).all()  # every row written, by its own client
    backbone = nn.Sequential(*_model().layers).eval()
    for client, d, (a, b) in zip(clients, data, rows):
        features = client._data.tensors[0]
        assert features.dtype == torch.float32
        assert features.data_ptr() == buffer[a:b].data_ptr() and features.shape == (b - a, 64)  # shared, no copy
        with torch.no_grad():
            assert torch.allclose(buffer[a:b], backbone(d.tensors[0]), atol=1e-6)
    own = _client(guard, data=data[1], cache_features=True, head="fc", randomness=Randomness.insecure_seeded(5))
    assert own._data.tensors[0].dtype == torch.float32
    deltas = [flatten_params(c.train_round(global_state=c.trainable_state(), round=0, model_hash="h").model_update)
              for c in (clients[1], own)]
    assert abs(deltas[0]).max() > 0 and deltas[0] == pytest.approx(deltas[1], abs=1e-6)
    with pytest.raises(ConfigError, match="cache_features=True"):
        _client(guard, feature_buffer=torch.empty(48, 64))
    with pytest.raises(InputError, match="shape"):
        _client(guard, cache_features=True, head="fc", feature_buffer=torch.empty(47, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_distillation_teacher_follows_the_student_to_cuda(guard):
    teacher = _model()
    model = _model()
    client = _client(guard, model=model, loss_fn=DistillationLoss(teacher=teacher, alpha=0.5, temperature=2.0),
                      config=_cfg(device="cuda"))
    update = client.train_round(global_state=client.trainable_state(), round=0, model_hash="h")
    assert all(torch.isfinite(d).all() for d in update.model_update.values())
