"""scxnn-node: DICOM-native triage of chest radiographs with the SCXNN ensemble."""

__version__ = "0.1.0"
