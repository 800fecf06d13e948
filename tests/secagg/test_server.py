"""secfedtl.secagg.server: every illegal client message raises and leaves the server unchanged
(the server does not abort on one bad client); a stateful machine with random dropouts and
reordering ends in the survivors' exact sum or a clean TooFewSurvivorsError."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from secfedtl.errors import AuthenticationError, ReplayError, SecFedTLError, TooFewSurvivorsError, WrongSessionError
from secfedtl.secagg import SecAggConfig, ServerState
from secfedtl.secagg import messages as m
from secfedtl.testing.harness import expected_field_sum, make_round

FULL = SecAggConfig(num_clients=5, threshold=3)
AUTH = SecAggConfig(num_clients=5, threshold=3, authenticated=True)


def server_at(state_index, cfg=FULL):
    """Server in its ``state_index``-th phase with every legal message for it but the first
    delivered; returns (round, held-back legal message, delivered messages)."""
    rnd = make_round(cfg)
    msgs = [c.start() for c in rnd.clients]
    for _ in range(state_index):
        for x in msgs:
            rnd.server.receive(x)
        out = rnd.server.advance()
        msgs = [r for o in out for r in rnd.clients[o.recipient].receive(o)]
    held, rest = msgs[0], msgs[1:]
    for x in rest:
        rnd.server.receive(x)
    return rnd, held, rest


def snap(s):
    return (s.state, dict(s._adverts), {k: dict(v) for k, v in s._boxes.items()}, s._sum.tobytes(),
            set(s._masked), dict(s._signatures), dict(s._requests), dict(s._responses))


H = dict(session_id=b"\x01" * 16, round=0)
GENERIC = [
    m.AdvertiseKeys(sender=0, enc_public_key=b"\x05" * 32, mask_public_key=b"\x06" * 32, **H),
    m.EncryptedShares(sender=0, ciphertexts=(), **H),
    m.MaskedInput(sender=0, vector=bytes(20), **H),
    m.ConsistencyResponse(sender=0, **H),
    m.UnmaskResponse(sender=0, self_mask_shares=(), mask_key_shares=(), **H),
    m.KeyDirectory(recipient=0, peers=(), **H),
    m.SurvivorList(recipient=0, survivors=(0,), **H),
]


def _bad_content(held):
    if isinstance(held, m.AdvertiseKeys):
        return [dataclasses.replace(held, mask_public_key=held.enc_public_key)]
    if isinstance(held, m.EncryptedShares):
        return [dataclasses.replace(held, ciphertexts=held.ciphertexts[:-1])]
    if isinstance(held, m.MaskedInput):
        return [dataclasses.replace(held, vector=held.vector[:-1]), dataclasses.replace(held, vector=b"")]
    if isinstance(held, m.UnmaskResponse):
        return [dataclasses.replace(held, self_mask_shares=held.self_mask_shares[:-1])]
    return []


@pytest.mark.parametrize("index", range(5), ids=lambda i: list(ServerState)[i].value)
def test_every_illegal_message_leaves_the_server_unchanged(index):
    rnd, held, rest = server_at(index)
    s = rnd.server
    bad = [g for g in GENERIC if type(g) is not type(held)]
    bad += [dataclasses.replace(held, session_id=b"\x02" * 16), dataclasses.replace(held, round=1),
            dataclasses.replace(held, sender=99), rest[0]]  # rest[0]: a replay
    bad += _bad_content(held)
    for msg in bad:
        before = snap(s)
        with pytest.raises(SecFedTLError):
            s.receive(msg)
        assert snap(s) == before
    with pytest.raises(WrongSessionError):
        s.receive(dataclasses.replace(held, round=7))
    with pytest.raises(ReplayError):
        s.receive(rest[0])
    s.receive(held)  # the server is still live and accepts the legal message
    assert s.state is list(ServerState)[index]


@pytest.mark.parametrize("index", [0, 3])
def test_authenticated_server_refuses_bad_signatures_unchanged(index):
    rnd, held, _ = server_at(index, AUTH)
    s = rnd.server
    for sig in (b"", bytes(64), rnd.keys[1].sign(b"something else")):
        before = snap(s)
        with pytest.raises(AuthenticationError):
            s.receive(dataclasses.replace(held, signature=sig))
        assert snap(s) == before
    s.receive(held)


def test_done_and_aborted_servers_accept_nothing():
    rnd, held, rest = server_at(4)
    s = rnd.server
    s.receive(held)
    s.advance()
    assert s.state is ServerState.DONE
    before = snap(s)
    with pytest.raises(SecFedTLError):
        s.receive(held)
    with pytest.raises(SecFedTLError):
        s.advance()
    assert snap(s) == before
    rnd = make_round(FULL)
    rnd.server.receive(rnd.clients[0].start())
    with pytest.raises(TooFewSurvivorsError):
        rnd.server.advance()
    assert rnd.server.state is ServerState.ABORTED
    with pytest.raises(SecFedTLError):
        rnd.server.result()


# --- stateful: one server, N clients, random dropouts and reordering --------------------------


class Round(RuleBasedStateMachine):
    """Clients' messages of a phase are queued and delivered in random order; some are dropped
    on the way (either direction). At the end: the exact modular sum of the included clients'
    vectors, or TooFewSurvivorsError."""

    @initialize(n=st.integers(4, 7), sparse=st.booleans(), auth=st.booleans(), bits=st.sampled_from([8, 12, 20, 32]),
                seed=st.integers(0, 100))
    def setup(self, n, sparse, auth, bits, seed):
        if sparse and n >= 5:
            k = 4 if n % 2 == 1 or n > 5 else 3
            cfg = SecAggConfig(num_clients=n, threshold=k // 2 + 1, neighbours=k, bits=bits, authenticated=auth)
        else:
            cfg = SecAggConfig(num_clients=n, threshold=n // 2 + 1, bits=bits, authenticated=auth)
        self.cfg = cfg
        self.rnd = make_round(cfg, vector_length=3, seed=seed)
        self.to_server = [c.start() for c in self.rnd.clients]
        self.to_clients: list[m.Message] = []
        self.stale: list[m.Message] = []
        self.finished = False
        self.masked_senders: set[int] = set()

    def _live(self):
        return not self.finished

    @precondition(lambda self: self._live() and self.to_server)
    @rule(data=st.data(), drop=st.booleans())
    def deliver_to_server(self, data, drop):
        i = data.draw(st.integers(0, len(self.to_server) - 1))
        msg = self.to_server.pop(i)
        if drop:
            return
        self.rnd.server.receive(msg)
        self.stale.append(msg)
        if isinstance(msg, m.MaskedInput):
            self.masked_senders.add(msg.sender)

    @precondition(lambda self: self._live() and self.to_clients)
    @rule(data=st.data(), drop=st.booleans())
    def deliver_to_client(self, data, drop):
        i = data.draw(st.integers(0, len(self.to_clients) - 1))
        msg = self.to_clients.pop(i)
        if drop:
            return
        try:
            self.to_server += self.rnd.clients[msg.recipient].receive(msg)
        except TooFewSurvivorsError:
            pass  # the client refuses and falls silent

    @precondition(lambda self: self._live() and self.stale)
    @rule(data=st.data())
    def replay_stale(self, data):
        msg = data.draw(st.sampled_from(self.stale))
        before = snap(self.rnd.server)
        with pytest.raises(SecFedTLError):
            self.rnd.server.receive(msg)
        assert snap(self.rnd.server) == before

    @precondition(lambda self: self._live())
    @rule()
    def advance(self):
        self.to_server = []  # late messages are lost: the phase is closed
        try:
            out = self.rnd.server.advance()
        except TooFewSurvivorsError:
            self.finished = True
            assert self.rnd.server.state is ServerState.ABORTED
            return
        self.to_clients = list(out)
        if self.rnd.server.state is ServerState.DONE:
            self.finished = True
            res = self.rnd.server.result()
            assert set(res.included) == self.masked_senders
            assert len(res.included) >= self.cfg.min_survivors
            expect = expected_field_sum(self.rnd.vectors, res.included, self.cfg.bits)
            np.testing.assert_array_equal(res.field_sum.astype(np.uint64), expect)

    @rule()
    def wait(self):
        """Nothing arrives (keeps the machine runnable after the round ended)."""

    @invariant()
    def server_state_is_known(self):
        if hasattr(self, "rnd"):
            assert isinstance(self.rnd.server.state, ServerState)


Round.TestCase.settings = settings(max_examples=100, stateful_step_count=60, deadline=None)
TestRound = Round.TestCase
