# Shared by the runner recipes (sourced, not run): how a CI job's cache volume is named, made and
# finished. Everything is configured by environment variables, set where the runner's own
# environment is set (the GitHub runner's .env file, GitLab's config.toml `environment`):
#   JOBCACHEFS            the binary (default: jobcachefs on PATH)
#   JOBCACHEFS_ROOT       where job volumes are mounted (default /var/lib/jobcachefs-runners)
#   JOBCACHEFS_CACHE      cache name (default: from the repository's path)
#   JOBCACHEFS_NAMESPACE  cache namespace (default: ci)
#   JOBCACHEFS_SIZE       volume size (default: the node config's)
#   JOBCACHEFS_WRITE_BACK auto (default: trusted refs only, as each recipe says), true or false
#   JOBCACHEFS_STATE_DIR, JOBCACHEFS_CONFIG  passed on to jobcachefs (also through sudo)
# A runner that is not root reaches jobcachefs through `sudo -n` (README: the sudoers line).

JCFS_MARKER=.jobcachefs-success

jcfs() {
  local sudo=() args=()
  [ "$(id -u)" = 0 ] || sudo=(sudo -n)
  [ -n "${JOBCACHEFS_STATE_DIR:-}" ] && args+=(--state-dir "$JOBCACHEFS_STATE_DIR")
  [ -n "${JOBCACHEFS_CONFIG:-}" ] && args+=(--config "$JOBCACHEFS_CONFIG")
  "${sudo[@]}" "${JOBCACHEFS:-jobcachefs}" "${args[@]}" "$@"
}

# A DNS-1123 label (what jobcachefs accepts as a cache name) from a repository path:
# "Octo-Org/My_App" -> "octo-org-my-app".
jcfs_label() {
  local s
  s=$(printf '%s' "$1" | tr 'A-Z' 'a-z' | tr -c 'a-z0-9-' '-' | tr -s '-')
  s=${s:0:63}
  s=${s#-}
  s=${s%-}
  printf '%s' "${s:-cache}"
}

# jcfs_start DIR CACHE WRITE_BACK(true|false): discards whatever a job that never finished left
# at DIR (its end hook did not run: a crash, a killed runner), then makes this job's volume there,
# owned by the runner's user. A volume of an unfinished job is never committed: nothing says that
# job succeeded.
jcfs_start() {
  local dir=$1 cache=$2 write_back=$3 args=()
  jcfs volume delete "$dir" --discard >/dev/null
  args=(volume create "$dir" --cache "$cache" --namespace "${JOBCACHEFS_NAMESPACE:-ci}")
  [ -n "${JOBCACHEFS_SIZE:-}" ] && args+=(--size "$JOBCACHEFS_SIZE")
  [ "$write_back" = true ] && args+=(--write-back)
  jcfs "${args[@]}" >/dev/null
  # The job runs as the runner's user; the volume's root is root's until given to it. (Kept in
  # the cache by the first commit, so it is the same for every later job of this runner.)
  [ "$(id -u)" = 0 ] || jcfs_chown "$dir"
  rm -f "$dir/$JCFS_MARKER"
}

jcfs_chown() {
  sudo -n chown "$(id -u):$(id -g)" "$1"
}

# jcfs_finish DIR commit|discard: deletes the job's volume; with commit, a write-back volume is
# committed into its cache. The success marker goes first, so it never reaches the cache. Prints
# jobcachefs' JSON outcome; a rejected commit is the cache's problem, not the job's (exit 0).
jcfs_finish() {
  local dir=$1 how=$2
  rm -f "$dir/$JCFS_MARKER"
  if [ "$how" = commit ]; then
    jcfs volume delete "$dir" -o json
  else
    jcfs volume delete "$dir" --discard -o json
  fi
}

# Whether the job marked its success (a file only the job itself writes, as its last step).
jcfs_marked() {
  [ -e "$1/$JCFS_MARKER" ]
}
