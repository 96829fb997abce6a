"""Backends: each implements sinks.base.Sink (local store, ingestd serve over HTTP, V7
Darwin, Labelbox, Scale Nucleus); memory.py is the test double."""
