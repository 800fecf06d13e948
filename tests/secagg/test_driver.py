"""secfedtl.secagg.driver: the phase table matches both state machines, a party's illegal answer
makes it a dropout and never reaches the server, a failed round is an outcome (never an
exception), and simulate, the harness and Federation.secure_round all run this one driver."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from secfedtl.errors import LocalProtocolError, TooFewSurvivorsError
from secfedtl.secagg import PHASE_TABLE, PHASES, SecAggConfig, ServerState, simulate
from secfedtl.secagg import client as client_mod
from secfedtl.secagg import driver as driver_mod
from secfedtl.secagg import messages as m
from secfedtl.secagg import server as server_mod
from secfedtl.secagg.driver import RoundDriver, drive
from secfedtl.testing.harness import expected_field_sum, make_round, run_round, run_until

CFG = SecAggConfig(num_clients=7, threshold=4)


def test_the_phase_table_is_the_state_machines_tables():
    assert PHASES == ("advertise", "share", "mask", "consistency", "unmask")
    assert [p.state for p in PHASE_TABLE] == list(ServerState)[:5]
    for phase in PHASE_TABLE:
        assert server_mod._LEGAL[phase.state] is phase.reply  # noqa: SLF001
    assert [p.request for p in PHASE_TABLE[1:]] == client_mod._ORDER  # noqa: SLF001
    assert PHASE_TABLE[0].request is None  # the first phase is opened by start() / a Join


def _tamper(rnd, party, phase_name, rewrite):
    """An exchange that rewrites ``party``'s replies in ``phase_name`` (the rest is honest)."""
    inner = rnd.exchange

    def exchange(phase, requests):
        replies = dict(inner(phase, requests))
        if phase.name == phase_name and party in replies:
            replies[party] = rewrite(list(replies[party]), rnd)
        return replies

    return exchange


def _two(msgs, rnd):
    return msgs + msgs


def _wrong_type(msgs, rnd):
    return [m.ConsistencyResponse(session_id=rnd.params.session_id, round=rnd.params.round, sender=msgs[0].sender)
            if not isinstance(msgs[0], m.ConsistencyResponse)
            else m.MaskedInput(session_id=rnd.params.session_id, round=0, sender=msgs[0].sender, vector=b"")]


def _as_another(msgs, rnd):
    return [dataclasses.replace(msgs[0], sender=(msgs[0].sender + 1) % rnd.params.config.num_clients)]


def _other_session(msgs, rnd):
    return [dataclasses.replace(msgs[0], session_id=b"\x09" * 16)]


def _not_a_message(msgs, rnd):
    return ["hello"]


@pytest.mark.parametrize("rewrite", [_two, _wrong_type, _as_another, _other_session, _not_a_message],
                         ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("phase", PHASES)
def test_an_illegal_answer_makes_its_sender_a_dropout_and_the_round_goes_on(phase, rewrite):
    rnd = make_round(CFG, vector_length=3, seed=2)
    outcome = drive(rnd.server, _tamper(rnd, 0, phase, rewrite))
    assert outcome.ok, outcome.reason
    assert outcome.silent == {0: phase} and set(outcome.rejected) == {0}
    res = outcome.result
    assert (0 in res.included) == (PHASES.index(phase) > PHASES.index("mask"))  # masked input already in
    np.testing.assert_array_equal(res.field_sum.astype(np.uint64),
                                  expected_field_sum(rnd.vectors, res.included, CFG.bits))


def test_a_round_that_cannot_finish_is_an_outcome_not_an_exception():
    rnd = make_round(CFG, vector_length=3)
    rnd.exchange.dropouts = {i: "mask" for i in range(4)}
    outcome = drive(rnd.server, rnd.exchange)
    assert not outcome.ok and outcome.result is None
    assert isinstance(outcome.error, TooFewSurvivorsError) and "aborted" in outcome.reason
    assert outcome.silent == {i: "mask" for i in range(4)}
    assert rnd.server.state is ServerState.ABORTED


def test_stopping_and_resuming_is_the_same_round():
    rnd = make_round(CFG, vector_length=3, seed=5)
    run_until(rnd, "consistency", {2: "unmask"})
    assert rnd.driver.phase.name == "consistency"
    assert {x.recipient for x in rnd.pending} == set(range(7))  # every masked input arrived
    res = run_round(rnd, {2: "unmask"})
    assert res.included == tuple(range(7))
    np.testing.assert_array_equal(res.field_sum.astype(np.uint64), expected_field_sum(rnd.vectors, range(7), 32))


def test_the_driver_refuses_misuse():
    rnd = make_round(CFG)
    with pytest.raises(LocalProtocolError):
        rnd.driver.outcome()  # not ended
    with pytest.raises(LocalProtocolError):
        rnd.driver.run("nap")
    run_round(rnd)
    with pytest.raises(LocalProtocolError):
        rnd.driver.step()
    with pytest.raises(LocalProtocolError):
        RoundDriver(rnd.server, rnd.exchange)  # a used server


def test_simulate_and_the_harness_run_the_one_driver(monkeypatch):
    runs = []
    real = driver_mod.RoundDriver.step

    def spy(self):
        runs.append(self.phase.name)
        return real(self)

    monkeypatch.setattr(driver_mod.RoundDriver, "step", spy)
    res = simulate([np.zeros(3)] * 5, SecAggConfig(num_clients=5, threshold=3), seed=0)
    assert res.included == tuple(range(5)) and runs == list(PHASES)
    runs.clear()
    run_round(make_round(SecAggConfig(num_clients=5, threshold=3)))
    assert runs == list(PHASES)
