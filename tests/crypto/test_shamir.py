"""secfedtl.crypto.shamir: any t of n shares recover the secret; t-1 shares raise and are
consistent with every secret; a corrupted extra share is detected."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.crypto import shamir
from secfedtl.errors import ReconstructionError

P = shamir.PRIME
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def sharings(draw):
    n = draw(st.integers(1, 12))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 2**32), min_size=n, max_size=n, unique=True))
    secret = draw(st.binary(min_size=32, max_size=32))
    return secret, t, xs


def _interpolate_at(points, x):
    """Independent Lagrange interpolation (exact, over Fractions-free modular arithmetic)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        term = yi
        for j, (xj, _) in enumerate(points):
            if i != j:
                term = term * (x - xj) * pow(xi - xj, P - 2, P) % P
        total = (total + term) % P
    return total


@SETTINGS
@given(sharings(), st.randoms(use_true_random=False))
def test_any_t_shares_recover_the_secret(case, rnd):
    secret, t, xs = case
    shares = shamir.split(secret, threshold=t, xs=xs)
    assert set(shares) == set(xs)
    assert all(len(s) == shamir.SHARE_BYTES for s in shares.values())
    for _ in range(3):
        k = rnd.randint(t, len(xs))
        subset = rnd.sample(xs, k)
        assert shamir.combine({x: shares[x] for x in subset}, threshold=t) == secret


@SETTINGS
@given(sharings(), st.binary(min_size=32, max_size=32), st.randoms(use_true_random=False))
def test_t_minus_1_shares_raise_and_fit_every_secret(case, other, rnd):
    secret, t, xs = case
    if t < 2:
        return
    shares = shamir.split(secret, threshold=t, xs=xs)
    subset = rnd.sample(xs, t - 1)
    few = {x: shares[x] for x in subset}
    with pytest.raises(ReconstructionError):
        shamir.combine(few, threshold=t)
    # Perfect secrecy: for an arbitrary s', the t points {(0, s')} + the t-1 shares determine a
    # polynomial of degree <= t-1 that passes through every one of the t-1 shares.
    points = [(0, int.from_bytes(other, "big"))] + [(x, int.from_bytes(few[x], "big")) for x in subset]
    for x in subset:
        assert _interpolate_at(points, x) == int.from_bytes(few[x], "big")
    assert _interpolate_at(points, 0) == int.from_bytes(other, "big")
    # and feeding that polynomial's value at a fresh point as the t-th share "recovers" s'
    fresh = max(xs) + 1
    forged = dict(few)
    forged[fresh] = _interpolate_at(points, fresh).to_bytes(shamir.SHARE_BYTES, "big")
    assert shamir.combine(forged, threshold=t) == other


@SETTINGS
@given(sharings(), st.data())
def test_corrupted_extra_share_is_detected(case, data):
    secret, t, xs = case
    if len(xs) <= t:
        return
    shares = shamir.split(secret, threshold=t, xs=xs)
    victim = data.draw(st.sampled_from(xs))
    delta = data.draw(st.integers(1, P - 1))
    y = (int.from_bytes(shares[victim], "big") + delta) % P
    shares[victim] = y.to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(ReconstructionError):
        shamir.combine(shares, threshold=t)


def test_shares_of_the_same_secret_are_fresh():
    xs = [1, 2, 3]
    a = shamir.split(bytes(32), threshold=2, xs=xs)
    b = shamir.split(bytes(32), threshold=2, xs=xs)
    assert a != b


@pytest.mark.parametrize("kwargs", [
    dict(secret=bytes(31), threshold=1, xs=[1]),
    dict(secret=bytes(32), threshold=0, xs=[1]),
    dict(secret=bytes(32), threshold=3, xs=[1, 2]),
    dict(secret=bytes(32), threshold=1, xs=[1, 1]),
    dict(secret=bytes(32), threshold=1, xs=[0]),
    dict(secret=bytes(32), threshold=1, xs=[P]),
])
def test_split_rejects_bad_arguments(kwargs):
    secret = kwargs.pop("secret")
    with pytest.raises(ReconstructionError):
        shamir.split(secret, **kwargs)


