"""Malicious clients and hostile bytes against the production path: Federation.secure_round (the
one round driver) over a LocalPool of client nodes, and the runtime wire decoder.

Each attack of issue 11 that is in this file's scope, and what it did before:

* a 66-byte share of 0xFF: ServerSession.advance() raised ReconstructionError out of
  Federation.secure_round and killed the job;
* inconsistent extra shares: the same;
* a small-order (unusable) key: every honest neighbour's key agreement failed, so the round failed;
* a key whose shares do not match the advertised key, then a dropout: ReconstructionError again;
* a 302-byte Join announcing 40,000 clients: wire.decode built the whole graph (MemoryError);
* a TaskRequest with options={"names": 5}: an uncaught TypeError out of the node.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.aggregation import make_server_optimizer
from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.errors import DecodeError
from secfedtl.federated import federation as fed_mod
from secfedtl.federated import wire
from secfedtl.federated.roster import NodePolicy, Roster
from secfedtl.federated.federation import Federation
from secfedtl.federated.node import ClientNode, TaskOutput, TrainTask
from secfedtl.runtime.pool import LocalPool
from secfedtl.secagg import codec
from secfedtl.secagg import messages as m
from secfedtl.secagg.config import MAX_CLIENTS, SecAggConfig
from secfedtl.secagg.session import SessionParams

LENGTH = 5


class Fixed:
    """A secure task contributing a fixed vector and weight (no training)."""

    def __init__(self, vector: np.ndarray, weight: int) -> None:
        self.vector, self.weight = vector, weight

    def __call__(self, request: wire.TaskRequest, digest: str) -> TaskOutput:
        return TaskOutput(vector=self.vector, weight=self.weight)


class Tampering:
    """A client node that runs the honest protocol and rewrites its own secure-aggregation
    replies in round ``round``: ``rewrite(message, session)`` returns the message to send, or
    None to send nothing."""

    def __init__(self, node: ClientNode, rewrite, *, round: int = 0) -> None:
        self.node, self.name, self.rewrite, self.round = node, node.name, rewrite, round

    def handle(self, blob: bytes) -> list[bytes]:
        out = []
        for reply in self.node.handle(blob):
            msg = wire.decode(reply)
            if isinstance(msg, wire.SecAggFrame) and msg.round == self.round:
                inner = self.rewrite(codec.decode(msg.data), self.node._session)  # noqa: SLF001
                if inner is None:
                    continue
                reply = wire.encode(wire.SecAggFrame(round=msg.round, data=codec.encode(inner)))
            out.append(reply)
        return out


def build(n: int, rewrites: dict[str, object] | None = None) -> tuple[Federation, dict[str, Fixed]]:
    rng = np.random.default_rng(0)
    tasks = {f"c{i}": Fixed(rng.uniform(-1, 1, LENGTH), int(rng.integers(1, 50))) for i in range(n)}
    roster, keys = Roster.generate(list(tasks))
    nodes: dict[str, object] = {name: ClientNode(name=name, tasks={"train": t}, seed=i, identity=keys[name],
                                                 roster=roster, policy=NodePolicy(min_parties=3))
                                for i, (name, t) in enumerate(tasks.items())}
    for name, rewrite in (rewrites or {}).items():
        nodes[name] = Tampering(nodes[name], rewrite)
    fed = Federation(pool=LocalPool(nodes), roster=roster, names=["w"], global_params=np.zeros(LENGTH),  # type: ignore[arg-type]
                     optimizer=make_server_optimizer("fedavg", server_lr=1.0), clip=1.0, max_samples=100)
    return fed, tasks


def secure(fed: Federation, round: int = 0):
    return fed.secure_round("train", round=round, cohort=fed.pool.names, vector_length=LENGTH, clip=1.0,
                            max_weight=100)


def assert_sum_of(fed: Federation, out, tasks: dict[str, Fixed], names) -> None:
    assert out.status == "ok", out.reason
    assert set(out.included) == set(names)
    expected = sum(tasks[n].weight * tasks[n].vector for n in names)
    bound = fed._secagg_config(len(out.participants), clip=1.0, max_weight=100).encoding.error_bound(len(names))  # noqa: SLF001
    assert np.max(np.abs(out.total - expected)) <= bound
    assert out.total_weight == sum(tasks[n].weight for n in names)


def shares_with(fn):
    def rewrite(msg, session):
        if not isinstance(msg, m.UnmaskResponse):
            return msg
        return dataclasses.replace(msg, self_mask_shares=tuple((o, fn(s)) for o, s in msg.self_mask_shares),
                                   mask_key_shares=tuple((o, fn(s)) for o, s in msg.mask_key_shares))
    return rewrite


def shifted(share: bytes) -> bytes:
    return ((int.from_bytes(share, "big") + 1) % shamir.PRIME).to_bytes(shamir.SHARE_BYTES, "big")


# --- malicious shares and keys through Federation.secure_round ------------------------------------


def test_secure_round_runs_the_one_round_driver(monkeypatch):
    calls = []
    real = fed_mod.drive

    def spy(server, exchange, **kw):
        calls.append(server)
        return real(server, exchange, **kw)

    monkeypatch.setattr(fed_mod, "drive", spy)
    fed, tasks = build(4)
    assert_sum_of(fed, secure(fed), tasks, tasks)
    assert len(calls) == 1


def test_a_share_of_0xff_is_a_dropout_not_a_dead_job():
    fed, tasks = build(5, {"c4": shares_with(lambda s: b"\xff" * shamir.SHARE_BYTES)})
    out = secure(fed)
    assert_sum_of(fed, out, tasks, tasks)  # c4's masked input was in before it lied
    assert out.silent == {"c4": "unmask"}


def test_inconsistent_shares_are_found_set_aside_and_reported():
    fed, tasks = build(6, {"c2": shares_with(shifted)})  # complete graph, t = 3: 5 shares per secret
    out = secure(fed)
    assert_sum_of(fed, out, tasks, tasks)
    assert out.silent == {"c2": "unmask"}


def test_uncorrectable_shares_fail_the_round_with_a_reason_and_the_job_goes_on():
    fed, tasks = build(5, {"c2": shares_with(shifted)})  # t = 3, 4 shares per secret: seen, not located
    reports = fed.run(2)  # round 0 attacked (Tampering.round), round 1 honest
    assert [r.status for r in reports] == ["failed", "ok"]
    assert "cannot be recovered" in reports[0].reason
    assert reports[0].included == () and np.all(np.isfinite(fed.global_params))
    assert set(reports[1].included) == set(tasks)


def test_a_small_order_key_is_refused_and_the_round_completes_without_its_sender():
    def bad_key(msg, session):
        return dataclasses.replace(msg, enc_public_key=bytes(32)) if isinstance(msg, m.AdvertiseKeys) else msg

    fed, tasks = build(5, {"c1": bad_key})
    out = secure(fed)
    assert_sum_of(fed, out, tasks, [n for n in tasks if n != "c1"])
    assert out.silent == {"c1": "advertise"} and out.dropped == ("c1",)


def test_a_dropout_whose_key_shares_do_not_match_its_advert_fails_the_round_cleanly():
    def swap_then_drop(msg, session):
        if isinstance(msg, m.AdvertiseKeys):
            session._mask = cp.generate_x25519()  # noqa: SLF001 - deals shares of another key
            return msg
        return None if isinstance(msg, m.MaskedInput) else msg

    fed, _ = build(5, {"c3": swap_then_drop})
    reports = fed.run(2)
    assert [r.status for r in reports] == ["failed", "ok"]
    assert "dropped client" in reports[0].reason and "another key" in reports[0].reason


def test_a_client_speaking_for_another_is_a_dropout():
    def impersonate(msg, session):
        return dataclasses.replace(msg, sender=(msg.sender + 1) % 5) if isinstance(msg, m.MaskedInput) else msg

    fed, tasks = build(5, {"c0": impersonate})
    out = secure(fed)
    assert_sum_of(fed, out, tasks, [n for n in tasks if n != "c0"])
    assert out.silent == {"c0": "mask"}


def test_an_undecryptable_share_box_makes_its_recipients_drop_out_and_the_round_fail_cleanly():
    """The limit docs/protocol.md states: the server cannot see that a box is garbage; each
    recipient aborts its session and falls silent from 'mask'. Here every honest client is a
    recipient, so round 0 fails cleanly and round 1 (honest) completes."""
    def garbage_boxes(msg, session):
        if isinstance(msg, m.EncryptedShares):
            return dataclasses.replace(msg, ciphertexts=tuple((v, bytes(len(box))) for v, box in msg.ciphertexts))
        return msg

    fed, tasks = build(5, {"c0": garbage_boxes})
    reports = fed.run(2)
    assert [r.status for r in reports] == ["failed", "ok"]
    assert reports[0].silent == {n: "mask" for n in tasks if n != "c0"}
    assert set(reports[1].included) == set(tasks)


# --- decoder bounds ---------------------------------------------------------------------------


def _join_bytes(*, parties: int = 5, **config) -> bytes:
    """A Join whose header announces ``config`` and whose payload carries ``parties`` distinct
    32-byte keys (built by hand, as an attacker would)."""
    cfg = SecAggConfig(num_clients=5, threshold=3, clip=0.5, bits=64, authenticated=True)
    keys = tuple(i.to_bytes(32, "big") for i in range(1, 6))
    blob = wire.encode(wire.Join(round=0, index=0, session=SessionParams(
        config=cfg, session_id=bytes(16), round=0, vector_length=2), parties=keys))
    _, version, kind, head_len = struct.unpack_from(">4sBBI", blob)
    head = json.loads(blob[10:10 + head_len])
    head["session"]["config"].update(config)
    text = json.dumps(head, sort_keys=True, separators=(",", ":")).encode()
    payload = b"".join(i.to_bytes(32, "big") for i in range(1, parties + 1))
    return struct.pack(">4sBBI", wire.MAGIC, version, kind, len(text)) + text + struct.pack(">Q", len(payload)) + payload


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    except DecodeError:
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_an_oversized_join_is_refused_before_anything_is_built():
    n = 40_000
    scale = 2.0 ** 20  # a scale that would be safe for 40,000 clients at 64 bits
    blob = _join_bytes(num_clients=n, threshold=n // 2 + 1, min_survivors=n // 2 + 1, scale=scale)
    assert len(blob) < 500  # a few hundred bytes (five party keys included)
    with pytest.raises(DecodeError, match="at most"):
        wire.decode(blob)
    # Before: the decoder built 40,000 neighbour sets of 39,999 ids (gigabytes). Now the peak
    # allocation while refusing it is a few pages.
    assert _peak_bytes(lambda: wire.decode(blob)) < 256 * 1024


def test_the_largest_join_decodes_without_building_its_graph():
    n = MAX_CLIENTS
    blob = _join_bytes(num_clients=n, threshold=n // 2 + 1, min_survivors=n // 2 + 1, scale=2.0 ** 20, parties=n)
    join = wire.decode(blob)
    assert join.session.config.num_clients == n
    # a complete graph on 10,000 clients is 10**8 ids; decoding allocates a few times the 320 kB of
    # party keys it carries, never the graph
    assert _peak_bytes(lambda: wire.decode(blob)) < 4 * len(blob) + 1024 * 1024


def test_a_node_refuses_an_oversized_join_and_stays_usable():
    fed, _ = build(3)
    node = fed.pool.nodes["c0"]
    n = 40_000
    blob = _join_bytes(num_clients=n, threshold=n // 2 + 1, min_survivors=n // 2 + 1, scale=2.0 ** 20)
    assert fed.pool.exchange({"c0": [blob]}, phase="advertise") == {}  # silent, no exception
    with pytest.raises(DecodeError):
        node.handle(blob)
    assert secure(fed).status == "ok"


SIZES = st.integers(0, 2**40) | st.integers(0, 2 * MAX_CLIENTS) | st.integers(2, 12)


@settings(max_examples=200, deadline=None)
@given(num_clients=SIZES, threshold=st.integers(-1, 2**40) | st.integers(2, 12), neighbors=st.none() | SIZES,
       scale=st.sampled_from([1.0, 2.0**20]) | st.floats(allow_nan=False, allow_infinity=False, min_value=-1e30,
                                                        max_value=1e30),
       bits=st.sampled_from([32, 64]) | st.integers(0, 70), vector_length=st.integers(-1, 2**62))
def test_fuzzed_join_sizes_raise_only_decode_error_and_never_build_big(num_clients, threshold, neighbors, scale,
                                                                       bits, vector_length):
    blob = _join_bytes(num_clients=num_clients, threshold=threshold, neighbors=neighbors, scale=scale, bits=bits,
                       min_survivors=threshold)
    text = blob.replace(b'"vector_length":2', b'"vector_length":' + str(vector_length).encode())
    blob = text[:6] + struct.pack(">I", len(text) - 18 - 5 * 32) + text[10:]
    try:
        join = wire.decode(blob)
    except DecodeError:
        return
    assert join.session.config.num_clients <= MAX_CLIENTS
    assert join.session.neighbours._cache == {}  # noqa: SLF001 - nothing built while decoding


# --- malformed task options -------------------------------------------------------------------


class StubClient:
    """Just enough of a PrivateClient for TrainTask's request check; training must not start."""

    trainable_names = ["w"]

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {"w": torch.zeros(LENGTH)}

    def train_round(self, **kwargs):  # pragma: no cover - reaching it is the failure
        raise AssertionError("a malformed request must be refused before training")


