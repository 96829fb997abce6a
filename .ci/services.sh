# Source this file (bash), don't run it: it defines two shell functions for the storage
# emulators the bucket tests need (moto S3, Azurite, fake-gcs-server; see
# tests/support/services.py). `.ci/run` uses them; by hand:
#
#   . .ci/services.sh && start_services     # exports INGESTD_TEST_* into this shell
#   .venv/bin/pytest -q tests/unit/test_bucket_store.py
#   stop_services                           # or just exit the shell: they follow it
#
# They need what `bash .ci/run` installs (the venv, Azurite under .cache/npm).

_ingestd_repo() {
  (cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
}

# Start the three emulators in one background process group and export their
# endpoints (INGESTD_TEST_*) here. Returns non-zero, with the log, if they don't come up.
start_services() {
  local repo dir pid waited=0
  repo="$(_ingestd_repo)"
  stop_services
  dir="$(mktemp -d "${TMPDIR:-/tmp}/ingestd-services.XXXXXX")"
  INGESTD_SERVICES_DIR="$dir"
  # $$: the services stop by themselves when this shell is gone (even after a kill -9).
  (cd "$repo" && exec "$repo/.venv/bin/python" -m tests.support.services \
    --env-file "$dir/env" --parent-pid $$ --log-dir "$dir/logs") \
    >"$dir/services.log" 2>&1 </dev/null &
  pid=$!
  # Readiness is the env file, written once every emulator answers (normally 2-5 s).
  while [ ! -s "$dir/env" ]; do
    if ! kill -0 "$pid" 2>/dev/null || [ "$waited" -ge 1200 ]; then
      echo "start_services: the emulators did not start:" >&2
      cat "$dir/services.log" >&2
      kill -TERM -- "-$pid" 2>/dev/null || true
      return 1
    fi
    sleep 0.1
    waited=$((waited + 1))
  done
  # shellcheck disable=SC1091
  . "$dir/env"
  echo "start_services: $(grep -c '^export INGESTD_TEST_.*ENDPOINT' "$dir/env") emulators up (log: $dir/services.log)"
}

# Stop them (the whole process group), remove their logs and unset the variables.
# Safe to call twice.
stop_services() {
  local pgid="${INGESTD_TEST_SERVICES_PGID:-}" i
  if [ -n "$pgid" ] && kill -0 -- "-$pgid" 2>/dev/null; then
    kill -TERM -- "-$pgid" 2>/dev/null || true
    for i in $(seq 50); do
      kill -0 -- "-$pgid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL -- "-$pgid" 2>/dev/null || true
  fi
  if [ -n "${INGESTD_SERVICES_DIR:-}" ]; then
    rm -rf -- "$INGESTD_SERVICES_DIR"
  fi
  # shellcheck disable=SC2046
  unset $(compgen -v INGESTD_TEST_) INGESTD_SERVICES_DIR
  return 0
}
