#!/usr/bin/env bash
# GitHub Actions self-hosted runner: ACTIONS_RUNNER_HOOK_JOB_STARTED=/path/to/job-started.sh (in
# the runner's .env). The runner runs it as `bash -e job-started.sh`, as the runner's user, in
# $GITHUB_WORKSPACE, before the job's first step (outside any job container) with the job's
# GITHUB_* variables and environment files; a non-zero exit fails the job before it runs.
#
# Makes the job's cache volume at $JOBCACHEFS_ROOT/github-<runner name> (one per runner: a runner
# runs one job at a time), reading the cache, or the cache and the job's scope (runners/common.sh:
# pull requests "pr-<n>", the default branch and JOBCACHEFS_TRUSTED_REFS the cache, other refs
# their own), and tells the job where it is through $GITHUB_ENV: JOBCACHEFS_DIR, and
# JOBCACHEFS_SUCCESS_FILE, which the job's last step touches to ask for the commit (see
# job-completed.sh). What the job before left there is discarded first: its completed hook never
# ran, so nothing says it succeeded.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common.sh"

dir="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/github-$(jcfs_dns_label "${RUNNER_NAME:-runner}")"
cache="${JOBCACHEFS_CACHE:-$(jcfs_dns_label "${GITHUB_REPOSITORY:-cache}")}"
jcfs_github_target
jcfs_start "$dir" "$cache"
{
  echo "JOBCACHEFS_DIR=$dir"
  echo "JOBCACHEFS_SUCCESS_FILE=$dir/$JCFS_MARKER"
} >>"$GITHUB_ENV"
jcfs_describe "$dir" "$cache"
