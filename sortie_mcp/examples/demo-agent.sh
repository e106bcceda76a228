#!/usr/bin/env bash
# The demo's stand-in agent, run by sortie-runner's `command` back-end once per step.
# It gets the step prompt on stdin and its session (SORTIE_STEP_ID, SORTIE_CLAIM_TOKEN, …) in
# the environment. It reports either on stdout (the runner completes the step with it) or
# through the MCP tools of `sortie-mcp` (a note; a splice), as a real agent would.
set -euo pipefail

prompt=$(cat)
# The task is the first line after the "## Your task" heading.
task=$(printf '%s\n' "$prompt" | awk '/^## Your task/ {getline; getline; print; exit}')

json_string() { # a shell string as a JSON string
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    printf '"%s"' "${s//$'\n'/\\n}"
}

# One MCP tool call through sortie-mcp over stdio; prints the JSON-RPC answer.
mcp() {
    local tool=$1 arguments=$2 line
    coproc MCP { "${SORTIE_BIN_DIR:?}/sortie-mcp" 2>/dev/null; }
    printf '%s\n' \
        '{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"demo-agent","version":"1"}}}' \
        '{"jsonrpc":"2.0","method":"notifications/initialized"}' \
        "{\"jsonrpc\":\"2.0\",\"id\":2,\"method\":\"tools/call\",\"params\":{\"name\":\"$tool\",\"arguments\":$arguments}}" >&"${MCP[1]}"
    while IFS= read -r line <&"${MCP[0]}"; do
        case $line in *'"id":2'*) printf '%s\n' "$line"; break ;; esac
    done
    exec {MCP[1]}>&-
    wait "$MCP_PID" 2>/dev/null || true
}

case $task in
    summarise*)
        source=${task##* from }
        mcp add_note "{\"content\": $(json_string "$source: agents coordinate best through an explicit task DAG"), \"tags\": [\"finding\"]}" >/dev/null
        echo "Summary of $source: recent work favours explicit DAGs, leases and fencing for agent fleets."
        ;;
    merge*)
        # Splitting the work: a fact-check first, then a continuation that finishes the merge.
        mcp spawn_and_continue '{"partial_output": "merged draft of the three summaries", "subtasks": [{"action": "check the merged claims against the sources", "agent": "checker"}], "continuation": "finalise the merged summary"}' >/dev/null
        ;;
    check*)
        echo "All merged claims trace back to a source."
        ;;
    write*)
        # The step has a verify command that looks for this file (SPEC §17); the runner starts
        # the agent in SORTIE_WORKDIR, where the check runs too.
        printf '# Agent orchestration: a survey\n\nExplicit DAGs, leases and fencing keep agent fleets honest.\n' > report.md
        echo "Wrote report.md: a one-page survey of agent orchestration."
        ;;
    *)
        echo "Done: $task"
        ;;
esac
