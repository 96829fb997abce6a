"""What an operator sees of a running daemon: the control endpoint, metrics, status."""
