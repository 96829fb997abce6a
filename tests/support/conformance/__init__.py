"""The adapters of the conformance suite (tests/conformance): one module per sink."""
