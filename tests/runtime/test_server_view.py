"""What the server sees, through the production runners.

Two guarantees of docs/privacy.md, tested on whole heart jobs:

1. **Every value that leaves a hospital is accounted for.** Every byte the server receives is
   decoded, field by field, and each field must be a masked payload whose content is the output of
   a mechanism already charged in that hospital's ledger, protocol key material, or a value from a
   fixed, data-free set (statuses and reasons). Run in process and with worker processes (the
   Flower transport carries the same bytes: tests/runtime/test_flower.py checks its view too).
2. **Neighbouring datasets give the same view up to charged outputs.** With all randomness fixed
   by the test (DP sampling and noise seeded, every key, nonce and share from a deterministic
   stream), the job runs on the hospitals' data and on the same data with one record added to, or
   removed from, one hospital: the two server views are equal message for message, except the
   masked inputs of that hospital, which carry its charged DP-SGD output.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from secfedtl.crypto import primitives as cp
from secfedtl.crypto import shamir
from secfedtl.data import in_validation, split_key
from secfedtl.runtime import job as job_mod
from secfedtl.runtime import wire
from secfedtl.runtime.job import JobConfig, run_job
from secfedtl.runtime.pool import LocalPool, ProcessPool
from secfedtl.testing.server_view import classify

HOSPITALS = ("hungary", "switzerland", "va")
def small_config(**privacy: Any) -> JobConfig:
    data = JobConfig.load(None).to_dict()
    data["job"]["rounds"] = 1
    data["job"]["id"] = "server-view"
    data["model"]["source_epochs"] = 40
    data["privacy"].update(privacy)
    return JobConfig.from_mapping(data)


def record_views(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str, str, bytes]]:
    """Patch every pool so that each exchange is recorded: (direction, phase, node, bytes)."""
    log: list[tuple[str, str, str, bytes]] = []
    for cls in (LocalPool, ProcessPool):
        real = cls.exchange

        def exchange(self, requests, *, phase, _real=real):  # type: ignore[no-untyped-def]
            for name in sorted(requests):
                log.extend(("to", phase, name, b) for b in requests[name])
            replies = _real(self, requests, phase=phase)
            for name in sorted(replies):
                log.extend(("from", phase, name, b) for b in replies[name])
            return replies

        monkeypatch.setattr(cls, "exchange", exchange)
    return log


@pytest.mark.parametrize("workers", [0, 2])
def test_every_byte_the_server_receives_is_masked_charged_or_public(tmp_path, monkeypatch, workers, request):
    if workers:
        request.getfixturevalue("fork_safe")
    log = record_views(monkeypatch)
    state = tmp_path / "state"
    metrics = run_job(small_config(), tmp_path / "out", progress=False, workers=workers, state_dir=state)
    digests: dict[int, str] = {}
    masked_from: dict[str, list[int]] = {}
    for direction, phase, name, blob in log:
        if direction == "to":
            msg = wire.decode(blob)
            if isinstance(msg, wire.TaskRequest):
                digests[msg.round] = wire.request_digest(msg)
            continue
        kind, _ = classify(blob)
        if kind == "masked":
            rnd = wire.decode(blob).round
            masked_from.setdefault(name, []).append(rnd)
    # Every hospital's masked input in every round is the output of a DP-SGD release that its
    # ledger charged for that round and that exact request (model_hash = the request's digest).
    assert set(masked_from) == set(HOSPITALS)
    for name, rounds in masked_from.items():
        entries = [json.loads(line) for line in (state / name / "ledger.jsonl").read_text().splitlines()]
        charged = {(e["round"], e["model_hash"]) for e in entries if e["status"] == "pending"
                   and e["release"] == "dpsgd_update" and e["randomness"] == "csprng"}
        for rnd in rounds:
            assert (rnd, digests[rnd]) in charged
    # The FedAvg weight in the sum is the declared public counts of the included hospitals.
    declared = small_config()["declared"]["records"]
    for row in metrics["server"]["rounds"]:
        assert row["total_weight"] == sum(declared[n] for n in row["included"])
    # Personalisation and evaluation answers never crossed the wire.
    assert set(metrics["server"]["personalisation"].values()) == {"done"}


# -- neighbouring datasets, with every random draw fixed by the test ----------------------------


class _Stream:
    """A deterministic byte stream standing in for os.urandom (tests only)."""

    def __init__(self, seed: bytes) -> None:
        self.key, self.counter = hashlib.sha256(seed).digest(), 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.key + self.counter.to_bytes(8, "big")).digest()
            self.counter += 1
        return out[:n]


def fix_all_randomness(monkeypatch: pytest.MonkeyPatch) -> None:
    stream = _Stream(b"server-view")
    monkeypatch.setattr("os.urandom", stream)

    class DetX25519:
        generate = staticmethod(lambda: X25519PrivateKey.from_private_bytes(stream(32)))
        from_private_bytes = staticmethod(X25519PrivateKey.from_private_bytes)

    class DetEd25519:
        generate = staticmethod(lambda: Ed25519PrivateKey.from_private_bytes(stream(32)))
        from_private_bytes = staticmethod(Ed25519PrivateKey.from_private_bytes)

    class DetSecrets:
        @staticmethod
        def randbelow(n: int) -> int:
            return int.from_bytes(stream(96), "big") % n

        @staticmethod
        def token_bytes(n: int) -> bytes:
            return stream(n)

    monkeypatch.setattr(cp, "X25519PrivateKey", DetX25519)
    monkeypatch.setattr(cp, "Ed25519PrivateKey", DetEd25519)
    monkeypatch.setattr(shamir, "secrets", DetSecrets)


def _in_fit(config: JobConfig, x: np.ndarray, y: int) -> bool:
    job = config["job"]
    return not in_validation(x, y, job["validation_fraction"], split_key(job["seed"]))


def neighbour(change: str, split: str = "fit") -> Callable[[JobConfig], dict[str, Any]]:
    """The job's centres, with Hungary's training data changed by one record that lands in
    ``split`` (record-stable splits: only that record moves)."""
    real = job_mod.build_centres

    def centres(config: JobConfig) -> dict[str, Any]:
        out = real(config)
        if change == "none":
            return out
        c = out["hungary"]
        want_fit = split == "fit"
        if change == "add":  # a new patient: a perturbed copy of a row, in the wanted split
            extra = next(c.x_train[0] + 0.01 * k for k in range(1, 200)
                         if _in_fit(config, c.x_train[0] + 0.01 * k, 1) == want_fit)
            x, y = np.concatenate([c.x_train, extra[None]]), np.concatenate([c.y_train, [1]])
        else:  # one patient removed, from the wanted split
            i = next(i for i in range(len(c.y_train)) if _in_fit(config, c.x_train[i], int(c.y_train[i])) == want_fit)
            x, y = np.delete(c.x_train, i, axis=0), np.delete(c.y_train, i)
        out["hungary"] = dataclasses.replace(c, x_train=x, y_train=y)
        return out

    return centres


def server_view(tmp: Path, monkeypatch: pytest.MonkeyPatch, change: str, run: str,
                split: str = "fit") -> list[tuple[str, str, Any]]:
    """The decoded messages the server received in one job (a fresh output folder and fresh
    hospital states, so every run starts from the same budgets)."""
    with monkeypatch.context() as patch:
        fix_all_randomness(patch)
        patch.setattr(job_mod, "build_centres", neighbour(change, split))
        log = record_views(patch)
        config = small_config(secure_mode=False, insecure_reproducible=True)
        run_job(config, tmp / run, progress=False, workers=0, state_dir=tmp / f"state-{run}")
    return [(phase, name, classify(blob)) for direction, phase, name, blob in log if direction == "from"]


@pytest.mark.filterwarnings("ignore:privacy.insecure_reproducible")
@pytest.mark.parametrize("change", ["add", "remove"])
def test_neighbouring_datasets_differ_only_in_charged_outputs(tmp_path, monkeypatch, change):
    base = server_view(tmp_path, monkeypatch, "none", "base")
    again = server_view(tmp_path, monkeypatch, "none", "again")
    assert base == again  # the test fixes every random draw: identical data, identical view
    other = server_view(tmp_path, monkeypatch, change, change)
    assert len(other) == len(base)
    differing = [(a[0], a[1], a[2][0]) for a, b in zip(base, other) if a != b]
    for a, b in zip(base, other):
        assert (a[0], a[1], a[2][0]) == (b[0], b[1], b[2][0])  # same phases, senders and kinds
    # The only differences: hungary's masked input (its charged DP-SGD output changed).
    assert differing == [("mask", "hungary", "masked")]
    # A record added to or removed from the validation split (which nothing releases) leaves
    # the server's view unchanged.
    assert server_view(tmp_path, monkeypatch, change, f"{change}-val", split="validation") == base


@pytest.mark.parametrize("weight", [1e30, 1e5])
def test_adversarial_weights_give_the_same_status_with_or_without_a_record(tmp_path, monkeypatch, weight):
    """A malicious server picks global weights so that one record's loss overflows (the review's
    "failure oracle"). The reply must not depend on whether the record is there: weights beyond
    the public bound are refused before anything is charged (whatever the data), and a record
    whose loss is not finite contributes zero instead of failing the round."""
    from secfedtl.runtime.job import build_client_node, build_source, open_hospital_state
    from secfedtl.runtime.roster import Roster
    from secfedtl.training import flatten_params

    statuses = {}
    for change in ("none", "remove"):
        with monkeypatch.context() as patch:
            patch.setattr(job_mod, "build_centres", neighbour(change))
            config = small_config()
            source = build_source(config)
            state = open_hospital_state(config, "hungary", source.centres, tmp_path / change)
            roster, keys = Roster.generate(list(HOSPITALS))
            node = build_client_node(config, "hungary", source, state, identity=keys["hungary"], roster=roster).node
            head = source.head
            head["head.weight"][1, 3] = weight  # the logit of class 1 follows feature 3 alone
            options = {"names": list(head), "frozen_hash": source.frozen_hash,
                       "encoding": {"clip": 1.0, "bits": 32, "num_clients": 3, "max_weight": 1000}}
            replies = []
            for r in range(2):  # the job plans two releases (one round and personalisation)
                request = wire.TaskRequest.with_weights(round=r, task="train", weights=flatten_params(head),
                                                        options=options)
                replies.append(wire.decode(node.handle(wire.encode(request))[0]).status)
            statuses[change] = replies
            state.close()
    assert statuses["none"] == statuses["remove"]
    assert set(statuses["none"]) == ({"failed"} if weight > 1e6 else {"ready"})
