"""secfedtl.secagg.client: every illegal message in every state raises, sends nothing, aborts and
keeps recorded data; one test per refusal against a malicious server; the both-lists attack
fails (and would succeed without the refusal); a client's masked input is uniform."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest

from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.crypto.prg import add_masks
from secfedtl.errors import (
    AuthenticationError,
    DecryptionError,
    InconsistentDropoutError,
    ReplayError,
    SecFedTLError,
    TooFewSurvivorsError,
    WrongSessionError,
)
from secfedtl.secagg import ClientState, SecAggConfig
from secfedtl.secagg import messages as m
from secfedtl.secagg.session import PURPOSE_MASK, sign_of
from secfedtl.testing.harness import make_round, run_round, run_until

SID = b"\x01" * 16
FULL = SecAggConfig(num_clients=5, threshold=3)
STOP = {ClientState.ADVERTISED: "share", ClientState.SHARES_SENT: "mask",
        ClientState.MASKED_SENT: "consistency", ClientState.CONSISTENCY_SENT: "unmask"}


def client_in(state, cfg=FULL, **kw):
    """A round whose client 0 is in ``state``; the legal message for it (if any) is returned."""
    rnd = make_round(cfg, **kw)
    if state is ClientState.INIT:
        return rnd, None
    if state is ClientState.DONE:
        run_round(rnd)
        return rnd, None
    run_until(rnd, STOP[state])
    legal = next(x for x in rnd.pending if x.recipient == 0)
    assert rnd.clients[0].state is state
    return rnd, legal


def snapshot(c):
    return (dict(c._peers), dict(c._shares), c._survivors, c._input.tobytes(), c._self_seed,
            c._enc, c._mask)


def generic_messages(recipient=0, sid=SID, rnd=0):
    h = dict(session_id=sid, round=rnd)
    return [
        m.KeyDirectory(recipient=recipient, peers=(), **h),
        m.ShareDelivery(recipient=recipient, ciphertexts=(), **h),
        m.SurvivorList(recipient=recipient, survivors=(0, 1, 2, 3, 4), **h),
        m.UnmaskRequest(recipient=recipient, survivors=(1, 2, 3, 4), dropped=(), **h),
        m.AdvertiseKeys(sender=1, enc_public_key=bytes(32), mask_public_key=b"\x01" * 32, **h),
        m.MaskedInput(sender=1, vector=b"", **h),
        m.ConsistencyResponse(sender=1, **h),
        "not a message", None,
    ]


def _illegal_for(state, legal):
    out = [x for x in generic_messages() if legal is None or type(x) is not type(legal)]
    if legal is not None:
        out += [dataclasses.replace(legal, session_id=b"\x02" * 16),
                dataclasses.replace(legal, round=1),
                dataclasses.replace(legal, recipient=1)]
    return out


ALL_STATES = [ClientState.INIT, ClientState.ADVERTISED, ClientState.SHARES_SENT, ClientState.MASKED_SENT,
              ClientState.CONSISTENCY_SENT, ClientState.DONE]


@pytest.mark.parametrize("state", ALL_STATES, ids=lambda s: s.value)
def test_every_illegal_message_in_every_state_aborts_without_side_effects(state):
    rnd, legal = client_in(state)
    count = len(_illegal_for(state, legal))
    for i in range(count):
        rnd, legal = client_in(state)
        bad = _illegal_for(state, legal)[i]
        c = rnd.clients[0]
        before = snapshot(c)
        with pytest.raises(SecFedTLError):
            c.receive(bad)
        assert c.state is ClientState.ABORTED
        assert snapshot(c) == before
        # an aborted client accepts nothing, not even the message it was waiting for
        with pytest.raises(SecFedTLError):
            c.receive(legal if legal is not None else generic_messages()[0])
        assert snapshot(c) == before


def test_the_legal_message_is_accepted_in_each_waiting_state():
    for state, nxt in [(ClientState.ADVERTISED, ClientState.SHARES_SENT),
                       (ClientState.SHARES_SENT, ClientState.MASKED_SENT),
                       (ClientState.MASKED_SENT, ClientState.CONSISTENCY_SENT),
                       (ClientState.CONSISTENCY_SENT, ClientState.DONE)]:
        rnd, legal = client_in(state)
        out = rnd.clients[0].receive(legal)
        assert len(out) == 1 and out[0].sender == 0 and rnd.clients[0].state is nxt


def test_start_twice_aborts():
    rnd = make_round(FULL)
    rnd.clients[0].start()
    with pytest.raises(SecFedTLError):
        rnd.clients[0].start()
    assert rnd.clients[0].state is ClientState.ABORTED


def _refuse(rnd, msg, exc, client=0):
    c = rnd.clients[client]
    before = snapshot(c)
    with pytest.raises(exc):
        c.receive(msg)
    assert c.state is ClientState.ABORTED and snapshot(c) == before


# --- one test per refusal ------------------------------------------------------------------


def test_refuses_peer_listed_both_surviving_and_dropped():
    rnd, req = client_in(ClientState.CONSISTENCY_SENT)
    _refuse(rnd, dataclasses.replace(req, dropped=(2,)), InconsistentDropoutError)


def test_refuses_peer_reported_dropped_after_confirmed_surviving():
    rnd, req = client_in(ClientState.CONSISTENCY_SENT)
    assert 2 in req.survivors
    _refuse(rnd, dataclasses.replace(req, survivors=tuple(v for v in req.survivors if v != 2), dropped=(2,)),
            InconsistentDropoutError)


def test_refuses_unmask_request_for_shares_it_never_held_or_omitting_survivors():
    rnd, req = client_in(ClientState.CONSISTENCY_SENT)
    _refuse(rnd, dataclasses.replace(req, dropped=(77,)), InconsistentDropoutError)
    rnd, req = client_in(ClientState.CONSISTENCY_SENT)
    _refuse(rnd, dataclasses.replace(req, survivors=req.survivors[:-1]), InconsistentDropoutError)


def test_refuses_fewer_than_t_surviving_neighbours():
    cfg = SecAggConfig(num_clients=8, threshold=3, neighbours=4)
    rnd, sl = client_in(ClientState.MASKED_SENT, cfg)
    near = sorted(rnd.params.neighbours[0])
    far = sorted(set(range(1, 8)) - set(near))
    survivors = tuple(sorted([0, near[0], *far]))  # plenty of survivors, one neighbour
    assert len(survivors) >= cfg.min_survivors
    _refuse(rnd, dataclasses.replace(sl, survivors=survivors), TooFewSurvivorsError)


def test_refuses_too_few_survivors_overall_and_lists_without_itself():
    rnd, sl = client_in(ClientState.MASKED_SENT)
    _refuse(rnd, dataclasses.replace(sl, survivors=(0, 1)), TooFewSurvivorsError)
    rnd, sl = client_in(ClientState.MASKED_SENT)
    _refuse(rnd, dataclasses.replace(sl, survivors=(1, 2, 3, 4)), SecFedTLError)


def test_refuses_too_few_keys_or_shares():
    rnd, kd = client_in(ClientState.ADVERTISED)
    _refuse(rnd, dataclasses.replace(kd, peers=kd.peers[:2]), TooFewSurvivorsError)
    rnd, sd = client_in(ClientState.SHARES_SENT)
    _refuse(rnd, dataclasses.replace(sd, ciphertexts=sd.ciphertexts[:2]), TooFewSurvivorsError)


@pytest.mark.parametrize("field,value", [("session_id", b"\x09" * 16), ("round", 5), ("recipient", 3)])
@pytest.mark.parametrize("state", list(STOP), ids=lambda s: s.value)
def test_refuses_other_session_round_or_recipient(state, field, value):
    rnd, legal = client_in(state)
    _refuse(rnd, dataclasses.replace(legal, **{field: value}), WrongSessionError)


def test_refuses_adverts_from_another_session():
    rnd, kd = client_in(ClientState.ADVERTISED)
    peers = (dataclasses.replace(kd.peers[0], session_id=b"\x09" * 16),) + kd.peers[1:]
    _refuse(rnd, dataclasses.replace(kd, peers=peers), WrongSessionError)


def test_refuses_replayed_messages():
    rnd, kd = client_in(ClientState.ADVERTISED)
    rnd.clients[0].receive(kd)
    _refuse(rnd, kd, ReplayError)
    rnd, sl = client_in(ClientState.MASKED_SENT)
    rnd.clients[0].receive(sl)
    _refuse(rnd, sl, ReplayError)


def test_refuses_tampered_share_ciphertext():
    rnd, sd = client_in(ClientState.SHARES_SENT)
    v, box = sd.ciphertexts[0]
    bad = bytearray(box)
    bad[-1] ^= 1
    _refuse(rnd, dataclasses.replace(sd, ciphertexts=((v, bytes(bad)),) + sd.ciphertexts[1:]), DecryptionError)
    # a genuine box re-addressed from another sender does not authenticate either
    rnd, sd = client_in(ClientState.SHARES_SENT)
    swapped = ((sd.ciphertexts[0][0], sd.ciphertexts[1][1]), (sd.ciphertexts[1][0], sd.ciphertexts[0][1]))
    _refuse(rnd, dataclasses.replace(sd, ciphertexts=swapped + sd.ciphertexts[2:]), DecryptionError)


AUTH = SecAggConfig(num_clients=5, threshold=3, authenticated=True)


def test_authenticated_refuses_missing_or_bad_advert_signature():
    rnd, kd = client_in(ClientState.ADVERTISED, AUTH)
    peers = (dataclasses.replace(kd.peers[0], signature=b""),) + kd.peers[1:]
    _refuse(rnd, dataclasses.replace(kd, peers=peers), AuthenticationError)
    rnd, kd = client_in(ClientState.ADVERTISED, AUTH)
    # a server substituting its own keys (man in the middle) cannot sign for the peer
    fake = cp.generate_x25519()
    peers = (dataclasses.replace(kd.peers[0], enc_public_key=fake.public),) + kd.peers[1:]
    _refuse(rnd, dataclasses.replace(kd, peers=peers), AuthenticationError)


def test_authenticated_refuses_forged_or_missing_survivor_list_signatures():
    rnd, req = client_in(ClientState.CONSISTENCY_SENT, AUTH)
    assert len(req.signatures) == 5
    # forged: a signature by client 1's key over a *different* survivor list
    forged_sig = rnd.keys[1].sign(rnd.params.consistency_transcript(1, (0, 1, 2)))
    sigs = tuple((v, forged_sig if v == 1 else s) for v, s in req.signatures)
    _refuse(rnd, dataclasses.replace(req, signatures=sigs), AuthenticationError)
    rnd, req = client_in(ClientState.CONSISTENCY_SENT, AUTH)
    _refuse(rnd, dataclasses.replace(req, signatures=req.signatures[:2]), AuthenticationError)
    rnd, req = client_in(ClientState.CONSISTENCY_SENT, AUTH)
    _refuse(rnd, dataclasses.replace(req, signatures=()), AuthenticationError)
    rnd, req = client_in(ClientState.CONSISTENCY_SENT, AUTH)
    garbage = tuple((v, bytes(64)) for v, _ in req.signatures)
    _refuse(rnd, dataclasses.replace(req, signatures=garbage), AuthenticationError)


# --- the attack ----------------------------------------------------------------------------


def _unmask_individual(rnd, victim, b_seed, mask_private):
    """What a server holding b_victim and the victim's mask key can compute from y_victim."""
    p = rnd.params
    y = next(x for x in rnd.sent if isinstance(x, m.MaskedInput) and x.sender == victim)
    vec = p.vector_from_bytes(y.vector).copy()
    seeds = [(b_seed, -1)]
    adverts = {a.sender: a for a in rnd.sent if isinstance(a, m.AdvertiseKeys)}
    for w in sorted(rnd.clients[victim]._shares):
        s = cp.agree(mask_private, adverts[w].mask_public_key, binding=p.binding, purpose=PURPOSE_MASK,
                     party_a=victim, party_b=w)
        seeds.append((s, -sign_of(victim, w)))
    add_masks(vec, seeds)
    return p.config.encoding.reduce(vec)


