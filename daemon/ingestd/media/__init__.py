"""Media checks and transforms (images, video frames, DICOM), run in the worker pool:
never on the event loop. Pure of the ledger and the sinks."""
