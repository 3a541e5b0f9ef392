#!/usr/bin/env bash
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_STARTED. Runs on the runner's host,
# as the runner's user, before the job's first step (outside any job container); a non-zero exit
# fails the job before it runs. Makes the job's cache volume at
# $JOBCACHEFS_ROOT/$RUNNER_NAME (one per runner: a runner runs one job at a time) and tells the
# job where it is through $GITHUB_ENV: JOBCACHEFS_DIR, and JOBCACHEFS_SUCCESS_FILE, which the
# job's last step touches to ask for a commit (see job-completed.sh).
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common.sh"

dir="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/$(jcfs_label "${RUNNER_NAME:-runner}")"
cache="${JOBCACHEFS_CACHE:-$(jcfs_label "$GITHUB_REPOSITORY")}"
# Pull requests run code the repository's owners did not review: they read the cache, they never
# write it (their volume has no write-back, whatever the job marks).
case "${JOBCACHEFS_WRITE_BACK:-auto}/${GITHUB_EVENT_NAME:-}" in
  true/*) write_back=true ;;
  auto/pull_request | auto/pull_request_target | false/*) write_back=false ;;
  *) write_back=true ;;
esac
jcfs_start "$dir" "$cache" "$write_back"
{
  echo "JOBCACHEFS_DIR=$dir"
  echo "JOBCACHEFS_SUCCESS_FILE=$dir/$JCFS_MARKER"
} >>"$GITHUB_ENV"
echo "jobcachefs: cache ${JOBCACHEFS_NAMESPACE:-ci}/$cache at $dir (write-back: $write_back)"