def test_combine_rejects_malformed_shares():
    shares = shamir.split(bytes(range(32)), threshold=2, xs=[1, 2, 3])
    with pytest.raises(ReconstructionError):
        shamir.combine({1: shares[1], 2: shares[2][:-1]}, threshold=2)
    with pytest.raises(ReconstructionError):
        shamir.combine({1: shares[1], 2: P.to_bytes(shamir.SHARE_BYTES, "big")}, threshold=2)
    with pytest.raises(ReconstructionError):
        shamir.combine({0: shares[1], 2: shares[2]}, threshold=2)


def test_reconstruction_that_is_not_a_32_byte_secret_raises():
    rnd = random.Random(0)
    # two random field points: the line through them almost surely has f(0) >= 2**256
    shares = {1: rnd.randrange(P).to_bytes(66, "big"), 2: rnd.randrange(P).to_bytes(66, "big")}
    with pytest.raises(ReconstructionError):
        shamir.combine(shares, threshold=2)


# --- recover: shares from parties that may lie ---------------------------------------------------


def _wrong(share: bytes, rnd) -> bytes:
    """Another well-formed share (a field element other than ``share``)."""
    y = int.from_bytes(share, "big")
    return ((y + rnd.randrange(1, P)) % P).to_bytes(shamir.SHARE_BYTES, "big")


@SETTINGS
@given(sharings(), st.randoms(use_true_random=False))
def test_recover_corrects_up_to_half_the_spare_shares_and_names_them(case, rnd):
    secret, t, xs = case
    shares = shamir.split(secret, threshold=t, xs=xs)
    correctable = (len(xs) - t) // 2
    liars = rnd.sample(xs, rnd.randint(0, correctable))
    malformed = rnd.sample([x for x in xs if x not in liars], rnd.randint(0, 1)) if len(xs) - 2 * len(liars) > t else []
    for x in liars:
        shares[x] = _wrong(shares[x], rnd)
    for x in malformed:
        shares[x] = b"\xff" * shamir.SHARE_BYTES  # outside the field: set aside, not counted as an error
    found = shamir.recover(shares, threshold=t)
    assert found.secret == secret
    assert found.rejected == set(liars) | set(malformed)
    assert "secret=<hidden>" in repr(found) and secret.hex() not in repr(found)


@SETTINGS
@given(sharings(), st.randoms(use_true_random=False))
def test_recover_refuses_more_wrong_shares_than_it_can_correct(case, rnd):
    secret, t, xs = case
    spare = len(xs) - t
    if t < 2 or spare < 1:
        return  # with t = 1 every share is the secret itself; with no spare share nothing is checked
    shares = shamir.split(secret, threshold=t, xs=xs)
    for x in rnd.sample(xs, spare // 2 + 1):
        shares[x] = _wrong(shares[x], rnd)
    with pytest.raises(ReconstructionError):
        shamir.recover(shares, threshold=t)


def test_recover_with_exactly_t_shares_checks_only_the_secret_size():
    shares = shamir.split(bytes(range(32)), threshold=3, xs=[1, 2, 3])
    assert shamir.recover(shares, threshold=3).secret == bytes(range(32))
    shares[2] = (int.from_bytes(shares[2], "big") ^ (1 << 400)).to_bytes(shamir.SHARE_BYTES, "big")
    with pytest.raises(ReconstructionError, match="32-byte"):
        shamir.recover(shares, threshold=3)  # a random error lands outside [0, 2**256)
    with pytest.raises(ReconstructionError, match="required"):
        shamir.recover({1: shares[1], 3: shares[3], 2: b"\xff" * 66}, threshold=3)
    with pytest.raises(ReconstructionError):
        shamir.recover({0: shares[1]}, threshold=1)  # x = 0 is the secret's own point
