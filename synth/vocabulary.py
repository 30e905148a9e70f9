"""What synthetic exports are made of: exam types, series, institutions, staff, patient names."""

from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    SecondaryCaptureImageStorage,
)

# kind -> (ExamDescription used in zip names, StudyDescription, default series)
EXAM_TYPES = {
    "ct": ("CT-CHEST-WO", "CT CHEST WO CONTRAST", ("scout", "axial", "dose")),
    "cta": ("CTA-CHEST-PE", "CTA CHEST PE PROTOCOL", ("scout", "axial", "dose")),
    "pa_lat": ("XR-CHEST-PA-LATERAL", "XR CHEST PA AND LATERAL", ("pa", "lat")),
    "port": ("XR-PORT-CHEST-1V", "XR PORTABLE CHEST 1 VIEW", ("ap",)),
    "ped_port": ("XR-P-PORT-CHEST-1V", "XR P PORT CHEST 1 VIEW", ("ap",)),
}
CT_KINDS = ("ct", "cta")
CT_EXTRAS = ("screen", "vr")

# series key -> (role, modality, SOP class, ImageType, SeriesDescription, folder, ViewPosition,
#                pixel kind, SeriesNumber, images; 0 images = `ct_slices`).
# Radiograph modality/SOP class (None here) are chosen per exam: CR or DX.
SERIES = {
    "scout": ("ct_scout", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\LOCALIZER", "SCOUT",
              "SCOUT", None, "ct", 1, 1),
    "axial": ("ct_axial", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\AXIAL", "AXIAL 2.5MM",
              "AXIAL_2.5MM", None, "ct", 2, 0),
    "axial_lung": ("ct_axial", "CT", CTImageStorage, "ORIGINAL\\PRIMARY\\AXIAL",
                   "AXIAL LUNG 2.5MM", "AXIAL_LUNG", None, "ct", 3, 0),
    "dose": ("ct_dose_sc", "CT", SecondaryCaptureImageStorage, "DERIVED\\SECONDARY\\OTHER",
             "Dose Report", "DOSE_REPORT", None, "sc", 999, 1),
    "screen": ("screen_save", "OT", SecondaryCaptureImageStorage,
               "DERIVED\\SECONDARY\\SCREEN SAVE", "SCREEN SAVE", "SCREEN_SAVE", None, "sc", 90, 1),
    "vr": ("recon_3d", "CT", CTImageStorage, "DERIVED\\SECONDARY\\REFORMATTED\\3D", "3D VR",
           "3D_VR", None, "ct", 91, 2),
    "pa": ("cr_frontal", None, None, "ORIGINAL\\PRIMARY", "PA", "PA", "PA", "cr", 1, 1),
    "lat": ("cr_lateral", None, None, "ORIGINAL\\PRIMARY", "LATERAL", "LATERAL", "LL", "cr", 2, 1),
    "ap": ("cr_frontal", None, None, "ORIGINAL\\PRIMARY", "AP PORTABLE", "AP", "AP", "cr", 1, 1),
}
XR_SOP_CLASSES = {"CR": ComputedRadiographyImageStorage,
                   "DX": DigitalXRayImageStorageForPresentation}

INSTITUTIONS = (
    ("MERCY GENERAL HOSPITAL", "MERCY", "2525 S Michigan Ave, Chicago, IL 60616"),
    ("ST LUKES MEDICAL CENTER", "STLUKES", "1725 W Harrison St, Chicago, IL 60612"),
    ("RIVERSIDE COMMUNITY HOSPITAL", "RIVERSIDE", "350 N Wall St, Kankakee, IL 60901"),
    ("NORTHSHORE UNIVERSITY HEALTH", "NSUH", "2650 Ridge Ave, Evanston, IL 60201"),
    ("LAKEVIEW REGIONAL MEDICAL CENTER", "LAKEVIEW", "95 Lakeview Dr, Covington, LA 70433"),
    ("SAINT ANNE HOSPITAL", "STANNE", "4950 W Thomas St, Chicago, IL 60651"),
)
PHYSICIANS = (
    "HOUSE^GREGORY", "QUINN^MICHAELA", "KILDARE^JAMES^R", "WELBY^MARCUS", "ROSS^DOUGLAS",
    "GREENE^MARK^ALAN", "LEWIS^SUSAN", "BAILEY^MIRANDA", "YANG^CRISTINA", "CARTER^JOHN",
)
OPERATORS = ("JENKINS^ROBIN", "OKORO^CHIDI", "HALVORSEN^INGRID", "DELGADO^RAMON", "PRICE^TASHA")
FAMILIES = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "NGUYEN", "PATEL", "KOWALSKI", "OKAFOR",
    "JOHANSSON", "ROSSI", "CHEN", "DUBOIS", "MÜLLER", "GARCÍA", "NOVÁK", "PEÑA", "LEFÈVRE",
    "HERNÁNDEZ", "SCHRÖDER",
)
GIVENS = (
    "JOHN", "MARY", "JAMES", "LINDA", "ROBERT", "PRIYA", "WEI", "CHIOMA", "LARS", "GIULIA",
    "JOSÉ", "FRANÇOIS", "ZOË", "RENÉE", "MARÍA", "JÜRGEN",
)
MIDDLES = ("PAUL", "ANNE", "LEE", "MARIE", "EDWARD", "ROSE")
STREETS = ("W Belmont Ave", "N Clark St", "S Halsted St", "E 63rd St", "N Broadway",
            "W Addison St", "S Cottage Grove Ave")
CITIES = (("Chicago", "IL", "606"), ("Evanston", "IL", "602"), ("Gary", "IN", "464"))
SYMPTOMS = ("fever and dry cough", "dyspnea on exertion", "anosmia and myalgia",
             "hypoxia, placed on 2L NC", "chest tightness and fatigue")
