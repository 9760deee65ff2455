#!/usr/bin/env bash
# Install the benchmark's peers, each in its own virtualenv or node_modules under bench/.peers/.
# Pinned versions (see issue 3 and docs testing kit). Idempotent: a peer already installed is skipped.
#
#   bench/setup_peers.sh            # all peers
#   bench/setup_peers.sh mcp-proxy-py supergateway   # some of them
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
peers="$here/.peers"
python="${PYTHON:-python3}"
mkdir -p "$peers"

install_pypi() {  # name, requirement...
    local name="$1"; shift
    local venv="$peers/$name"
    if [[ -f "$venv/.installed" ]]; then echo "[setup_peers] $name: already installed"; return; fi
    echo "[setup_peers] $name: pip install $*"
    rm -rf "$venv"
    "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"
    # The SDK echo upstream runs in the bench's own interpreter; peers only need their own packages.
    touch "$venv/.installed"
}

install_npm() {  # name, package@version
    local name="$1" pkg="$2"
    local dir="$peers/$name"
    if [[ -f "$dir/.installed" ]]; then echo "[setup_peers] $name: already installed"; return; fi
    echo "[setup_peers] $name: npm install $pkg"
    rm -rf "$dir"
    mkdir -p "$dir"
    (cd "$dir" && echo '{"private": true}' > package.json \
        && npm install --silent --no-audit --no-fund --save-exact "$pkg")
    touch "$dir/.installed"
}

selected=("$@")
all=(mcp-proxy-py fastmcp supergateway mcp-proxy-js)
[[ ${#selected[@]} -eq 0 ]] && selected=("${all[@]}")

for p in "${selected[@]}"; do
    case "$p" in
        mcp-proxy-py) install_pypi mcp-proxy-py "mcp-proxy==0.13.0" ;;
        fastmcp)      install_pypi fastmcp "fastmcp==4.0.11" ;;
        supergateway) install_npm supergateway "supergateway@4.0.0" ;;
        mcp-proxy-js) install_npm mcp-proxy-js "mcp-proxy@6.7.19" ;;
        *) echo "[setup_peers] unknown peer: $p (known: ${all[*]})" >&2; exit 2 ;;
    esac
done
echo "[setup_peers] done: $peers"
