import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from secfedtl.errors import ConfigError, InputError, TrainingError
from secfedtl.training.config import DPTrainingConfig
from secfedtl.privacy.randomness import Randomness
from secfedtl.training.dpsgd import run_dp_sgd, secure_gaussian
from secfedtl.transfer.distillation import cross_entropy_loss
from secfedtl.transfer.regularizers import L2SP


def _cfg(**kw):
    base = dict(lr=1.0, expected_batch_size=20, max_grad_norm=100.0, steps=1, noise_multiplier=1e-9)
    base.update(kw)
    return DPTrainingConfig(**base)


def _linear():
    m = nn.Linear(3, 2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[0.1, -0.2, 0.3], [0.0, 0.2, -0.1]]))
        m.bias.zero_()
    return m


X = torch.tensor([[1.0, 2.0, -1.0]])
Y = torch.tensor([1])


def _one_example_grad():
    m = _linear()
    cross_entropy_loss(m, X, Y).sum().backward()
    return m.weight.grad.clone()


def _identical(n):
    return TensorDataset(X.repeat(n, 1), Y.repeat(n))


def _train(model, data, config, *, sample_rate, seed=0, noise_seed=None, loss_fn=cross_entropy_loss, **kw):
    return run_dp_sgd(
        model=model, data=data, config=config, noise_multiplier=config.noise_multiplier, steps=config.steps,
        sample_rate=sample_rate, loss_fn=loss_fn, randomness=Randomness.insecure_seeded(seed),
        noise_generator=None if noise_seed is None else torch.Generator().manual_seed(noise_seed), **kw,
    )


def test_sample_rate_is_public():
    assert _cfg(public_dataset_size=80).sample_rate == 0.25
    assert _cfg(public_dataset_size=4).sample_rate == 1.0
    with pytest.raises(ConfigError, match="public_dataset_size"):
        _cfg().sample_rate
    with pytest.raises(ConfigError):
        _cfg(public_dataset_size=0)


def test_randomness_must_be_given():
    with pytest.raises(ConfigError):
        run_dp_sgd(model=_linear(), data=_identical(4), config=_cfg(), noise_multiplier=1.0, steps=1,
                   sample_rate=0.5, loss_fn=cross_entropy_loss, randomness=None)


def _hooked_ce(model, x, y):
    # same loss, but not the identical function: forces the generic Opacus hook path
    return cross_entropy_loss(model, x, y)


@pytest.mark.parametrize(("clipping", "loss_fn"), [("flat", cross_entropy_loss), ("flat", _hooked_ce), ("ghost", cross_entropy_loss)])
def test_update_is_normalised_by_expected_batch_size_not_dataset_size(clipping, loss_fn):
    # Every example has the same gradient g, nothing is clipped and the noise is negligible.
    # Sum / expected_batch_size gives lr * n * g / B: proportional to n. Mean-normalisation (by the
    # actual batch or dataset size) would give lr * g for every n and fail this test.
    g = _one_example_grad()
    changes = {}
    for n in (5, 10):
        m = _linear()
        before = m.weight.detach().clone()
        _train(m, _identical(n), _cfg(clipping=clipping), sample_rate=1.0, loss_fn=loss_fn)
        changes[n] = m.weight.detach() - before
        assert torch.allclose(changes[n], -1.0 * n * g / 20, atol=1e-6)
    assert torch.allclose(changes[10], 2 * changes[5], atol=1e-6)


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, _hooked_ce])
def test_poisson_batch_divided_by_expected_not_actual_size(loss_fn):
    g = _one_example_grad()
    n, rate, seed = 400, 0.05, 7
    actual = len(Randomness.insecure_seeded(seed).poisson_indices(n, rate))
    assert actual != 20  # the test is only meaningful when actual != expected
    m = _linear()
    before = m.weight.detach().clone()
    _train(m, _identical(n), _cfg(), sample_rate=rate, seed=seed, loss_fn=loss_fn)
    assert torch.allclose(m.weight.detach() - before, -actual * g / 20, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, _hooked_ce])
