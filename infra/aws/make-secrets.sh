#!/usr/bin/env bash
# On the operator's machine, once per cluster: the secrets ray_cluster.yaml syncs to every
# node (~/.llama2-secrets -> /run/llama2-secrets): the Ray token, the MLflow admin account and
# the account the pipeline's steps log with. Nothing here is committed.
set -euo pipefail
dir="${1:-$HOME/.llama2-secrets}"
umask 077
mkdir -p "$dir"
[ -s "$dir/ray_auth_token" ] || python3 -c 'import secrets; print(secrets.token_hex(32), end="")' > "$dir/ray_auth_token"
if [ ! -s "$dir/mlflow-auth.ini" ]; then
  admin_pw="$(python3 -c 'import secrets; print(secrets.token_urlsafe(24))')"
  cat > "$dir/mlflow-auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = sqlite:////mnt/llama2/mlflow/basic_auth.db
admin_username = admin
admin_password = $admin_pw
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  # The steps log as the admin account (create a narrower user in the UI for people).
  printf 'MLFLOW_TRACKING_USERNAME=admin\nMLFLOW_TRACKING_PASSWORD=%s\n' "$admin_pw" > "$dir/mlflow-client.env"
fi
echo "secrets in $dir (Ray token: $dir/ray_auth_token)"
