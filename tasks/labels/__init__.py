"""The labelling loop after publication: the FHIR form (form), labels and segmentations back in
(importer, segmentations, intake), and readers' agreement (agreement); consensus is the
``label_consensus`` view (``VIEWS`` in schemas/catalog.py)."""
