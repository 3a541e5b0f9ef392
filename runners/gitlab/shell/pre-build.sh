#!/usr/bin/env bash
# GitLab Runner `pre_build_script` (shell executor): makes the job's cache volume and prints its
# path, which config.toml exports as JOBCACHEFS_DIR for the job's script:
#   pre_build_script = 'export JOBCACHEFS_DIR="$(/opt/jobcachefs/runners/gitlab/shell/pre-build.sh)"'
# The runner writes pre_build_script, the job's `script` and post_build_script into one script
# (the step_script stage), run with errexit in the build directory after the sources are fetched;
# a failure here fails the job. A volume left in this slot by a job that failed or was cancelled
# (post_build_script does not run then) is discarded first.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env ""
jcfs_start "$JCFS_DIR" "$JCFS_CACHE"
jcfs_describe "$JCFS_DIR" "$JCFS_CACHE" >&2
printf '%s\n' "$JCFS_DIR"
