#!/usr/bin/env bash
# GitLab Runner custom executor `run_exec`: called as `run.sh SCRIPT STAGE` for each stage
# (prepare_script, get_sources, ..., step_script, after_script, ...); runs SCRIPT on this host.
# A failing script exits BUILD_FAILURE_EXIT_CODE (the job failed, not the runner). When the
# job's own script (step_script; build_script on old runners) succeeds, the volume is marked for
# commit: cleanup.sh is not told the job's result. after_script and later stages do not change
# the mark (an after_script failure does not fail a GitLab job either).
set -uo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env CUSTOM_ENV_
script=$1 stage=$2
JOBCACHEFS_DIR="$JCFS_DIR" bash "$script"
rc=$?
if [ "$rc" != 0 ]; then
  exit "${BUILD_FAILURE_EXIT_CODE:-1}"
fi
case "$stage" in
  step_script | build_script) touch "$JCFS_DIR/$JCFS_MARKER" ;;
esac
