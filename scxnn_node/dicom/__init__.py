"""DICOM networking (SCP, SCU) and the result objects sent back to the PACS."""
