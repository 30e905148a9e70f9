"""DICOM files of a synthetic site: identified headers as a hospital's scanners write them."""

from __future__ import annotations

import io
from datetime import timedelta
from typing import TYPE_CHECKING

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
)

from synth.ids import digest
from synth.pixels import add_pixels
from synth.vocabulary import EXAM_TYPES

if TYPE_CHECKING:
    from synth.model import Exam, Series
    from synth.site import Site

_PRIVATE_CREATOR = "ACME PACS 1.0"
_PPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
_IMPLEMENTATION_UID = f"2.25.{digest('radrepo-synth-implementation')}"


def encode(site: Site, exam: Exam, series: Series, i: int, *, implicit: bool = False,
           drop_sop: bool = False) -> bytes:
    """One DICOM file as bytes (explicit VR LE unless `implicit`)."""
    ds = _dataset(site, exam, series, i, implicit)
    if drop_sop:  # not a conformant file any more: no SOP Instance UID anywhere
        del ds.SOPInstanceUID
        del ds.file_meta.MediaStorageSOPInstanceUID
        ds.preamble = b"\0" * 128
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, enforce_file_format=not drop_sop)
    return buffer.getvalue()


def _dataset(site: Site, exam: Exam, series: Series, i: int, implicit: bool) -> Dataset:
    """The identified header of instance `i` of `series`, as the site's scanner writes it."""
    p = exam.patient
    station = site.stations["ct" if exam.is_ct else "xr"]
    sop_uid = series.sop_uids[i]
    series_time = exam.when + timedelta(minutes=exam.series.index(series))
    content_time = series_time + timedelta(seconds=i)

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = series.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "RADREPO_SYNTH1"
    meta.SourceApplicationEntityTitle = station.ae

    ds = Dataset()
    ds.file_meta = meta
    if p.charset:
        ds.SpecificCharacterSet = p.charset
    ds.ImageType = series.image_type.split("\\")
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate, ds.StudyTime = f"{exam.when:%Y%m%d}", f"{exam.when:%H%M%S}"
    ds.SeriesDate, ds.SeriesTime = f"{series_time:%Y%m%d}", f"{series_time:%H%M%S}"
    ds.AcquisitionDate, ds.AcquisitionTime = ds.SeriesDate, ds.SeriesTime
    ds.ContentDate, ds.ContentTime = f"{content_time:%Y%m%d}", f"{content_time:%H%M%S}"
    ds.AccessionNumber = exam.accession
    ds.Modality = series.modality
    if series.sop_class == SecondaryCaptureImageStorage:
        ds.ConversionType = "WSD"
    if series.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = station.manufacturer
    ds.InstitutionName = site.institution
    ds.InstitutionAddress = site.institution_address
    ds.ReferringPhysicianName = exam.referring
    ds.StationName = station.name
    ds.StudyDescription = EXAM_TYPES[exam.kind][1]
    ds.SeriesDescription = series.description
    ds.PerformingPhysicianName = site.performing
    ds.OperatorsName = site.operator
    ds.ManufacturerModelName = station.model
    ds.ReferencedPerformedProcedureStepSequence = [
        _reference(_PPS_SOP_CLASS, exam.pps_uid)]
    if series.role == "ct_axial" and exam.scout_uid:
        ds.ReferencedImageSequence = [_reference(CTImageStorage, exam.scout_uid)]
    ds.PatientName = p.pn
    ds.PatientID = p.mrn
    ds.PatientBirthDate = f"{p.birth_date:%Y%m%d}"
    ds.PatientSex = p.sex
    ds.OtherPatientIDs = p.other_id
    ds.PatientAge = f"{(exam.when.date() - p.birth_date).days // 365:03d}Y"
    ds.PatientAddress = p.address
    ds.PatientTelephoneNumbers = p.phone
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = station.serial
    ds.SoftwareVersions = "4.2.1"
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.InstitutionalDepartmentName = "RADIOLOGY"
    ds.PhysiciansOfRecord = exam.referring
    ds.NameOfPhysiciansReadingStudy = site.performing
    ds.AdditionalPatientHistory = f"{p.spaced}: cough, fever, suspected COVID-19"
    ds.PatientSize, ds.PatientWeight = "1.72", "74"
    ds.PatientPosition = "FFS" if exam.is_ct else ""
    ds.DateOfLastCalibration, ds.TimeOfLastCalibration = "20200102", "070000"
    ds.LossyImageCompression = "00"
    for keyword, value in (_CT_TECHNIQUE if exam.is_ct else _XR_TECHNIQUE):
        vr = dictionary_VR(tag_for_keyword(keyword))
        setattr(ds, keyword, float(value) if vr in ("FL", "FD") else value)
    ds.StudyInstanceUID = exam.study_uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = exam.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = i + 1
    if series.sop_class == CTImageStorage:
        ds.KVP = "120"
        ds.SliceThickness = "2.5"
        z = -50.0 - 2.5 * i
        ds.ImagePositionPatient = [-175.0, -175.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = z
        ds.FrameOfReferenceUID = exam.frame_uid
        ds.PositionReferenceIndicator = ""
    elif series.view:
        ds.KVP = "110"
        ds.ViewPosition = series.view
        ds.PatientOrientation = ["A", "F"] if series.view == "LL" else ["L", "F"]
    prefix = "Portable" if series.view == "AP" else exam.code.replace("-", " ")
    ds.ImageComments = f"{prefix}, pt {p.spaced} MRN {p.mrn}"
    request = Dataset()
    request.AccessionNumber = exam.accession
    request.RequestedProcedureID = exam.accession
    request.ScheduledProcedureStepID = exam.accession
    request.RequestedProcedureDescription = ds.StudyDescription
    ds.RequestAttributesSequence = [request]
    add_pixels(site, ds, series, f"{exam.pixel_key}/{series.number}/{i}")
    block = ds.private_block(0x0029, _PRIVATE_CREATOR, create=True)
    block.add_new(0x10, "LO", p.mrn)
    block.add_new(0x11, "LT", f"Patient: {p.pn}")
    return ds


# Technique attributes a real scanner writes (none identifies anyone); they give the synthetic
# headers the size of real ones (about 150 elements).
_CT_TECHNIQUE = (
    ("ScanOptions", "HELICAL MODE"), ("DataCollectionDiameter", "500"),
    ("ReconstructionDiameter", "350"), ("DistanceSourceToDetector", "946.7"),
    ("DistanceSourceToPatient", "541"), ("GantryDetectorTilt", "0"), ("TableHeight", "160"),
    ("RotationDirection", "CW"), ("ExposureTime", "500"), ("XRayTubeCurrent", "250"),
    ("Exposure", "125"), ("FilterType", "BODY FILTER"), ("GeneratorPower", "30"),
    ("FocalSpots", "0.7"), ("ConvolutionKernel", "STANDARD"), ("RevolutionTime", "0.5"),
    ("SingleCollimationWidth", "0.625"), ("TotalCollimationWidth", "40"),
    ("TableSpeed", "78.75"), ("TableFeedPerRotation", "39.375"), ("SpiralPitchFactor", "0.984"),
    ("CTDIvol", "8.2"), ("AcquisitionNumber", "1"), ("PixelSpacing", ["0.683", "0.683"]),
    ("ProtocolName", "CHEST ROUTINE"), ("ContrastBolusAgent", ""),
    ("EstimatedDoseSaving", "22.5"), ("ReconstructionAlgorithm", "ITERATIVE"),
    ("AcquisitionType", "SPIRAL"), ("TubeAngle", "0"), ("ReconstructionMethod", "ASIR 40"),
    ("SpatialResolution", "0.35"),
    ("RescaleType", "HU"), ("WindowCenterWidthExplanation", ["LUNG", "MEDIASTINUM"]),
)
_XR_TECHNIQUE = (
    ("ExposureTime", "12"), ("XRayTubeCurrent", "320"), ("Exposure", "4"),
    ("ExposureInuAs", "4000"), ("DistanceSourceToDetector", "1800"),
    ("DistanceSourceToPatient", "1650"), ("FilterType", "NONE"), ("GeneratorPower", "35"),
    ("FocalSpots", "1.2"), ("Grid", "NONE"), ("AnodeTargetMaterial", "TUNGSTEN"),
    ("BodyPartThickness", "220"), ("CompressionForce", "0"), ("RelativeXRayExposure", "1450"),
    ("ExposureIndex", "310"), ("TargetExposureIndex", "300"), ("DeviationIndex", "0.14"),
    ("Sensitivity", "200"), ("DetectorType", "SCINTILLATOR"),
    ("DetectorConfiguration", "AREA"), ("DetectorID", "DET01"),
    ("ImagerPixelSpacing", ["0.139", "0.139"]), ("FieldOfViewShape", "RECTANGLE"),
    ("ProtocolName", "CHEST 1V"), ("AcquisitionNumber", "1"),
)


def _reference(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item
