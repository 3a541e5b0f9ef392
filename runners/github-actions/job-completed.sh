#!/usr/bin/env bash
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_COMPLETED. Runs after the job's
# last step, on the host, as the runner's user. The runner does not tell it whether the job
# succeeded, so the job says so itself: its last step (which, like every step without `if:`,
# runs only when all steps before it succeeded) is
#     - run: touch "$JOBCACHEFS_SUCCESS_FILE"
# With that file the volume is committed (if it may write back), without it discarded. When this
# hook never runs (the runner or the host died), the next job-started.sh discards the volume.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common.sh"

dir="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/$(jcfs_label "${RUNNER_NAME:-runner}")"
if jcfs_marked "$dir"; then
  how=commit
else
  how=discard
fi
echo "jobcachefs: $(jcfs_finish "$dir" "$how")"
