"""Entries → item plans. Pure functions of the entries and the watch's rules: no I/O,
no clock, no logging, so every rule can be tested exhaustively.

- layout.py: one file → one item (dataset folder, name, slot, fingerprint)
- metadata.py: static values, path-pattern fields, sidecars, type consistency
- groups.py: sub-folders as multi-slot, channel or DICOM-series items
(the canonical digest of a plan is core/fingerprint.py, shared with config)
"""
