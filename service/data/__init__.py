"""The data layer: table schema, loading and validation, synthetic and CDNOW data, task labels."""
