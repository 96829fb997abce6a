"""The parts every platform sink is built from, each written and tested once (in the
manner of rclone's backend library and Vector's sink framework):

- `pacer.py`: the request budget of one API key, honouring Retry-After for all callers;
- `client.py`: one HTTP client with a per-backend retry rule, auth errors in words;
- `verified.py`: a file's bytes, size and digest checked while they stream;
- `jobs.py`: an async-job poller that ends on every terminal state;
- `datasets.py`: find-or-create a dataset once, under a lock;
- `batches.py`: split a group of items into the platform's request limits;
- `errors.py`: one item's verdict from the errors of its parts.

A platform sink is then a small API mapping plus a thin class on these parts.
"""
