#!/usr/bin/env bash
# On each host, before its container starts (ray_cluster.yaml initialization_commands, as root):
# mount the shared FSx for Lustre file system and log in to the image registry. Any failure
# stops `ray up` on this node: a node without the shared file system would write its outputs
# where no other node sees them.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=site.env
source "$here/site.env"
: "${FSX_DNS:?set FSX_DNS in site.env}" "${FSX_MOUNT_NAME:?set FSX_MOUNT_NAME in site.env}"
: "${SHARED_MOUNT:?set SHARED_MOUNT in site.env}"

if ! mountpoint -q "$SHARED_MOUNT"; then
  if ! modinfo lustre >/dev/null 2>&1; then
    # The Lustre client for the running kernel (AWS's package repository for Ubuntu).
    codename="$(. /etc/os-release && echo "$VERSION_CODENAME")"
    curl -fsSL https://fsx-lustre-client-repo-public-keys.s3.amazonaws.com/fsx-ubuntu-public-key.asc \
      | gpg --dearmor --yes -o /usr/share/keyrings/fsx-ubuntu-public-key.gpg
    echo "deb [signed-by=/usr/share/keyrings/fsx-ubuntu-public-key.gpg] https://fsx-lustre-client-repo.s3.amazonaws.com/ubuntu $codename main" \
      > /etc/apt/sources.list.d/fsxlustreclientrepo.list
    apt-get update -q
    apt-get install -y -q "lustre-client-modules-$(uname -r)"
  fi
  mkdir -p "$SHARED_MOUNT"
  mount -t lustre -o relatime,flock "${FSX_DNS}@tcp:/${FSX_MOUNT_NAME}" "$SHARED_MOUNT"
fi
mkdir -p "$SHARED_MOUNT/outputs" "$SHARED_MOUNT/mlflow/artifacts" "$SHARED_MOUNT/raw"

if [ -n "${REGISTRY:-}" ]; then
  aws ecr get-login-password --region "$REGISTRY_REGION" | docker login --username AWS --password-stdin "$REGISTRY"
fi
