"""media/dicom.py on pydicom's bundled test files: header reads, slice ordering, series
item names, de-identification and its key."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import random
import shutil
import stat
import threading
from pathlib import Path

import pydicom
import pytest
from ingestd.core.errors import MediaError, SourceChangedError
from ingestd.media import dicom as dicom_module
from ingestd.media.dicom import (
    DicomHeader,
    deidentify,
    deidentify_header,
    is_identifying_keyword,
    load_or_create_key,
    pseudonymize_uid,
    read_header,
    series_item_name,
    slice_order_key,
    verify_dicom,
)
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID_dictionary

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent
CT_SMALL = TEST_FILES / "CT_small.dcm"
MR_SMALL = TEST_FILES / "MR_small.dcm"
# One CT series of five slices, InstanceNumber 6..10, z going down as the number goes up.
CT5N = TEST_FILES / "dicomdirtests" / "98892001" / "CT5N"
KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def ordered(folder: Path) -> list[str]:
    items = [(p.name, read_header(str(p))) for p in folder.iterdir()]
    return [name for name, h in sorted(items, key=lambda t: slice_order_key(t[1], t[0]))]


def bare_copy(src: Path, dst: Path) -> Path:
    """The data set alone: no 128-byte preamble, no DICM, no file meta (old PACS exports)."""
    ds = pydicom.dcmread(src)
    ds.file_meta = FileMetaDataset()
    ds.preamble = None
    ds.save_as(dst, implicit_vr=True, little_endian=True)
    return dst


def hdr(**kw: object) -> DicomHeader:
    base: dict[str, object] = {
        "sop_instance_uid": "1.2.3.4",
        "series_instance_uid": "1.2.3",
        "study_instance_uid": "1.2",
        "instance_number": None,
        "image_position": None,
        "image_orientation": None,
        "patient_id": "",
        "series_number": "",
        "series_description": "",
        "modality": "",
        "tags": {},
    }
    base.update(kw)
    return DicomHeader(**base)  # type: ignore[arg-type]


# --- read_header ---------------------------------------------------------------------


def test_header_fields_of_ct_small() -> None:
    keywords = ["Modality", "SeriesInstanceUID", "PixelSpacing", "SliceThickness", "Rows"]
    h = read_header(str(CT_SMALL), keywords)
    assert h.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"
    assert h.series_instance_uid == "1.3.6.1.4.1.5962.1.3.1.1.20040119072730.12322"
    assert h.study_instance_uid == "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"
    assert h.instance_number == 1
    assert h.image_position == pytest.approx((-158.135803, -179.035797, -75.699997))
    assert h.image_orientation == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    assert (h.patient_id, h.series_number, h.modality) == ("1CT1", "1", "CT")
    assert h.series_description == ""  # absent in this file
    # JSON-friendly, and typed by keyword: multi-valued attributes are always strings.
    assert h.tags == {
        "Modality": "CT",
        "SeriesInstanceUID": h.series_instance_uid,
        "PixelSpacing": "0.661468\\0.661468",
        "SliceThickness": 5.0,
        "Rows": 128,
    }


def test_absent_and_unknown_keywords_are_left_out() -> None:
    h = read_header(str(MR_SMALL), ["BodyPartExamined", "NotAKeyword", "Modality"])
    assert h.tags == {"Modality": "MR"}


def test_header_read_does_not_load_pixels(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, object] = {}
    real = pydicom.dcmread

    def spy(*a: object, **kw: object) -> object:
        seen.update(kw)
        return real(*a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(pydicom, "dcmread", spy)
    read_header(str(CT_SMALL))
    assert seen.get("stop_before_pixels") is True


@pytest.mark.parametrize(
    ("blob", "fits"), [(1_000, True), (255_000, True), (300_000, False), (3_000_000, False)]
)
def test_headers_bigger_than_the_in_memory_prefix(
    tmp_path: Path, blob: int, fits: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Header reads parse a 256 KB prefix; a header that does not fit (here a big private
    element before the pixels, cut anywhere) must be read from the file instead."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.add_new(0x00190010, "LO", "ACME")  # private creator
    ds.add_new(0x00191010, "OB", b"\x01" * blob)
    ds.ImageComments = "after the blob"  # (0020,4000) and Rows (0028,0010) come later
    p = tmp_path / "big.dcm"
    ds.save_as(p)
    file_reads = []
    real = dicom_module._read
    monkeypatch.setattr(
        dicom_module, "_read", lambda *a, **kw: file_reads.append(a) or real(*a, **kw)
    )
    h = read_header(str(p), ["ImageComments", "Rows"])
    assert h.sop_instance_uid == ds.SOPInstanceUID
    assert h.tags == {"ImageComments": "after the blob", "Rows": 128}
    assert len(file_reads) == (0 if fits else 1)  # the fast path when the header fits


def test_file_without_preamble_is_read_with_the_fallback(tmp_path: Path) -> None:
    # A bare data set (no 128-byte preamble, no DICM, no file meta), as old PACS write.
    bare = bare_copy(CT_SMALL, tmp_path / "IM0001")
    assert bare.read_bytes()[128:132] != b"DICM"
    h = read_header(str(bare))
    assert h.sop_instance_uid == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


def test_non_dicom_files_fail_naming_the_file(tmp_path: Path) -> None:
    txt = tmp_path / "notes.dcm"
    txt.write_text("hello, not DICOM\n" * 100)
    with pytest.raises(MediaError, match=r"notes\.dcm: not a DICOM file"):
        read_header(str(txt))
    jpg = tmp_path / "photo.dcm"
    jpg.write_bytes(b"\xff\xd8\xff\xe0" + os.urandom(5000))
    with pytest.raises(MediaError, match=r"photo\.dcm: not a DICOM file"):
        read_header(str(jpg))
    with pytest.raises(MediaError, match="DICOMDIR"):
        read_header(str(TEST_FILES / "dicomdirtests" / "DICOMDIR"))
    with pytest.raises(SourceChangedError):
        read_header(str(tmp_path / "vanished.dcm"))


def test_truncated_header_fails(tmp_path: Path) -> None:
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(CT_SMALL.read_bytes()[:400])
    with pytest.raises(MediaError, match=r"cut\.dcm: no SOP Instance UID"):
        read_header(str(cut))


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG-lossy.dcm"])
def test_truncated_pixel_data_fails_verification_and_deidentification(
    tmp_path: Path, name: str
) -> None:
    whole = TEST_FILES / name
    verify_dicom(str(whole))
    cut = tmp_path / name
    cut.write_bytes(whole.read_bytes()[:-1000])
    read_header(str(cut))  # the header is intact; only a full read can tell
    with pytest.raises(MediaError, match=rf"{name}: truncated DICOM"):
        verify_dicom(str(cut))
    with pytest.raises(MediaError, match=rf"{name}: truncated DICOM"):
        deidentify(str(cut), str(tmp_path / "out.dcm"), KEY)
    assert not (tmp_path / "out.dcm").exists()


# --- ordering ------------------------------------------------------------------------


def test_series_comes_out_in_instance_number_order_whatever_the_file_names(
    tmp_path: Path,
) -> None:
    sources = sorted(CT5N.iterdir())
    numbers = {p.name: read_header(str(p)).instance_number for p in sources}
    assert sorted(numbers.values()) == [6, 7, 8, 9, 10]
    names = [f"{i:03d}.dcm" for i in range(len(sources))]
    random.Random(3).shuffle(names)
    expected = []
    for src, name in zip(sources, names, strict=True):
        shutil.copy(src, tmp_path / name)
    for _, name in sorted(
        ((numbers[s.name], n) for s, n in zip(sources, names, strict=True)), key=lambda t: t[0]
    ):
        expected.append(name)
    assert ordered(tmp_path) == expected
    assert expected != sorted(expected)  # the shuffle really changed the name order


def test_without_instance_numbers_slices_sort_along_the_normal(tmp_path: Path) -> None:
    """Copies of CT_small with InstanceNumber removed and positions set: the order is by
    position along the normal, not by name and not by raw z (the normal points down)."""
    zs = [30.0, -10.0, 20.0, 0.0, 10.0]
    for i, z in enumerate(zs):
        ds = pydicom.dcmread(CT_SMALL)
        del ds.InstanceNumber
        # Rows along +x, columns along -y: normal = x × -y = -z, so the slice with the
        # highest z comes first.
        ds.ImageOrientationPatient = [1, 0, 0, 0, -1, 0]
        ds.ImagePositionPatient = [5.0, 7.0, z]
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        ds.save_as(tmp_path / f"slice{i}.dcm")
    assert ordered(tmp_path) == [
        "slice0.dcm",
        "slice2.dcm",
        "slice4.dcm",
        "slice3.dcm",
        "slice1.dcm",
    ]


def test_ct5n_without_instance_numbers_sorts_by_position() -> None:
    heads = {p.name: read_header(str(p)) for p in CT5N.iterdir()}
    by_number = sorted(heads, key=lambda n: slice_order_key(heads[n], n))
    stripped = {n: dataclasses.replace(h, instance_number=None) for n, h in heads.items()}
    by_position = sorted(stripped, key=lambda n: slice_order_key(stripped[n], n))
    # Instance numbers run head to foot here; the normal (0, 0, 1) runs foot to head.
    assert by_position == list(reversed(by_number))


def test_missing_values_sort_last_then_by_name() -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    files = {
        "n2": hdr(instance_number=2),
        "n1": hdr(instance_number=1),
        "p_high": hdr(image_position=(0.0, 0.0, 9.0), image_orientation=axial),
        "p_low": hdr(image_position=(0.0, 0.0, -9.0), image_orientation=axial),
        "IM10": hdr(),
        "IM2": hdr(),
        "pos_without_orientation": hdr(image_position=(0.0, 0.0, -99.0)),
    }
    keys = sorted(files, key=lambda n: slice_order_key(files[n], n))
    assert keys == ["n1", "n2", "p_low", "p_high", "IM2", "IM10", "pos_without_orientation"]


def test_equal_instance_numbers_fall_back_to_position() -> None:
    axial = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    a = hdr(instance_number=1, image_position=(0.0, 0.0, 5.0), image_orientation=axial)
    b = hdr(instance_number=1, image_position=(0.0, 0.0, 1.0), image_orientation=axial)
    assert slice_order_key(b, "z") < slice_order_key(a, "a")


# --- series_item_name ----------------------------------------------------------------


def test_series_item_name_fills_and_sanitizes() -> None:
    h = hdr(
        patient_id="PAT/01",
        series_number="3",
        series_description="  AX T1\tpost\x00 contrast: <fs>  ",
        modality="MR",
        tags={"BodyPartExamined": "HEAD", "EchoTime": 4.5},
    )
    t = "{PatientID}_{SeriesNumber}_{SeriesDescription}"
    assert series_item_name(t, h) == "PAT_01_3_AX_T1_post_contrast_fs"
    assert series_item_name("{Modality}-{BodyPartExamined}-{EchoTime}", h) == "MR-HEAD-4.5"
    assert series_item_name("{StudyInstanceUID}/{SeriesInstanceUID}", h) == "1.2_1.2.3"


def test_series_item_name_with_empty_fields() -> None:
    h = hdr(patient_id="P1", series_number="", series_description="")
    assert series_item_name("{PatientID}_{SeriesNumber}_{SeriesDescription}", h) == "P1"
    assert series_item_name("{Unknown}", h) == "1.2.3"  # empty -> the SeriesInstanceUID
    assert series_item_name("..", hdr(series_instance_uid="")) == "series"


def test_series_item_name_is_capped() -> None:
    h = hdr(series_description="x" * 500)
    name = series_item_name("{SeriesDescription}", h)
    assert len(name) == 200 and set(name) == {"x"}


# --- de-identification ---------------------------------------------------------------

IDENTIFYING = [
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "PatientAddress",
    "OtherPatientIDs",
    "OtherPatientNames",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "PatientAge",
    "PatientWeight",
    "DeviceSerialNumber",
    "StationName",
]


def loaded_ct(tmp_path: Path) -> Path:
    """CT_small with every kind of identifier we handle filled in, plus references."""
    ds = pydicom.dcmread(CT_SMALL)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "MRN-123456"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAddress = "1 Main St"
    ds.OtherPatientIDs = "OLD-99"
    ds.OtherPatientNames = "Roe^Jane"
    ds.InstitutionName = "General Hospital"
    ds.InstitutionAddress = "2 Hospital Rd"
    ds.ReferringPhysicianName = "House^Greg"
    ds.PerformingPhysicianName = "Grey^Meredith"
    ds.OperatorsName = "Tech^Tom"
    ds.AccessionNumber = "ACC777"
    ds.StudyID = "S42"
    ds.SeriesDate = "20240102"
    ds.StudyDescription = "CT HEAD for Jane Doe"
    ds.SeriesDescription = "AX 5mm"
    ds.ImageComments = "call Jane at 555-0100"
    ds.PatientAge = "054Y"
    ds.PatientWeight = "70"
    ds.DeviceSerialNumber = "SN-1"
    ds.StationName = "CT01"
    ds.BurnedInAnnotation = "NO"
    ref = Dataset()
    ref.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    ref.ReferencedSOPInstanceUID = pydicom.dcmread(MR_SMALL).SOPInstanceUID
    ref.PersonName = "Nurse^Nancy"  # a PN inside a sequence (and a "D" attribute)
    ref.ContentCreatorName = "Author^Anna"
    ref.add_new(0x00091001, "LO", "private in a sequence")
    ds.ReferencedImageSequence = [ref]
    ds.add_new(0x00291010, "LO", "vendor private top level")
    ds.add_new(0x60003000, "OW", b"\x00" * 8)  # overlay data
    ds.add_new(0x60004000, "LT", "overlay says: Jane Doe")
    p = tmp_path / "loaded.dcm"
    ds.save_as(p)
    return p


def test_deidentified_copy_has_no_identifiers(tmp_path: Path) -> None:
    src = loaded_ct(tmp_path)
    before = sha(src)
    dst = tmp_path / "out.dcm"
    deidentify(str(src), str(dst), KEY)
    assert sha(src) == before  # the original is never modified

    a = pydicom.dcmread(src)
    b = pydicom.dcmread(dst)  # readable, with preamble and file meta
    assert b.preamble == b"\x00" * 128
    for kw in IDENTIFYING:
        assert kw in a, kw
        if kw in b:
            assert b[kw].is_empty or str(b[kw].value).startswith("ANON-"), kw
    raw = dst.read_bytes()
    for secret in [b"Doe", b"Jane", b"MRN-123456", b"19700101", b"General Hospital", b"House",
                   b"ACC777", b"555-0100", b"Nancy", b"Anna", b"vendor private", b"OLD-99",
                   b"Tech^Tom", b"CT01", b"20040119"]:  # fmt: skip
        assert secret not in raw, secret
    assert b.PatientID.startswith("ANON-") and b.PatientName == b.PatientID
    assert b.PatientIdentityRemoved == "YES"
    assert "Basic Application" in b.DeidentificationMethod[0]
    assert b.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert not any(e.tag.is_private for e in b)
    assert not any(0x6000 <= e.tag.group <= 0x60FF for e in b)
    # What the profile keeps stays.
    assert (b.Modality, b.Rows, b.Columns, b.Manufacturer) == ("CT", 128, 128, a.Manufacturer)
    assert b.ImagePositionPatient == a.ImagePositionPatient
    assert b.SOPClassUID == a.SOPClassUID  # a class, not an instance
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    # Pixels untouched, byte for byte.
    assert b.PixelData == a.PixelData
    assert b.pixel_array.tobytes() == a.pixel_array.tobytes()


def test_every_uid_is_replaced_deterministically(tmp_path: Path) -> None:
    src = loaded_ct(tmp_path)
    deidentify(str(src), str(tmp_path / "out.dcm"), KEY)
    a = pydicom.dcmread(src)
    b = pydicom.dcmread(tmp_path / "out.dcm")
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        assert b[kw].value == pseudonymize_uid(a[kw].value, KEY), kw
        assert b[kw].value.startswith("2.25.") and len(b[kw].value) <= 64
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    ref_a, ref_b = a.ReferencedImageSequence[0], b.ReferencedImageSequence[0]
    assert ref_b.ReferencedSOPInstanceUID == pseudonymize_uid(ref_a.ReferencedSOPInstanceUID, KEY)
    assert ref_b.ReferencedSOPClassUID == ref_a.ReferencedSOPClassUID
    # No original instance UID survives anywhere in the file.
    raw = (tmp_path / "out.dcm").read_bytes()
    for uid in (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID):
        assert uid.encode() not in raw


def test_uid_mapping_is_consistent_within_a_series_and_across_runs(tmp_path: Path) -> None:
    files = sorted(CT5N.iterdir())[:2]
    run1, run2, other = tmp_path / "run1", tmp_path / "run2", tmp_path / "other"
    for d in (run1, run2, other):
        d.mkdir()
    for f in files:
        deidentify(str(f), str(run1 / f.name), KEY)
        deidentify(str(f), str(run2 / f.name), KEY)
        deidentify(str(f), str(other / f.name), OTHER_KEY)
    d1 = [pydicom.dcmread(run1 / f.name) for f in files]
    d2 = [pydicom.dcmread(run2 / f.name) for f in files]
    d3 = [pydicom.dcmread(other / f.name) for f in files]
    originals = [pydicom.dcmread(f) for f in files]
    # One series stays one series (and one study, one frame of reference, one patient).
    for kw in ("SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID", "PatientID"):
        assert d1[0][kw].value == d1[1][kw].value, kw
        assert d1[0][kw].value != originals[0][kw].value, kw
    assert d1[0].SOPInstanceUID != d1[1].SOPInstanceUID
    # Same key, same result, file for file; another key, other UIDs.
    for x, y, z, o in zip(d1, d2, d3, originals, strict=True):
        for kw in ("SeriesInstanceUID", "StudyInstanceUID", "SOPInstanceUID", "PatientID"):
            assert x[kw].value == y[kw].value, kw
            assert x[kw].value != z[kw].value, kw
        assert x.PixelData == y.PixelData == z.PixelData == o.PixelData
    assert (run1 / files[0].name).read_bytes() == (run2 / files[0].name).read_bytes()


@pytest.mark.parametrize(
    "name",
    ["MR_small.dcm", "JPEG-lossy.dcm", "ExplVR_BigEnd.dcm", "rtplan.dcm", "image_dfl.dcm"],
)
def test_pixel_data_survives_other_encodings(tmp_path: Path, name: str) -> None:
    src = TEST_FILES / name
    dst = tmp_path / name
    deidentify(str(src), str(dst), KEY)
    a = pydicom.dcmread(src)
    b = pydicom.dcmread(dst)
    assert b.file_meta.TransferSyntaxUID == a.file_meta.TransferSyntaxUID
    assert ("PixelData" in a) == ("PixelData" in b)
    if "PixelData" in a:
        assert a.PixelData == b.PixelData
    assert b.PatientIdentityRemoved == "YES"


def test_file_without_preamble_gets_a_proper_file_meta(tmp_path: Path) -> None:
    bare = bare_copy(CT_SMALL, tmp_path / "IM0001")
    ds = pydicom.dcmread(CT_SMALL)
    deidentify(str(bare), str(tmp_path / "out.dcm"), KEY)
    b = pydicom.dcmread(tmp_path / "out.dcm")  # no force needed: DICM and meta present
    assert b.file_meta.MediaStorageSOPInstanceUID == b.SOPInstanceUID
    assert b.PixelData == ds.PixelData


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path) -> None:
    ds = pydicom.dcmread(CT_SMALL)
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "burned.dcm"
    ds.save_as(src)
    with pytest.raises(MediaError, match=r"burned\.dcm: BurnedInAnnotation is YES"):
        deidentify(str(src), str(tmp_path / "out.dcm"), KEY)
    assert not (tmp_path / "out.dcm").exists()
    deidentify(str(src), str(tmp_path / "out.dcm"), KEY, allow_burned_in=True)
    assert pydicom.dcmread(tmp_path / "out.dcm").PatientIdentityRemoved == "YES"


def test_failures_leave_no_partial_output(tmp_path: Path) -> None:
    txt = tmp_path / "x.dcm"
    txt.write_text("not dicom")
    with pytest.raises(MediaError):
        deidentify(str(txt), str(tmp_path / "out.dcm"), KEY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]


def test_deidentify_header_matches_the_written_copy(tmp_path: Path) -> None:
    src = loaded_ct(tmp_path)
    keywords = ["Modality", "StudyInstanceUID", "SeriesDescription", "PatientName", "Rows"]
    h = deidentify_header(read_header(str(src), keywords), KEY)
    deidentify(str(src), str(tmp_path / "out.dcm"), KEY)
    b = read_header(str(tmp_path / "out.dcm"), keywords)
    assert (h.sop_instance_uid, h.series_instance_uid, h.study_instance_uid) == (
        b.sop_instance_uid,
        b.series_instance_uid,
        b.study_instance_uid,
    )
    assert h.patient_id == b.patient_id
    assert h.series_description == b.series_description == ""
    assert h.tags == b.tags
    assert h.tags["StudyInstanceUID"] == b.study_instance_uid
    assert h.tags["PatientName"] == b.patient_id  # the pseudonym, as in the file
    assert "SeriesDescription" not in h.tags
    name = series_item_name("{PatientID}_{SeriesNumber}_{SeriesDescription}", h)
    assert "MRN" not in name and name.startswith("ANON-")


def test_is_identifying_keyword() -> None:
    for kw in ("PatientName", "PatientID", "StudyDate", "SeriesDescription", "OperatorsName"):
        assert is_identifying_keyword(kw), kw
    for kw in ("Modality", "Rows", "BodyPartExamined", "Manufacturer", "SliceThickness"):
        assert not is_identifying_keyword(kw), kw


def test_registered_uids_are_never_replaced() -> None:
    ct_storage = "1.2.840.10008.5.1.4.1.1.2"
    assert ct_storage in UID_dictionary
    uid = pseudonymize_uid("1.2.3.4", KEY)
    assert uid == pseudonymize_uid("1.2.3.4\x00", KEY)  # padding is not part of a UID
    assert uid != pseudonymize_uid("1.2.3.5", KEY)
    assert int(uid.split(".", 2)[2]) < 2**128


# --- the key -------------------------------------------------------------------------


def test_key_is_created_once_private_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    k1 = load_or_create_key(str(state))
    assert len(k1) == 32
    path = state / "deid.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_key(str(state)) == k1
    assert sorted(p.name for p in state.iterdir()) == ["deid.key"]  # no temp left over


def test_concurrent_creators_agree(tmp_path: Path) -> None:
    state = tmp_path / "state"
    keys: list[bytes] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        keys.append(load_or_create_key(str(state)))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys) == 8


def test_damaged_key_is_an_error_not_silently_replaced(tmp_path: Path) -> None:
    (tmp_path / "deid.key").write_bytes(b"short")
    with pytest.raises(ValueError, match="expected 32 bytes"):
        load_or_create_key(str(tmp_path))
    assert (tmp_path / "deid.key").read_bytes() == b"short"


def test_loosened_key_permissions_are_tightened(tmp_path: Path) -> None:
    k = load_or_create_key(str(tmp_path))
    os.chmod(tmp_path / "deid.key", 0o644)
    assert load_or_create_key(str(tmp_path)) == k
    assert stat.S_IMODE((tmp_path / "deid.key").stat().st_mode) == 0o600
