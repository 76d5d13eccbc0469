"""DICOM pixel decoding, image selection and the thesis's preprocessing."""
