"""The data set: the ChestX-ray14 index and labels, patient-wise splits, the one image loader (PNG and
DICOM), and the synthetic sample maker. What every later step learns its data from."""
