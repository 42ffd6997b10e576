"""Data in and out: image sources, decoding/quarantine, dedup, the labelled format, the construction store."""
