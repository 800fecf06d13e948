"""The collusion bound against an active server (docs/protocol.md, "Parameter rules"): with ``c``
colluding clients, a server that shows two groups of honest neighbours two different, each
properly signed, survivor lists (the victim alive to one group, dropped to the other) collects
``t`` shares of the victim's self-mask seed and ``t`` of its mask key exactly when
``2 (t - c) <= k - c``, i.e. ``c >= 2t - k``. These tests play that server against real
ClientSessions in authenticated mode: it reads the victim's exact input at ``c = 2t - k``, and at
``c = 2t - k - 1`` it runs out of honest neighbours: some honest client is asked for a share that
contradicts the survivor list it signed, or shown a list with fewer than ``t`` signatures, and
refuses."""

from __future__ import annotations

import numpy as np
import pytest

from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.crypto.prg import add_masks
from secfedtl.errors import LocalProtocolError, RemoteProtocolError
from secfedtl.secagg import messages as m
from secfedtl.secagg.config import SecAggConfig, tolerated_colluders
from secfedtl.secagg.session import PURPOSE_MASK, sign_of
from secfedtl.testing.harness import make_round, run_until

VICTIM = 0


def split_view_attack(n: int, t: int, c: int) -> tuple[np.ndarray | None, list[int], np.ndarray]:
    """Run the attack on a complete graph of ``n`` clients with threshold ``t`` and ``c``
    colluders (clients ``1..c``). Returns (what the server reconstructs of the victim's input or
    None, the honest clients that refused, the victim's true input)."""
    cfg = SecAggConfig(num_clients=n, threshold=t, authenticated=True)
    rnd = make_round(cfg, vector_length=6, seed=n * 100 + t * 10 + c)
    run_until(rnd, stop="consistency")  # adverts, shares and masked inputs as usual
    p = rnd.params
    masked = next(msg for msg in rnd.sent if isinstance(msg, m.MaskedInput) and msg.sender == VICTIM)
    adverts = {msg.sender: msg for msg in rnd.sent if isinstance(msg, m.AdvertiseKeys)}
    colluders = list(range(1, c + 1))
    honest = [v for v in range(n) if v != VICTIM and v not in colluders]
    need = max(0, t - c)  # honest shares of each kind the server still needs
    alive_view, dropped_view = honest[:need], honest[-need:] if need else []
    everyone = tuple(range(n))
    without = tuple(v for v in everyone if v != VICTIM)

    signatures: dict[tuple[int, ...], dict[int, bytes]] = {everyone: {}, without: {}}
    for v in colluders:  # colluders sign whatever the server asks
        for view in (everyone, without):
            signatures[view][v] = rnd.keys[v].sign(p.consistency_transcript(v, view))
    confirmed: dict[int, tuple[int, ...]] = {}
    for v in sorted(set(alive_view) | set(dropped_view)):
        view = everyone if v in alive_view else without  # a client in both groups first sees the victim alive
        [response] = rnd.clients[v].receive(m.SurvivorList(session_id=p.session_id, round=p.round, recipient=v,
                                                           survivors=view))
        signatures[view][v] = response.signature
        confirmed[v] = view

    b_shares = {v + 1: rnd.clients[v]._shares[VICTIM][0] for v in colluders}  # noqa: SLF001 - colluders
    k_shares = {v + 1: rnd.clients[v]._shares[VICTIM][1] for v in colluders}  # noqa: SLF001
    refused = []
    for group, view, kind in ((alive_view, everyone, 0), (dropped_view, without, 1)):
        for v in group:
            near = tuple(w for w in view if w != v)
            request = m.UnmaskRequest(
                session_id=p.session_id, round=p.round, recipient=v,
                survivors=near, dropped=() if kind == 0 else (VICTIM,),
                signatures=tuple(sorted(signatures[view].items())))
            try:
                [response] = rnd.clients[v].receive(request)
            except (RemoteProtocolError, LocalProtocolError):  # contradicts its view, too few signatures on
                # the view it confirmed (honest clients sign one view each), or it already answered
                refused.append(v)
                continue
            shares = dict(response.self_mask_shares if kind == 0 else response.mask_key_shares)
            (b_shares if kind == 0 else k_shares)[v + 1] = shares[VICTIM]
    if len(b_shares) < t or len(k_shares) < t:
        return None, refused, rnd.vectors[VICTIM]
    self_seed = shamir.combine(b_shares, threshold=t)
    mask_key = shamir.combine(k_shares, threshold=t)
    seeds = [(self_seed, -1)]
    for v in without:
        s_uv = cp.agree(mask_key, adverts[v].mask_public_key, binding=p.binding, purpose=PURPOSE_MASK,
                        party_a=VICTIM, party_b=v)
        seeds.append((s_uv, -sign_of(VICTIM, v)))
    vector = add_masks(p.vector_from_bytes(masked.vector).copy(), seeds)
    cfg.encoding.reduce(vector)
    return vector, refused, rnd.vectors[VICTIM]


@pytest.mark.parametrize(("n", "t", "c"), [
    (20, 10, 1),  # the old rule's n = 20 (k = 19, t = 10): one colluder was enough (issue 11)
    (20, 11, 3),  # the new rule's n = 20 tolerates 2; the bound is tight
    (9, 6, 4),
])
def test_the_split_view_attack_reads_an_input_at_c_equal_2t_minus_k(n, t, c):
    assert c == 2 * t - (n - 1)
    recovered, refused, truth = split_view_attack(n, t, c)
    assert refused == []
    assert recovered is not None and np.array_equal(recovered, truth)


@pytest.mark.parametrize(("n", "t", "c"), [(20, 10, 0), (20, 11, 2), (9, 6, 3), (5, 4, 3)])
def test_one_colluder_fewer_and_an_honest_client_refuses_the_contradicting_request(n, t, c):
    assert c == tolerated_colluders(degree=n - 1, threshold=t)
    recovered, refused, _ = split_view_attack(n, t, c)
    assert recovered is None
    assert len(refused) >= 1  # asked for both kinds of the victim's shares: it gave one at most


def test_the_recommended_rule_tolerates_its_declared_colluders_against_this_attack():
    cfg = SecAggConfig.recommended(num_clients=20)  # c = floor(0.05 * 20) = 1
    assert cfg.full_graph
    recovered, refused, _ = split_view_attack(20, cfg.threshold, 1)
    assert recovered is None and refused
