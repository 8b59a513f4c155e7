#!/usr/bin/env bash
# In the head's container (ray_cluster.yaml head_start_ray_commands): the MLflow tracking
# server with basic authentication, its database and proxied artifact store from site.env.
# Waits until it answers; fails the head's start otherwise.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=site.env
source "$here/site.env"
case "$MLFLOW_BACKEND_STORE_URI" in
  sqlite:///*) mkdir -p "$(dirname "${MLFLOW_BACKEND_STORE_URI#sqlite:///}")" ;;
esac
case "$MLFLOW_ARTIFACTS_DESTINATION" in
  /*) mkdir -p "$MLFLOW_ARTIFACTS_DESTINATION" ;;
esac
# basic-auth reads its admin account and its user database from this file (make-secrets.sh).
export MLFLOW_AUTH_CONFIG_PATH=/run/llama2-secrets/mlflow-auth.ini
if pgrep -f "mlflow server" >/dev/null; then pkill -f "mlflow server"; sleep 2; fi  # `ray up` again: restart
nohup mlflow server --app-name basic-auth --host 0.0.0.0 --port "$MLFLOW_PORT" --workers 4 \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
  > /tmp/mlflow-server.log 2>&1 &
for _ in $(seq 60); do
  if curl -fsS "http://127.0.0.1:$MLFLOW_PORT/health" >/dev/null 2>&1; then exit 0; fi
  sleep 2
done
echo "MLflow server did not answer on :$MLFLOW_PORT; /tmp/mlflow-server.log:" >&2
tail -50 /tmp/mlflow-server.log >&2
exit 1
