#!/usr/bin/env bash
# An MLflow tracking server for a team: PostgreSQL for runs and logins, an artifact root, basic-auth logins.
#
#   export MLFLOW_AUTH_ADMIN_PASSWORD=...            # the admin account, created on the first start
#   scripts/tracking_server.sh start [--dir DIR] [--port 5000] [--pg-port 5433]
#   scripts/tracking_server.sh add-user NAME PASSWORD [--experiment NAME --permission EDIT|MANAGE|READ]
#   scripts/tracking_server.sh status | stop | stop-server (MLflow only; `start` brings it back)
#
# Then, on each client:  MLFLOW_TRACKING_USERNAME=NAME MLFLOW_TRACKING_PASSWORD=PASSWORD \
#                        finetune train tracking.uri=http://127.0.0.1:5000 ...
#
# - PostgreSQL (Debian's `postgresql` package; scripts/install_postgres.sh) runs a cluster of its own in
#   DIR/pg, listening on 127.0.0.1:PG_PORT only. `initdb` refuses to run as root, so as root the cluster
#   belongs to the `postgres` user (runuser); otherwise to you. Databases: `mlflow` (runs, metrics,
#   the model registry) and `mlflow_auth` (users and permissions), owned by a role `mlflow` whose password
#   is generated into DIR/pg_password. A third, `optuna`, holds Optuna studies several sweep processes share:
#   hydra.sweeper.storage=postgresql+psycopg2://mlflow:$(cat DIR/pg_password)@127.0.0.1:PG_PORT/optuna
# - MLflow (`pip install 'finetune[server]'`: mlflow[auth] + psycopg2) serves on 127.0.0.1:PORT with
#   `--app-name basic-auth`; artifacts go to DIR/artifacts and are served through the server
#   (--serve-artifacts), so clients need no access to that folder. The Flask secret key comes from
#   MLFLOW_FLASK_SERVER_SECRET_KEY, else is generated once into DIR/flask_secret. Every new user gets
#   READ on every experiment (MLflow's default_permission): give EDIT on an experiment with add-user
#   --experiment, or let users create their own experiments (the creator gets MANAGE).
# - Bind to another address only behind TLS: basic auth sends the password with every request.
set -euo pipefail

command="${1:-}"; shift || true
dir="${FINETUNE_SERVER_DIR:-$HOME/.finetune_server}"; port=5000; pg_port=5433
experiment=""; permission="EDIT"; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dir) dir="$2"; shift 2;;
    --port) port="$2"; shift 2;;
    --pg-port) pg_port="$2"; shift 2;;
    --experiment) experiment="$2"; shift 2;;
    --permission) permission="$2"; shift 2;;
    *) args+=("$1"); shift;;
  esac
done
pgbin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
[ -n "$pgbin" ] || pgbin="$(dirname "$(command -v initdb 2>/dev/null || echo /nonexistent/initdb)")"
python="${PYTHON:-python}"
[ -x "$(dirname "$0")/../.venv/bin/python" ] && python="$(dirname "$0")/../.venv/bin/python"

