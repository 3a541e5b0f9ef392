#!/usr/bin/env bash
# GitLab Runner custom executor `prepare_exec`: makes the job's cache volume (discarding first
# what a job whose cleanup never ran left in this slot). A failure here is the runner's, not the
# job's: exit SYSTEM_FAILURE_EXIT_CODE, so GitLab reports a runner_system_failure (and retries it
# where the job says so).
set -uo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
if ! (set -e; jcfs_start "$JCFS_DIR" "$JCFS_CACHE"); then
  echo "jobcachefs: could not make the cache volume at $JCFS_DIR" >&2
  exit "${SYSTEM_FAILURE_EXIT_CODE:-2}"
fi
jcfs_describe "$JCFS_DIR" "$JCFS_CACHE"
