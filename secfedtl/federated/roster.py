"""The federation's roster and a hospital's policy: the hospital, not the server, decides whom it
aggregates with.

A :class:`Roster` pins the long-term Ed25519 signing public key of every hospital of the
federation (and, optionally, the server's). Every node holds it, with its own signing key and a
:class:`NodePolicy`; every secure-aggregation session the server proposes names, for each session
index, the public key of the party at that index (:class:`~secfedtl.federated.wire.Join`), and a
node refuses the session unless every key is in its roster, its own key is at its own index, and
the parameters meet its policy. Key adverts and survivor lists are then signed and checked
against the pinned keys, so a server can neither invent parties (sybils) nor substitute keys.

Files (JSON, UTF-8, each with ``format`` and ``version``; unknown versions are refused):

* signing key, ``NAME.key``, mode 0600: ``{"format": "secfedtl-signing-key", "version": 1,
  "name": ..., "private": hex, "public": hex}``; loading refuses a file others can read;
* public key, ``NAME.pub``: ``{"format": "secfedtl-public-key", "version": 1, "name": ...,
  "public": hex}``;
* roster, ``roster.json``: ``{"format": "secfedtl-roster", "version": 1, "parties": {name:
  hex, ...}, "server": hex or null}``.

``secfedtl keys new NAME --out DIR`` writes a key pair; ``secfedtl keys roster --out roster.json
A.pub B.pub ...`` builds a roster and prints each key's fingerprint, to be compared out of band
(docs/deploy-flower.md). Key material is never logged or shown in ``repr``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from secfedtl.crypto.primitives import SigningKey
from secfedtl.errors import ConfigError, CryptoError, PolicyError
from secfedtl.secagg.config import MIN_CLIENTS, SecAggConfig, tolerated_colluders

FILE_VERSION = 1
KEY_FORMAT = "secfedtl-signing-key"
PUBLIC_FORMAT = "secfedtl-public-key"
ROSTER_FORMAT = "secfedtl-roster"
PUBLIC_KEY_BYTES = 32
MAX_NAME = 64


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_NAME or not name.isprintable():
        raise ConfigError(f"a party name must be 1..{MAX_NAME} printable characters, got {name!r}")
    return name


def _check_public(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != PUBLIC_KEY_BYTES:
        raise ConfigError(f"{what} must be a {PUBLIC_KEY_BYTES}-byte Ed25519 public key")
    return value


def _hex_key(value: object, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a hex string")
    try:
        return _check_public(bytes.fromhex(value), what)
    except ValueError as exc:
        raise ConfigError(f"{what} is not hex") from exc


def fingerprint(public: bytes) -> str:
    """A short, human-comparable digest of a public key (SHA-256, 16 bytes, in groups of 4 hex)."""
    digest = hashlib.sha256(b"secfedtl/ed25519/" + _check_public(public, "key")).hexdigest()[:32]
    return ":".join(digest[i:i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True, kw_only=True, eq=False)
class Roster:
    """The federation's parties: name -> Ed25519 signing public key (distinct keys, at least 3
    parties), and the server's public key when the federation pins it."""

    parties: Mapping[str, bytes]
    server: bytes | None = None
    _by_key: dict[bytes, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.parties, Mapping):
            raise ConfigError("parties must map names to public keys")
        parties = {_check_name(n): _check_public(k, f"the key of {n!r}") for n, k in sorted(self.parties.items())}
        if len(parties) < MIN_CLIENTS:
            raise ConfigError(f"a roster needs at least {MIN_CLIENTS} parties")
        by_key = {k: n for n, k in parties.items()}
        if len(by_key) != len(parties):
            raise ConfigError("two parties of the roster share one public key")
        if self.server is not None and _check_public(self.server, "the server key") in by_key:
            raise ConfigError("the server's key is also a party's key")
        object.__setattr__(self, "parties", parties)
        object.__setattr__(self, "_by_key", by_key)

    def __repr__(self) -> str:
        return f"Roster(parties={sorted(self.parties)}, server={'pinned' if self.server else None})"

    def __len__(self) -> int:
        return len(self.parties)

    def name_of(self, public: bytes) -> str | None:
        """The roster name of a public key, or None when the key is not pinned."""
        return self._by_key.get(public)

    def key_of(self, name: str) -> bytes:
        try:
            return self.parties[name]
        except KeyError:
            raise ConfigError(f"{name!r} is not in the roster") from None

    def to_json(self) -> dict[str, Any]:
        return {"format": ROSTER_FORMAT, "version": FILE_VERSION,
                "parties": {n: k.hex() for n, k in self.parties.items()},
                "server": None if self.server is None else self.server.hex()}

    @classmethod
    def from_json(cls, data: Any) -> Roster:
        if not isinstance(data, dict) or data.get("format") != ROSTER_FORMAT:
            raise ConfigError("not a secfedtl roster")
        if data.get("version") != FILE_VERSION:
            raise ConfigError(f"unknown roster version {data.get('version')!r}")
        if set(data) != {"format", "version", "parties", "server"} or not isinstance(data["parties"], dict):
            raise ConfigError("a roster has exactly: format, version, parties, server")
        parties = {n: _hex_key(k, f"the key of {n!r}") for n, k in data["parties"].items()}
        server = None if data["server"] is None else _hex_key(data["server"], "the server key")
        return cls(parties=parties, server=server)

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Roster:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ConfigError(f"cannot read the roster {path}: {exc}") from exc
        return cls.from_json(data)

    @classmethod
    def generate(cls, names: Iterable[str]) -> tuple[Roster, dict[str, SigningKey]]:
        """Fresh signing keys (from the OS CSPRNG) for ``names`` and their roster: simulations and
        tests, where one process plays every hospital. A deployment uses ``secfedtl keys``."""
        keys = {_check_name(n): SigningKey.generate() for n in names}
        return cls(parties={n: k.public for n, k in keys.items()}), keys