def test_clipping_bounds_each_example(loss_fn):
    m = _linear()
    before = [p.detach().clone() for p in m.parameters()]
    big = TensorDataset(X * 1e4, torch.tensor([0]))  # confidently wrong: huge gradient
    _train(m, big, _cfg(max_grad_norm=0.5, expected_batch_size=4), sample_rate=1.0, loss_fn=loss_fn)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(m.parameters(), before)]).norm()
    assert 0.5 / 4 * 0.999 < moved <= 0.5 / 4 * 1.001  # lr * C / B, the example was clipped


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, _hooked_ce])
def test_empty_poisson_batches_still_add_noise(loss_fn):
    m = _linear()
    before = [p.detach().clone() for p in m.parameters()]
    cfg = _cfg(noise_multiplier=1.0, max_grad_norm=2.0, expected_batch_size=4)
    losses = _train(m, _identical(30), cfg, sample_rate=1e-12, noise_seed=5, loss_fn=loss_fn)
    assert losses == [0.0]
    g = torch.Generator().manual_seed(5)
    for p, b in zip(m.parameters(), before):
        noise = torch.normal(0.0, 2.0, size=p.shape, generator=g)
        assert torch.allclose(p.detach() - b, -noise / 4, atol=1e-6)


@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, _hooked_ce])
def test_l2sp_gradient_is_added_after_noise_and_not_clipped(loss_fn):
    source = {n: torch.zeros_like(p) for n, p in _linear().named_parameters()}
    reg = L2SP(strength=50.0, source=source)  # gradient norm >> max_grad_norm
    cfg = _cfg(noise_multiplier=0.8, max_grad_norm=0.1, expected_batch_size=4)
    plain, regd = _linear(), _linear()
    start = {n: p.detach().clone() for n, p in plain.named_parameters()}
    _train(plain, _identical(6), cfg, sample_rate=0.5, seed=1, noise_seed=2, loss_fn=loss_fn)
    _train(regd, _identical(6), cfg, sample_rate=0.5, seed=1, noise_seed=2, regularizer=reg, loss_fn=loss_fn)
    for (name, p), q in zip(plain.named_parameters(), regd.parameters()):
        expected = -1.0 * 2 * 50.0 * (start[name] - source[name])
        assert torch.allclose(q.detach() - p.detach(), expected, atol=1e-5)


def test_flat_and_ghost_clipping_agree():
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(40, 5), torch.randint(0, 3, (40,)))
    proto = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    results = []
    for clipping in ("flat", "ghost"):
        m = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
        m.load_state_dict(proto.state_dict())
        cfg = _cfg(lr=0.3, max_grad_norm=0.2, expected_batch_size=8, steps=5, noise_multiplier=0.5, clipping=clipping)
        _train(m, data, cfg, sample_rate=0.2, seed=3, noise_seed=4)
        results.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert not torch.allclose(results[0], torch.cat([p.detach().flatten() for p in proto.parameters()]))
    assert torch.allclose(results[0], results[1], atol=1e-5)


@pytest.mark.parametrize(("clipping", "loss_fn"), [("flat", cross_entropy_loss), ("flat", _hooked_ce),
                                                   ("ghost", cross_entropy_loss)])
def test_a_record_with_a_non_finite_loss_contributes_nothing_and_fails_nothing(clipping, loss_fn):
    """A server that chooses weights so that one record's loss overflows must not learn whether
    the record is there from a failure: the record contributes zero, exactly as if it were absent."""
    torch.manual_seed(0)
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    poisoned = x.clone()
    poisoned[2] = float("inf")  # this record's logits, loss and gradient are not finite
    cfg = _cfg(noise_multiplier=1e-9, max_grad_norm=0.5, clipping=clipping)
    with_bad, without = _linear(), _linear()
    _train(with_bad, TensorDataset(poisoned, y), cfg, sample_rate=1.0, loss_fn=loss_fn)
    keep = torch.tensor([0, 1, 3, 4, 5])
    _train(without, TensorDataset(x[keep], y[keep]), cfg, sample_rate=1.0, loss_fn=loss_fn)
    assert all(torch.isfinite(p).all() for p in with_bad.parameters())
    for a, b in zip(with_bad.parameters(), without.parameters()):
        assert torch.allclose(a, b, atol=1e-5)


def test_non_finite_parameters_still_raise():
    class Overflowing:  # a (data-independent) regulariser that drives the weights to infinity
        def add_gradient(self, model):
            for p in model.parameters():
                p.grad.fill_(float("inf"))

    with pytest.raises(TrainingError, match="non-finite"):
        _train(_linear(), _identical(5), _cfg(noise_multiplier=1.0), sample_rate=1.0, regularizer=Overflowing())


def test_loss_must_be_per_sample():
    def mean_loss(model, x, y):
        return cross_entropy_loss(model, x, y).mean()

    with pytest.raises(TrainingError, match="one loss per example"):
        _train(_linear(), _identical(5), _cfg(), sample_rate=1.0, loss_fn=mean_loss)