@pytest.mark.parametrize("names", [5, "w", {"w": 1}, None, [5]])
def test_task_options_of_the_wrong_type_are_a_failed_reply_not_a_crash(names):
    roster, keys = Roster.generate(["h", "x", "y"])
    node = ClientNode(name="h", tasks={"train": TrainTask(StubClient())}, identity=keys["h"], roster=roster)
    encoding = {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1}
    request = wire.TaskRequest.with_weights(round=0, task="train", weights=np.zeros(LENGTH),
                                            options={"names": names, "encoding": encoding})
    (reply,) = node.handle(wire.encode(request))  # before: TypeError ("'int' object is not iterable")
    reply = wire.decode(reply)
    assert reply.status == "failed" and reply.info == {"reason": "failed"}  # a fixed, data-free reason
    again = wire.TaskRequest.with_weights(round=1, task="train", weights=np.zeros(LENGTH),  # round 0 is answered
                                          options={"names": names, "encoding": encoding})
    out = LocalPool({"h": node}).exchange({"h": [wire.encode(again)]}, phase="task")
    assert wire.decode(out["h"][0]).status == "failed"


def test_a_batch_claiming_more_items_than_fit_is_refused_before_reading_any():
    from secfedtl.runtime.batch import pack_batch, unpack_batch

    blob = pack_batch(7, [("c0", b"x")])
    forged = blob[:12] + struct.pack(">I", 0xFFFFFFFF) + blob[16:]
    with pytest.raises(DecodeError, match="cannot fit"):
        unpack_batch(forged)
    assert unpack_batch(blob) == (7, [("c0", b"x")])


def test_the_wire_size_limit_is_checked_before_the_bytes_are_copied():
    big = memoryview(bytearray(1 << 20))
    with pytest.raises(DecodeError, match="over the limit"):
        wire.decode(big, max_bytes=1024)
    assert _peak_bytes(lambda: wire.decode(big, max_bytes=1024)) < 64 * 1024
