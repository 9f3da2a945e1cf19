#!/usr/bin/env bash
# Cold-start benchmark: 20 runs of `mqvisor run` with a release build.
# Prints median/p90 of exec->banner and KVM_CREATE_VM->first guest
# instruction, the peak RSS, and the ratio to Firecracker's published figure.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
exec target/release/mqvisor bench boot "$@"
