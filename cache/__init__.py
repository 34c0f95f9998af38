"""Stage one's output and stage two's input: the HDF5 feature store."""
