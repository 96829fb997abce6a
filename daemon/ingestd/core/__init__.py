"""Small shared types and rules that every layer may import: the data model, errors,
backoff, fingerprints, path filters and name patterns. core imports nothing else of ingestd."""
