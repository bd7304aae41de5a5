# Shared settings of infra/local-up and infra/local-down (sourced, not executed).
# Every value can be overridden from the environment; the defaults bind everything to 127.0.0.1.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# The platform's home folder, as astromer.settings.home() resolves it (relative to the current directory).
ASTROMER_HOME="$(mkdir -p "${ASTROMER_HOME:-.astromer}" && cd "${ASTROMER_HOME:-.astromer}" && pwd)"
export ASTROMER_HOME

# The Python that has ray and mlflow installed: the repository's virtualenv when there is one.
if [[ -z "${ASTROMER_PYTHON:-}" ]]; then
    if [[ -x "$REPO_ROOT/.venv/bin/python" ]]; then
        ASTROMER_PYTHON="$REPO_ROOT/.venv/bin/python"
    else
        ASTROMER_PYTHON="$(command -v python3)"
    fi
fi
PYTHON_BIN_DIR="$(dirname "$ASTROMER_PYTHON")"

BIND_HOST="${ASTROMER_BIND_HOST:-127.0.0.1}"
RAY_GCS_PORT="${ASTROMER_RAY_PORT:-6379}"
RAY_DASHBOARD_PORT="${ASTROMER_RAY_DASHBOARD_PORT:-8265}"
RAY_CLIENT_PORT="${ASTROMER_RAY_CLIENT_PORT:-10001}"
# not Ray's default (52365): every embedded ray.init() on the machine takes that one for its own agent
RAY_AGENT_PORT="${ASTROMER_RAY_AGENT_PORT:-52465}"
RAY_NUM_CPUS="${ASTROMER_RAY_NUM_CPUS:-$(nproc)}"
MLFLOW_PORT="${ASTROMER_MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${ASTROMER_MLFLOW_WORKERS:-1}"
STARTUP_TIMEOUT_S="${ASTROMER_STARTUP_TIMEOUT_S:-120}"
STOP_GRACE_S="${ASTROMER_STOP_GRACE_S:-10}"
JOB_STOP_TIMEOUT_S="${ASTROMER_JOB_STOP_TIMEOUT_S:-60}"

STACK_DIR="$ASTROMER_HOME/stack"
# Ray token authentication ("token", the default, or "disabled"): the stack's own token, readable only
# by its owner, so that other local users cannot submit jobs even on loopback.
RAY_AUTH="${ASTROMER_RAY_AUTH:-token}"
RAY_TOKEN_FILE="$STACK_DIR/ray_auth_token"
# Ray puts unix sockets under its temp dir, and a socket path may not exceed 107 bytes: fall back to a
# short folder under /tmp when ASTROMER_HOME is deep.
if [[ -z "${ASTROMER_RAY_TEMP_DIR:-}" ]]; then
    ASTROMER_RAY_TEMP_DIR="$ASTROMER_HOME/ray"
    if (( ${#ASTROMER_RAY_TEMP_DIR} > 40 )); then
        ASTROMER_RAY_TEMP_DIR="/tmp/astromer-ray-$(id -u)-$(printf '%s' "$ASTROMER_HOME" | cksum | cut -d' ' -f1)"
    fi
fi

is_loopback() { [[ "$1" == 127.* || "$1" == "localhost" || "$1" == "::1" ]]; }

# Connect-to host: a wildcard bind is reached through loopback.
if [[ "$BIND_HOST" == "0.0.0.0" || "$BIND_HOST" == "::" ]]; then CONNECT_HOST=127.0.0.1; else CONNECT_HOST="$BIND_HOST"; fi

RAY_GCS_ADDRESS="$CONNECT_HOST:$RAY_GCS_PORT"
RAY_DASHBOARD_URL="http://$CONNECT_HOST:$RAY_DASHBOARD_PORT"
MLFLOW_URL="http://$CONNECT_HOST:$MLFLOW_PORT"

# Is the process of this pid file alive and running the expected program (guards against pid reuse)?
pid_alive() {
    local pidfile="$1" pattern="$2" pid
    [[ -f "$pidfile" ]] || return 1
    pid="$(cat "$pidfile")"
    [[ "$pid" =~ ^[0-9]+$ ]] || return 1
    kill -0 "$pid" 2>/dev/null || return 1
    tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$pattern"
}

# Live (non-zombie) processes of the session led by a pid: every service is started with setsid, so its
# session holds exactly the processes it spawned. An empty session prints nothing and succeeds: ps exits 1
# when it lists no process, which under `set -e -o pipefail` would end the caller (once every process of
# a stopped service has exited and been reaped).
session_pids() {
    { ps -s "$1" -o pid=,stat= 2>/dev/null || true; } | awk '$2 !~ /^Z/ {print $1}'
}

# curl arguments that authenticate against the Ray dashboard when token authentication is on.
ray_auth_args() {
    if [[ "$RAY_AUTH" == "token" && -f "$RAY_TOKEN_FILE" ]]; then
        printf '%s\n' -H "Authorization: Bearer $(cat "$RAY_TOKEN_FILE")"
    fi
}
