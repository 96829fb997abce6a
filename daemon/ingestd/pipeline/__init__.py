"""The watch pipeline: source hints → settle → plan → ledger (runner, planner), and the
sync step: claim → prepare → send → outcome."""
