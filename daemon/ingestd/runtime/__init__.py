"""The running process: app supervision, reload, one-pass sync, systemd service, logs,
config file watching, progress display."""