as_owner() {  # run a PostgreSQL tool as the cluster's owner
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_url() {  # postgresql+psycopg2://mlflow:<password>@127.0.0.1:<port>/<database>
  echo "postgresql+psycopg2://mlflow:$(cat "$dir/pg_password")@127.0.0.1:$pg_port/$1"
}

start_postgres() {
  [ -x "$pgbin/initdb" ] || { echo "error: PostgreSQL not found: run scripts/install_postgres.sh" >&2; exit 1; }
  mkdir -p "$dir"; chmod 755 "$dir"
  if [ ! -f "$dir/pg/PG_VERSION" ]; then
    mkdir -p "$dir/pg"; [ "$(id -u)" = 0 ] && chown postgres "$dir/pg"
    # the cluster's owner logs in over its socket (peer); everyone else over TCP with a password
    as_owner "$pgbin/initdb" -D "$dir/pg" --auth-local=peer --auth-host=scram-sha-256 >/dev/null
    umask 077; head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/pg_password"; umask 022
  fi
  as_owner "$pgbin/pg_ctl" -D "$dir/pg" status >/dev/null 2>&1 || as_owner "$pgbin/pg_ctl" -D "$dir/pg" \
    -l "$dir/pg/server.log" -w -o "-p $pg_port -c listen_addresses=127.0.0.1 -k $dir/pg" start >/dev/null
  if [ ! -f "$dir/pg/.finetune_ready" ]; then  # the role and the two databases, once
    psql_owner() { as_owner "$pgbin/psql" -q -v ON_ERROR_STOP=1 -h "$dir/pg" -p "$pg_port" -d postgres -c "$1"; }
    psql_owner "CREATE ROLE mlflow LOGIN PASSWORD '$(cat "$dir/pg_password")'"
    psql_owner "CREATE DATABASE mlflow OWNER mlflow"
    psql_owner "CREATE DATABASE mlflow_auth OWNER mlflow"
    psql_owner "CREATE DATABASE optuna OWNER mlflow"
    as_owner touch "$dir/pg/.finetune_ready"
  fi
}

start() {
  [ -n "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" ] || [ -f "$dir/auth.ini" ] || {
    echo "error: set MLFLOW_AUTH_ADMIN_PASSWORD (the admin account's password, used on the first start)" >&2; exit 1; }
  start_postgres
  mkdir -p "$dir/artifacts"
  if [ -z "${MLFLOW_FLASK_SERVER_SECRET_KEY:-}" ]; then
    [ -f "$dir/flask_secret" ] || (umask 077; head -c 32 /dev/urandom | base64 > "$dir/flask_secret")
    export MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$dir/flask_secret")"
  fi
  printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = admin\nauthorization_function = mlflow.server.auth:authenticate_request_basic_auth\n' \
    "$(pg_url mlflow_auth)" > "$dir/auth.ini"; chmod 600 "$dir/auth.ini"
  # setsid: the server, its gunicorn/uvicorn master and workers form one process group, stopped together
  MLFLOW_AUTH_CONFIG_PATH="$dir/auth.ini" setsid nohup "$python" -m mlflow server --app-name basic-auth \
    --backend-store-uri "$(pg_url mlflow)" --artifacts-destination "$dir/artifacts" --serve-artifacts \
    --host 127.0.0.1 --port "$port" --workers 2 > "$dir/server.log" 2>&1 &
  echo $! > "$dir/server.pid"
  for _ in $(seq 1 120); do
    if "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
      echo "MLflow on http://127.0.0.1:$port (PostgreSQL 127.0.0.1:$pg_port, artifacts $dir/artifacts, logs $dir/server.log)"
      return 0
    fi
    kill -0 "$(cat "$dir/server.pid")" 2>/dev/null || { echo "error: the server stopped; see $dir/server.log" >&2; tail -5 "$dir/server.log" >&2; exit 1; }
    sleep 0.5
  done
  echo "error: the server did not answer within 60 s; see $dir/server.log" >&2; exit 1
}

stop_server() {  # the MLflow server only (PostgreSQL keeps running), its whole process group
  if [ -f "$dir/server.pid" ]; then
    pid="$(cat "$dir/server.pid")"
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 -- "-$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true; rm -f "$dir/server.pid"
  fi
}

stop() {
  stop_server
  [ -f "$dir/pg/postmaster.pid" ] && as_owner "$pgbin/pg_ctl" -D "$dir/pg" -m fast -w stop >/dev/null || true
  echo "stopped"
}

add_user() {  # NAME PASSWORD: as the admin (MLFLOW_AUTH_ADMIN_PASSWORD), through MLflow's own auth API
  [ ${#args[@]} -ge 2 ] || { echo "usage: $0 add-user NAME PASSWORD [--experiment NAME --permission EDIT]" >&2; exit 2; }
  MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="${MLFLOW_AUTH_ADMIN_PASSWORD:?set it to the admin password}" \
    "$python" - "http://127.0.0.1:$port" "${args[0]}" "${args[1]}" "$experiment" "$permission" <<'EOF'
import sys
import mlflow
from mlflow.server.auth.client import AuthServiceClient

uri, name, password, experiment, permission = sys.argv[1:]
auth = AuthServiceClient(uri)
auth.create_user(name, password)
if experiment:
    mlflow.set_tracking_uri(uri)
    found = mlflow.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else mlflow.create_experiment(experiment)
    auth.grant_user_permission(name, "experiment", experiment_id, permission)
print(f"user {name} created" + (f", {permission} on experiment {experiment!r}" if experiment else ""))
EOF
}

case "$command" in
  start) start;;
  stop) stop;;
  stop-server) stop_server; echo "MLflow server stopped (PostgreSQL still running)";;
  status) if [ -f "$dir/server.pid" ] && kill -0 "$(cat "$dir/server.pid")" 2>/dev/null; then
            echo "running: http://127.0.0.1:$port (pid $(cat "$dir/server.pid"))"; else echo "not running"; exit 1; fi;;
  add-user) add_user;;
  *) sed -n '2,25p' "$0"; exit 2;;
esac