@dataclass(frozen=True, kw_only=True)
class NodePolicy:
    """What a hospital accepts in a secure-aggregation session the server proposes.

    * ``min_parties``: the fewest roster parties in a session; default ``None``: all the
      roster's parties but a quarter (rounded down), never fewer than 3. A federation that samples
      small cohorts declares its own.
    * ``colluders``: how many clients the hospital assumes may collude with an active server; a
      session must tolerate them, ``2t - k - 1 >= colluders`` (docs/protocol.md).
    * ``min_threshold``, ``min_degree``: optional floors on the Shamir threshold ``t`` and the
      graph degree ``k`` (``min_degree = num_clients - 1`` asks for the complete graph).
    * ``max_sessions``: the most sessions the node joins in its lifetime (one job), or ``None``.
    * ``max_tasks``: the most tasks (other than repeatable ones) the node runs in its lifetime (one
      job), or ``None``. Every task may charge the budget when its request arrives, before any
      session: a job that plans ``r`` rounds and a personalisation sets ``r + 1``, so a server can
      never make the node charge more releases than the job plans (the budget guard bounds the
      epsilon anyway; this bounds how the server can spend it).
    """

    min_parties: int | None = None
    colluders: int = 0
    min_threshold: int | None = None
    min_degree: int | None = None
    max_sessions: int | None = None
    max_tasks: int | None = None

    def __post_init__(self) -> None:
        for name in ("min_parties", "min_threshold", "min_degree", "max_sessions", "max_tasks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer or None, got {value!r}")
        if self.min_parties is not None and self.min_parties < MIN_CLIENTS:
            raise ConfigError(f"min_parties must be at least {MIN_CLIENTS}")
        if isinstance(self.colluders, bool) or not isinstance(self.colluders, int) or self.colluders < 0:
            raise ConfigError(f"colluders must be a non-negative integer, got {self.colluders!r}")

    def parties_required(self, roster: Roster) -> int:
        """The fewest parties a session must have under this policy and ``roster``."""
        if self.min_parties is not None:
            return self.min_parties
        return max(MIN_CLIENTS, len(roster) - len(roster) // 4)

    def check(self, config: SecAggConfig, *, roster: Roster, sessions_joined: int) -> None:
        """Raise :class:`PolicyError` unless a session with ``config`` is acceptable."""
        n, k, t = config.num_clients, config.degree, config.threshold
        if n < self.parties_required(roster):
            raise PolicyError(f"a session of {n} parties; this node's policy asks for at least "
                              f"{self.parties_required(roster)}")
        if not config.authenticated:
            raise PolicyError("an unauthenticated session; this node joins only signed sessions")
        if tolerated_colluders(degree=k, threshold=t) < self.colluders:
            raise PolicyError(f"threshold {t} of {k} neighbours tolerates "
                              f"{max(0, tolerated_colluders(degree=k, threshold=t))} colluders against an "
                              f"active server; this node's policy declares {self.colluders}")
        if self.min_threshold is not None and t < self.min_threshold:
            raise PolicyError(f"threshold {t} is below this node's policy ({self.min_threshold})")
        if self.min_degree is not None and k < min(self.min_degree, n - 1):
            raise PolicyError(f"graph degree {k} is below this node's policy ({self.min_degree})")
        if self.max_sessions is not None and sessions_joined >= self.max_sessions:
            raise PolicyError(f"this node already joined {sessions_joined} sessions, its policy's maximum")


# -- key files -----------------------------------------------------------------------------------


def write_signing_key(path: str | os.PathLike[str], *, name: str, key: SigningKey) -> None:
    """Write a signing key file, mode 0600, refusing to overwrite an existing file."""
    data = json.dumps({"format": KEY_FORMAT, "version": FILE_VERSION, "name": _check_name(name),
                       "private": key.private.hex(), "public": key.public.hex()}, indent=2) + "\n"
    try:
        fd = os.open(os.fspath(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise ConfigError(f"{path} exists: refusing to overwrite a key") from exc
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(data)


def load_signing_key(path: str | os.PathLike[str]) -> tuple[str, SigningKey]:
    """``(name, key)`` from a signing key file; refuses a file that group or others can read."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except OSError as exc:
        raise ConfigError(f"cannot read the signing key {p}: {type(exc).__name__}") from exc
    if stat.S_IMODE(mode) & 0o077:
        raise ConfigError(f"{p} is readable by other users: chmod 600 it")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # the message never quotes the file
        raise ConfigError(f"cannot read the signing key {p}: {type(exc).__name__}") from exc
    if not isinstance(data, dict) or data.get("format") != KEY_FORMAT or data.get("version") != FILE_VERSION:
        raise ConfigError(f"{p} is not a version {FILE_VERSION} secfedtl signing key")
    if set(data) != {"format", "version", "name", "private", "public"} or not isinstance(data["private"], str):
        raise ConfigError(f"{p} is not a version {FILE_VERSION} secfedtl signing key")
    try:
        key = SigningKey.from_private(bytes.fromhex(data["private"]))
    except (ValueError, CryptoError) as exc:
        raise ConfigError(f"{p} holds no valid Ed25519 key") from exc
    if key.public != _hex_key(data["public"], "the public key"):
        raise ConfigError(f"{p}: the public key does not belong to the private key")
    return _check_name(data["name"]), key


def write_public_key(path: str | os.PathLike[str], *, name: str, public: bytes) -> None:
    data = {"format": PUBLIC_FORMAT, "version": FILE_VERSION, "name": _check_name(name),
            "public": _check_public(public, "the public key").hex()}
    Path(path).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def load_public_key(path: str | os.PathLike[str]) -> tuple[str, bytes]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"cannot read the public key {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != PUBLIC_FORMAT or data.get("version") != FILE_VERSION \
            or set(data) != {"format", "version", "name", "public"}:
        raise ConfigError(f"{path} is not a version {FILE_VERSION} secfedtl public key")
    return _check_name(data["name"]), _hex_key(data["public"], "the public key")


def write_simulated_keys(directory: str | os.PathLike[str], names: Iterable[str]) -> Path:
    """Fresh key files for ``names`` (``NAME.key``, 0600) and ``roster.json`` in ``directory``
    (created 0700): what one machine playing every hospital needs (local Flower deployments,
    tests). Returns the roster's path."""
    d = Path(directory)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    roster, keys = Roster.generate(names)
    for name, key in keys.items():
        write_signing_key(d / f"{name}.key", name=name, key=key)
    roster.save(d / "roster.json")
    return d / "roster.json"


# -- `secfedtl keys` -----------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", required=True)
    new = sub.add_parser("new", help="create a signing key pair: NAME.key (0600, stays with its owner) and NAME.pub")
    new.add_argument("name", help="the party's roster name (a hospital's client name, or 'server')")
    new.add_argument("--out", type=Path, default=Path("."), help="directory for NAME.key and NAME.pub")
    roster = sub.add_parser("roster", help="build roster.json from the parties' NAME.pub files")
    roster.add_argument("public", nargs="+", type=Path, help="the hospitals' .pub files")
    roster.add_argument("--server", type=Path, default=None, help="the server's .pub file (optional)")
    roster.add_argument("--out", type=Path, required=True, help="roster file to write")
    show = sub.add_parser("show", help="print a roster's names and key fingerprints")
    show.add_argument("roster", type=Path)


def _print_roster(roster: Roster) -> None:
    for name, key in roster.parties.items():
        print(f"{name:<24} {fingerprint(key)}")
    if roster.server is not None:
        print(f"{'(server)':<24} {fingerprint(roster.server)}")


def main(args: argparse.Namespace) -> int:
    if args.keys_command == "new":
        if Path(args.name).name != args.name or args.name.startswith("."):  # it names the files: stay in --out
            raise ConfigError(f"a key's name is also its file name in --out: no '/' and no leading '.', "
                              f"got {args.name!r}")
        args.out.mkdir(parents=True, exist_ok=True)
        key = SigningKey.generate()
        write_signing_key(args.out / f"{args.name}.key", name=args.name, key=key)
        write_public_key(args.out / f"{args.name}.pub", name=args.name, public=key.public)
        print(f"wrote {args.out / (args.name + '.key')} (private, mode 0600: never copy it elsewhere) and "
              f"{args.out / (args.name + '.pub')}; fingerprint {fingerprint(key.public)}")
        return 0
    if args.keys_command == "roster":
        parties: dict[str, bytes] = {}
        for path in args.public:
            name, public = load_public_key(path)
            if name in parties:
                raise ConfigError(f"two public keys for {name!r}")
            parties[name] = public
        server = None if args.server is None else load_public_key(args.server)[1]
        roster = Roster(parties=parties, server=server)
        roster.save(args.out)
        print(f"wrote {args.out}; compare every fingerprint with its owner out of band:")
        _print_roster(roster)
        return 0
    _print_roster(Roster.load(args.roster))
    return 0


__all__ = ["NodePolicy", "Roster", "fingerprint", "load_public_key", "load_signing_key", "write_public_key",
           "write_signing_key", "write_simulated_keys"]
