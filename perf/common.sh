# Sourced by perf/run.sh and perf/fio.sh: the temp dirs they make (TMP in
# RAM, ORIGIN_DIR on disk) are removed, and the Python driver they start
# (PY_PID) is stopped, however the script ends.

TMP="" ORIGIN_DIR="" PY_PID=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -n "$PY_PID" ]] && kill -0 "$PY_PID" 2>/dev/null; then
    kill -TERM "$PY_PID" 2>/dev/null || true
    wait "$PY_PID" 2>/dev/null || true
  fi
  [[ -n "$TMP" ]] && rm -rf "$TMP"
  [[ -n "$ORIGIN_DIR" ]] && rm -rf "$ORIGIN_DIR"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
