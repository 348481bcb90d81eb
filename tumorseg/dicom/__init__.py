"""DICOM input and output: series reading, RTSTRUCT and SEG writing."""
