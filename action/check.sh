#!/usr/bin/env bash
# The "convrewrite check" step of action.yml: run the check with --format github, let the
# runner see the annotations (lines starting with "::"), append the markdown to the job
# summary, and end with convrewrite's own exit code (0 pass, 1 budget exceeded, 2 usage or
# configuration error, 3 model could not be loaded).
#
# Environment: INPUT_ARGS (split on whitespace), INPUT_SUMMARY ("true"/"false"), and the
# runner's RUNNER_TEMP, GITHUB_STEP_SUMMARY, GITHUB_OUTPUT. CONVREWRITE overrides the command
# (tests point it at a virtual environment).
set -uo pipefail

command="${CONVREWRITE:-convrewrite}"
temp="${RUNNER_TEMP:-$(mktemp -d)}"
out="$temp/convrewrite-check.out"
err="$temp/convrewrite-check.err"
read -r -a args <<< "${INPUT_ARGS:-}"

# --format github comes last so that it wins over a --format in INPUT_ARGS.
# ${args[@]+...}: an empty array under `set -u` in bash 3 (macOS runners).
"$command" check ${args[@]+"${args[@]}"} --format github >"$out" 2>"$err"
code=$?

cat "$err" >&2
grep '^::' "$out" || true
summary="$(grep -v '^::' "$out" || true)"
printf '%s\n' "$summary"

if [ "${INPUT_SUMMARY:-true}" = "true" ] && [ -n "${GITHUB_STEP_SUMMARY:-}" ]; then
  if [ -n "$summary" ]; then
    printf '%s\n' "$summary" >>"$GITHUB_STEP_SUMMARY"
  else
    {
      printf '### convrewrite check could not run (exit %s)\n\n```\n' "$code"
      cat "$err"
      printf '```\n'
    } >>"$GITHUB_STEP_SUMMARY"
  fi
fi
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  echo "exit-code=$code" >>"$GITHUB_OUTPUT"
fi
exit "$code"
