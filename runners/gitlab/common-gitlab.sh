# Shared by the GitLab recipes (sourced): the job's volume slot and cache from GitLab's
# predefined variables, given as $1 = the variables' prefix ("" in the job's shell, "CUSTOM_ENV_"
# in the custom executor's stages). The slot is per runner and concurrency slot
# (CI_CONCURRENT_ID), so the next job in the same slot finds, and discards, what a job that never
# finished left there.
. "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/../common.sh"

jcfs_gitlab_env() {
  local p=$1 v
  v="${p}CI_RUNNER_ID"; local runner="${!v:-0}"
  v="${p}CI_CONCURRENT_ID"; local slot="${!v:-0}"
  v="${p}CI_PROJECT_PATH"; local project="${!v:-project}"
  v="${p}CI_COMMIT_REF_PROTECTED"; local protected="${!v:-false}"
  JCFS_DIR="${JOBCACHEFS_ROOT:-/var/lib/jobcachefs-runners}/gitlab-$runner-$slot"
  JCFS_CACHE="${JOBCACHEFS_CACHE:-$(jcfs_label "$project")}"
  # Only protected refs (what maintainers merged) write the cache back; branches and merge
  # requests read it.
  case "${JOBCACHEFS_WRITE_BACK:-auto}" in
    true) JCFS_WRITE_BACK=true ;;
    false) JCFS_WRITE_BACK=false ;;
    *) JCFS_WRITE_BACK=$protected ;;
  esac
}
