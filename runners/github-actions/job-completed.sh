#!/usr/bin/env bash
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_COMPLETED=/path/to/job-completed.sh.
# Runs after the job's last step and after every action's post step, whatever the job's result
# (the runner registers it as a post-job step with `always()`), on the host, as the runner's
# user. The runner does not tell it the job's result, so the job says so itself: its last step
#     - if: success()
#       run: touch "$JOBCACHEFS_SUCCESS_FILE"
# (a step without `if:` is `success()` too) runs only when every step before it succeeded, and
# never in a cancelled job. With that file the volume is committed — into the cache or the job's
# scope, as job-started.sh made it — without it discarded. When this hook never runs (the runner
# or the host died), the next job-started.sh on this runner discards the volume.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common.sh"

dir="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/github-$(jcfs_dns_label "${RUNNER_NAME:-runner}")"
if jcfs_marked "$dir"; then
  how=commit why="the job marked its success"
else
  how=discard why="the job did not mark its success (failed, cancelled, or no last step touching \$JOBCACHEFS_SUCCESS_FILE)"
fi
out=$(jcfs_finish "$dir" "$how")
echo "jobcachefs: $why: $(printf '%s' "$out" | tr -s ' \n' ' ')"
