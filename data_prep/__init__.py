"""Cohort preparation: synthesize a CAT12-like cohort, ingest CAT12 outputs, pack them into HDF5 shards."""
