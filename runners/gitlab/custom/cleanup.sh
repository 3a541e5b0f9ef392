#!/usr/bin/env bash
# GitLab Runner custom executor `cleanup_exec`: runs after every job, failed, cancelled or not
# (its failure is only logged). Commits the volume (into the cache or the job's scope) if run.sh
# marked the job's steps a success, discards it otherwise.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
if jcfs_marked "$JCFS_DIR"; then how=commit; else how=discard; fi
out=$(jcfs_finish "$JCFS_DIR" "$how")
echo "jobcachefs: $how: $(printf '%s' "$out" | tr -s ' \n' ' ')"
