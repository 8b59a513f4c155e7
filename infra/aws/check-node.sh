#!/usr/bin/env bash
# In each container (ray_cluster.yaml setup_commands): fail the node's set-up unless it runs
# the cluster's Ray version, sees the shared file system, and holds the secrets.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=site.env
source "$here/site.env"
got="$(python -c 'import ray; print(ray.__version__)')"
[ "$got" = "$RAY_VERSION" ] || { echo "this image runs Ray $got, the cluster Ray $RAY_VERSION" >&2; exit 1; }
mountpoint -q "$SHARED_MOUNT" || { echo "$SHARED_MOUNT is not mounted in the container" >&2; exit 1; }
touch "$SHARED_MOUNT/outputs/.write-test" && rm "$SHARED_MOUNT/outputs/.write-test"
[ -s /run/llama2-secrets/ray_auth_token ] || { echo "no Ray token: run infra/aws/make-secrets.sh" >&2; exit 1; }
