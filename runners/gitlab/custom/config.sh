#!/usr/bin/env bash
# GitLab Runner custom executor `config_exec`: tells the runner the job's environment. The job
# (its script, run by run.sh on this host) sees JOBCACHEFS_DIR, its cache volume's path.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
printf '{"driver":{"name":"jobcachefs","version":"1"},"job_env":{"JOBCACHEFS_DIR":"%s"}}\n' "$JCFS_DIR"
