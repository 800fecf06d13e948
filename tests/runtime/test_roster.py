"""secfedtl.runtime.roster: key and roster files, the node policy, and `secfedtl keys`."""

from __future__ import annotations

import json
import os
import stat

import pytest

from secfedtl.cli import main as cli
from secfedtl.crypto.primitives import SigningKey
from secfedtl.errors import ConfigError, PolicyError
from secfedtl.runtime.roster import (
    NodePolicy,
    Roster,
    fingerprint,
    load_public_key,
    load_signing_key,
    write_signing_key,
    write_simulated_keys,
)
from secfedtl.secagg.config import SecAggConfig


def test_a_signing_key_file_is_private_and_round_trips(tmp_path):
    key = SigningKey.generate()
    path = tmp_path / "h.key"
    write_signing_key(path, name="hungary", key=key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    name, back = load_signing_key(path)
    assert name == "hungary" and back.public == key.public and back.private == key.private
    with pytest.raises(ConfigError, match="refusing to overwrite"):
        write_signing_key(path, name="hungary", key=SigningKey.generate())
    assert key.private.hex() not in repr(back)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        load_signing_key(path)


@pytest.mark.parametrize("change", [
    {"version": 2}, {"format": "other"}, {"private": "00" * 31}, {"public": "00" * 32}, {"extra": 1},
])
def test_malformed_key_files_are_refused(tmp_path, change):
    key = SigningKey.generate()
    data = {"format": "secfedtl-signing-key", "version": 1, "name": "h", "private": key.private.hex(),
            "public": key.public.hex(), **change}
    path = tmp_path / "k.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)
    with pytest.raises(ConfigError):
        load_signing_key(path)


def test_roster_round_trip_and_refusals(tmp_path):
    roster, keys = Roster.generate(["a", "b", "c"])
    roster.save(tmp_path / "r.json")
    back = Roster.load(tmp_path / "r.json")
    assert back.parties == roster.parties and back.name_of(keys["b"].public) == "b"
    assert back.name_of(SigningKey.generate().public) is None
    k = SigningKey.generate().public
    for bad in ({"a": k, "b": k, "c": SigningKey.generate().public},  # one key, two parties
                {"a": k, "b": SigningKey.generate().public},          # fewer than 3
                {"a": k, "b": b"short", "c": SigningKey.generate().public}):
        with pytest.raises(ConfigError):
            Roster(parties=bad)
    with pytest.raises(ConfigError, match="server"):
        Roster(parties=roster.parties, server=keys["a"].public)
    data = roster.to_json()
    for change in ({"version": 2}, {"format": "x"}, {"extra": 1}, {"parties": {"a": "zz"}}):
        with pytest.raises(ConfigError):
            Roster.from_json({**data, **change})


def test_the_default_policy_asks_for_all_but_a_quarter_of_the_roster():
    assert NodePolicy().parties_required(Roster.generate("abc")[0]) == 3
    assert NodePolicy().parties_required(Roster.generate([f"h{i}" for i in range(10)])[0]) == 8
    assert NodePolicy(min_parties=4).parties_required(Roster.generate([f"h{i}" for i in range(10)])[0]) == 4
    with pytest.raises(ConfigError):
        NodePolicy(min_parties=2)
    with pytest.raises(ConfigError):
        NodePolicy(colluders=-1)


def test_policy_checks_collusion_tolerance_and_authentication():
    roster = Roster.generate([f"h{i}" for i in range(20)])[0]
    ok = SecAggConfig(num_clients=20, threshold=11, authenticated=True)  # k=19: tolerates 2
    NodePolicy(colluders=2).check(ok, roster=roster, sessions_joined=0)
    with pytest.raises(PolicyError, match="colluders"):
        NodePolicy(colluders=3).check(ok, roster=roster, sessions_joined=0)
    with pytest.raises(PolicyError, match="colluders"):  # the old rule's n=20 (t=10) tolerated none
        NodePolicy(colluders=1).check(SecAggConfig(num_clients=20, threshold=10, authenticated=True),
                                      roster=roster, sessions_joined=0)
    with pytest.raises(PolicyError, match="unauthenticated"):
        NodePolicy().check(SecAggConfig(num_clients=20, threshold=11), roster=roster, sessions_joined=0)
    with pytest.raises(PolicyError, match="degree"):
        NodePolicy(min_degree=19).check(SecAggConfig(num_clients=20, threshold=10, neighbours=18,
                                                     authenticated=True), roster=roster, sessions_joined=0)


def test_keys_command_creates_keys_and_a_roster(tmp_path, capsys):
    for name in ("hungary", "switzerland", "va", "server"):
        assert cli(["keys", "new", name, "--out", str(tmp_path / name)]) == 0
        assert stat.S_IMODE((tmp_path / name / f"{name}.key").stat().st_mode) == 0o600
    out = capsys.readouterr().out
    assert "private" in out and load_signing_key(tmp_path / "va" / "va.key")[1].private.hex() not in out
    pubs = [str(tmp_path / n / f"{n}.pub") for n in ("hungary", "switzerland", "va")]
    assert cli(["keys", "roster", *pubs, "--server", str(tmp_path / "server" / "server.pub"),
                "--out", str(tmp_path / "roster.json")]) == 0
    roster = Roster.load(tmp_path / "roster.json")
    assert sorted(roster.parties) == ["hungary", "switzerland", "va"]
    assert roster.server == load_public_key(tmp_path / "server" / "server.pub")[1]
    printed = capsys.readouterr().out
    assert fingerprint(roster.key_of("va")) in printed
    assert cli(["keys", "show", str(tmp_path / "roster.json")]) == 0
    assert fingerprint(roster.key_of("hungary")) in capsys.readouterr().out
    assert cli(["keys", "new", "va", "--out", str(tmp_path / "va")]) == 2  # never overwrites a key


def test_simulated_keys_for_one_machine(tmp_path):
    path = write_simulated_keys(tmp_path / "k", ["a", "b", "c"])
    roster = Roster.load(path)
    for name in "abc":
        assert load_signing_key(tmp_path / "k" / f"{name}.key")[1].public == roster.key_of(name)
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700


def test_a_node_refuses_a_key_outside_the_roster_or_an_impossible_policy():
    from secfedtl.runtime.node import ClientNode

    roster, keys = Roster.generate(["a", "b", "c"])
    tasks = {"train": lambda request, digest: None}
    with pytest.raises(ConfigError, match="not in the roster"):
        ClientNode(name="a", tasks=tasks, identity=SigningKey.generate(), roster=roster)
    with pytest.raises(ConfigError, match="asks for 4 parties"):
        ClientNode(name="a", tasks=tasks, identity=keys["a"], roster=roster, policy=NodePolicy(min_parties=4))
    assert keys["a"].private.hex() not in repr(ClientNode(name="a", tasks=tasks, identity=keys["a"], roster=roster))
