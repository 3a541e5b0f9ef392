#!/usr/bin/env bash
# GitLab Runner `pre_build_script` (shell executor): makes the job's cache volume and prints its
# path, which config.toml exports as JOBCACHEFS_DIR for the job's script:
#   pre_build_script = 'export JOBCACHEFS_DIR="$(/opt/jobcachefs/runners/gitlab/shell/pre-build.sh)"'
# It runs in the job's shell, after the sources are fetched and before the script; a failure
# fails the job. A volume left in this slot by a failed job (post_build_script does not run when
# the script fails) is discarded first.
set -euo pipefail
. "$(dirname "$(readlink -f "$0")")/../common-gitlab.sh"
jcfs_gitlab_env ""
jcfs_start "$JCFS_DIR" "$JCFS_CACHE" "$JCFS_WRITE_BACK"
echo "jobcachefs: cache ${JOBCACHEFS_NAMESPACE:-ci}/$JCFS_CACHE at $JCFS_DIR (write-back: $JCFS_WRITE_BACK)" >&2
printf '%s\n' "$JCFS_DIR"
