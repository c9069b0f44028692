# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): errors, quoted command lines, and --dry-run.
# The sourcing script sets dry_run=0|1 before calling run.

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints a command as one shell-quoted line.
show() {
  local line
  line=$(printf '%q ' "$@")
  echo "${line% }"
}

# Runs a command, or only prints it under --dry-run.
run() {
  if [ "${dry_run:-0}" = 1 ]; then
    show "$@"
  else
    "$@"
  fi
}

need_value() {
  [ "$#" -ge 2 ] && [ -n "$2" ] || die "$1 needs a value (see --help)"
}