def test_secure_gaussian_statistics():
    z = secure_gaussian((200_000,), std=3.0, dtype=torch.float32, device="cpu")
    assert z.dtype == torch.float32 and torch.isfinite(z).all()
    assert abs(float(z.mean())) < 0.05
    assert float(z.std()) == pytest.approx(3.0, rel=0.02)
    assert not torch.equal(z[:10], secure_gaussian((10,), std=3.0, dtype=torch.float32, device="cpu"))


def test_secure_mode_trains_and_refuses_seeded_noise():
    m = _linear()
    before = m.weight.detach().clone()
    cfg = _cfg(noise_multiplier=1.0, secure_mode=True)
    _train(m, _identical(5), cfg, sample_rate=1.0)
    assert not torch.equal(m.weight, before)
    with pytest.raises(ConfigError):
        _train(_linear(), _identical(5), cfg, sample_rate=1.0, noise_seed=1)


def test_adam_and_opacus_state_cleaned_up():
    m = _linear()
    _train(m, _identical(5), _cfg(optimizer="adam", lr=0.01, steps=3), sample_rate=0.5)
    for p in m.parameters():
        assert getattr(p, "grad_sample", None) is None and p.grad is None
    assert not m._forward_hooks and not m._backward_hooks


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("secure", [False, True])
def test_linear_head_fast_path_matches_opacus_hooks(bias, secure):
    from secfedtl.training import dpsgd

    torch.manual_seed(0)
    feats = TensorDataset(torch.randn(60, 6) * 3, torch.randint(0, 4, (60,)))
    proto = nn.Linear(6, 4, bias=bias)
    reg = L2SP(strength=0.2, source={n: torch.zeros_like(p) for n, p in proto.named_parameters()})
    cfg = _cfg(lr=0.2, max_grad_norm=0.3, expected_batch_size=8, steps=7, noise_multiplier=0.0 + (1e-9 if secure else 0.6),
               secure_mode=secure)
    out = []
    for generic in (False, True):
        m = nn.Linear(6, 4, bias=bias)
        m.load_state_dict(proto.state_dict())
        assert dpsgd._is_linear_ce_fast_path(m, feats, cross_entropy_loss, cfg)
        loss = _hooked_ce if generic else cross_entropy_loss
        assert dpsgd._is_linear_ce_fast_path(m, feats, loss, cfg) is not generic
        losses = _train(m, feats, cfg, sample_rate=0.15, seed=2, noise_seed=None if secure else 3, loss_fn=loss,
                        regularizer=reg)
        out.append((torch.cat([p.detach().flatten() for p in m.parameters()]), losses))
    assert not torch.allclose(out[0][0], torch.cat([p.detach().flatten() for p in proto.parameters()]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert out[0][1] == pytest.approx(out[1][1], abs=1e-5)


def test_trainable_batchnorm_is_a_training_error():
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    with pytest.raises(TrainingError, match="Opacus cannot train"):
        _train(m, _identical(5), _cfg(), sample_rate=1.0, loss_fn=_hooked_ce)


@pytest.mark.parametrize("label", [-1, -100, 4, 7])
@pytest.mark.parametrize("loss_fn", [cross_entropy_loss, _hooked_ce], ids=["closed form", "opacus hooks"])
def test_a_label_outside_the_classes_is_an_input_error(label, loss_fn):
    """Both DP-SGD paths refuse a class index outside [0, classes): torch would read -1 as the last
    class in the closed form, skip -100 in F.cross_entropy, and raise a bare IndexError above."""
    torch.manual_seed(0)
    y = torch.randint(0, 4, (30,))
    y[5] = label
    data = TensorDataset(torch.randn(30, 6), y)
    with pytest.raises(InputError, match=r"class labels must lie in \[0, 4\)"):
        _train(nn.Linear(6, 4), data, _cfg(expected_batch_size=30, steps=1), sample_rate=1.0, loss_fn=loss_fn)


def test_float_labels_reach_the_loss_as_probabilities_and_bool_labels_are_refused():
    from secfedtl.transfer.distillation import check_class_labels

    with pytest.raises(InputError, match="integers"):
        check_class_labels(torch.tensor([True, False]), 2)
    with pytest.raises(InputError, match="1-D"):
        check_class_labels(torch.tensor([[0, 1]]), 2)
    check_class_labels(torch.tensor([0, 1], dtype=torch.int32), 2)
    check_class_labels(torch.zeros(0, dtype=torch.long), 2)
    soft = torch.full((3, 2), 0.5)  # probabilities: no index check, the loss runs
    assert cross_entropy_loss(nn.Linear(4, 2), torch.randn(3, 4), soft).shape == (3,)
