"""In-repo fakes of the platforms the sinks talk to (real HTTP servers on 127.0.0.1)."""
