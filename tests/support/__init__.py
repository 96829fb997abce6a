"""Everything the tests share that is not a test: fakes of the platforms, the fault proxy,
the syscall sandbox, the storage emulators' clients (and the script that starts them),
the CLI and `ingestd serve` as subprocesses, and wait helpers.

Test modules import from here, never from another test module or a conftest file.
Nothing in here installs anything: `.ci/run` provisions the machine.
"""
