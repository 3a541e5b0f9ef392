#!/usr/bin/env bash
# GitLab Runner custom executor `cleanup_exec`: runs after every job, failed, cancelled or not
# (its failure is only logged). Commits the volume if run.sh marked the job's script a success
# (and the ref may write back), discards it otherwise.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
if jcfs_marked "$JCFS_DIR"; then how=commit; else how=discard; fi
echo "jobcachefs: $(jcfs_finish "$JCFS_DIR" "$how")"
