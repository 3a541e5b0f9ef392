#!/usr/bin/env bash
# GitLab Runner custom executor `config_exec`: prints the executor's JSON configuration. The
# job's stages (run by run.sh on this host) see JOBCACHEFS_DIR, the cache volume's path
# (`job_env`).
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
printf '{"driver":{"name":"jobcachefs","version":"1"},"job_env":{"JOBCACHEFS_DIR":"%s"}}\n' "$JCFS_DIR"