@pytest.mark.parametrize("cfg", [SecAggConfig(num_clients=7, threshold=4),
                                 SecAggConfig(num_clients=10, threshold=3, neighbours=4)],
                         ids=["full", "secagg+"])
def test_attack_victim_in_both_lists_is_refused_and_would_otherwise_leak(cfg):
    rnd, _ = client_in(ClientState.CONSISTENCY_SENT, cfg, vector_length=6, seed=3)
    victim = 6 if cfg.full_graph else 5
    t = cfg.threshold
    collected_b, collected_k = {}, {}
    for req in rnd.pending:
        u = req.recipient
        if victim not in rnd.params.neighbours[u]:
            continue
        assert victim in req.survivors
        # the malicious request: victim both surviving and dropped
        evil = dataclasses.replace(req, dropped=tuple(sorted(set(req.dropped) | {victim})))
        c = rnd.clients[u]
        before = snapshot(c)
        try:
            replies = c.receive(evil)
        except InconsistentDropoutError:
            replies = []
        for r in replies:
            collected_b.update({u: s for o, s in r.self_mask_shares if o == victim})
            collected_k.update({u: s for o, s in r.mask_key_shares if o == victim})
        assert c.state is ClientState.ABORTED and snapshot(c) == before
    assert collected_b == {} and collected_k == {}

    # sanity check of the test's power: with t shares of each kind the server reads x_victim
    holders = sorted(u for u in rnd.params.neighbours[victim])
    assert len(holders) >= t
    b_seed = shamir.combine({u + 1: rnd.clients[u]._shares[victim][0] for u in holders[:t]}, threshold=t)
    key = shamir.combine({u + 1: rnd.clients[u]._shares[victim][1] for u in holders[-t:]}, threshold=t)
    assert cp.x25519_public(key) == rnd.clients[victim]._mask.public
    leaked = _unmask_individual(rnd, victim, b_seed, key)
    np.testing.assert_array_equal(leaked, rnd.vectors[victim])
    # while the masked vector alone is not the input
    y = next(x for x in rnd.sent if isinstance(x, m.MaskedInput) and x.sender == victim)
    assert not np.array_equal(rnd.params.vector_from_bytes(y.vector), rnd.vectors[victim])


