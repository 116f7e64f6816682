#!/usr/bin/env bash
# `python` for the MLproject's commands: the interpreter that runs `mlflow run`.
#
# With --env-manager local, MLflow runs a command with the caller's PATH and passes no
# interpreter setting, so a bare `python` is the system's (or none) unless the venv is
# activated, and `.venv/bin/mlflow run .` failed. The `mlflow run` process is an
# ancestor of this one; its argv[0] is the Python it runs on (the script's shebang).
# Without /proc, or without such an ancestor, a `python` on PATH that has mlflow is used.
has_mlflow() {
  [ -n "$1" ] && [ -x "$1" ] && "$1" -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('mlflow') is None)" \
    2>/dev/null
}
pid=$PPID
while [ -r "/proc/$pid/cmdline" ] && [ "$pid" -gt 1 ]; do
  mapfile -d '' argv < "/proc/$pid/cmdline"
  # `<python> .../bin/mlflow run ...` or `<python> -m mlflow run ...`
  if [ "${argv[1]##*/}" = mlflow ] || [ "${argv[1]} ${argv[2]}" = "-m mlflow" ]; then
    if has_mlflow "${argv[0]}"; then exec "${argv[0]}" "$@"; fi
  fi
  # The parent pid is the 2nd field after the command name, which ends with ") ".
  pid=$(sed 's/.*) //' "/proc/$pid/stat" | cut -d ' ' -f 2)
done
for exe in python python3; do
  if has_mlflow "$(command -v "$exe")"; then exec "$exe" "$@"; fi
done
echo "flowline: error: no Python with mlflow found; run the project with the venv's" \
  "mlflow (.venv/bin/mlflow run . -e main --env-manager local) or activate the venv" >&2
exit 2