def test_attack_split_survivor_lists_give_at_most_one_kind_per_honest_client():
    """A server that reports the victim dropped to some clients is refused by each of them."""
    cfg = SecAggConfig(num_clients=7, threshold=4)
    rnd, _ = client_in(ClientState.CONSISTENCY_SENT, cfg)
    victim, key_shares = 6, {}
    for req in rnd.pending:
        if req.recipient == victim:
            continue
        evil = dataclasses.replace(req, survivors=tuple(v for v in req.survivors if v != victim),
                                   dropped=tuple(sorted(set(req.dropped) | {victim})))
        with pytest.raises(InconsistentDropoutError):
            rnd.clients[req.recipient].receive(evil)
    assert key_shares == {}


# --- uniformity of what the server sees ------------------------------------------------------


def _chi2_critical(df: int, p: float) -> float:
    """Wilson-Hilferty upper quantile of chi-square(df)."""
    z = NormalDist().inv_cdf(1 - p)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


@pytest.mark.parametrize("bits", [32, 20])
@pytest.mark.parametrize("fill", ["zeros", "max"])
def test_masked_input_is_uniform_whatever_the_input(bits, fill):
    length = 1 << 16
    cfg = SecAggConfig(num_clients=3, threshold=2, bits=bits)
    dtype = cfg.encoding.dtype
    value = 0 if fill == "zeros" else (1 << bits) - 1
    vectors = [np.full(length, value, dtype=dtype) for _ in range(3)]
    rnd = make_round(cfg, vector_length=length, vectors=vectors)
    run_until(rnd, "consistency")
    y = next(x for x in rnd.sent if isinstance(x, m.MaskedInput) and x.sender == 0)
    words = rnd.params.vector_from_bytes(y.vector).astype(np.uint64)
    assert int(words.max()) < (1 << bits)
    crit = _chi2_critical(255, 1e-4)
    for name, byte in (("top", words >> np.uint64(bits - 8)), ("low", words & np.uint64(0xFF))):
        counts = np.bincount(byte.astype(np.int64), minlength=256)
        assert counts.size == 256
        expected = length / 256
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < crit, (name, chi2, crit)
