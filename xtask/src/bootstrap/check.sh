#!/usr/bin/env bash
# The bootstrap check: does `cargo xtask` build and run on a machine that has
# only stable Rust? Runs inside `unshare --mount --propagation private`, so what
# it hides is hidden from this process tree only and the machine is untouched.
#   check.sh WORKSPACE [REV]   (REV: check that commit instead of the work tree)
set -euo pipefail
root=$1
rev=${2:-}
work=$(mktemp -d /tmp/redirector-bootstrap.XXXXXX)
trap 'rm -rf "$work"' EXIT

# The eBPF toolchain, wherever `cargo xtask setup` or a developer put it.
hide_dir() { if [ -d "$1" ]; then mount -t tmpfs -o ro,size=4k none "$1"; echo "hidden: $1"; fi; }
hide_file() { if [ -e "$1" ]; then mount --bind /dev/null "$1"; echo "hidden: $1"; fi; }
hide_dir /usr/lib/rustlib                    # Debian's core for bpfel-unknown-none
hide_file /usr/bin/rustc                     # Debian's rustc-web
for linker in $(type -ap bpf-linker | sort -u || true); do hide_file "$linker"; done
for toolchain in "${RUSTUP_HOME:-$HOME/.rustup}"/toolchains/nightly*; do hide_dir "$toolchain"; done
# What setup and build.rs look for must be gone (`command -v` still lists a
# path with /dev/null on it for root, so run it).
if bpf-linker --version >/dev/null 2>&1 || [ -e /usr/lib/rustlib/bpfel-unknown-none ] \
    || rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "bootstrap check: could not hide the eBPF toolchain" >&2
    exit 1
fi

# A clean copy of the tree (tracked and new files, nothing ignored) and a
# target directory of its own: nothing built before can help.
mkdir "$work/tree"
if [ -n "$rev" ]; then
    git -C "$root" archive "$rev" | tar -xf - -C "$work/tree"
else
    (cd "$root" && git ls-files -z --cached --others --exclude-standard \
        | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -xf - -C "$work/tree"
fi
unset RUSTC RUSTC_WRAPPER RUSTC_WORKSPACE_WRAPPER RUSTFLAGS CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO
export CARGO_TARGET_DIR="$work/target"

cd "$work/tree"
start=$SECONDS
# The cause first, by name: xtask reaches the agent crate (directly and through
# the test fixtures), whose build script builds the kernel programs only with
# its `bpf-object` feature. In xtask's graph that feature must stay off.
if cargo tree --quiet -p xtask -e features -i redirector 2>"$work/log" | grep -q 'feature "bpf-object"'; then
    echo "bootstrap check FAILED: xtask's dependencies turn on redirector's bpf-object feature," >&2
    echo "so building xtask builds the kernel programs (use default-features = false):" >&2
    cargo tree --quiet -p xtask -e features -i redirector >&2
    exit 1
fi
if ! cargo xtask --help >"$work/help" 2>"$work/log"; then
    echo "bootstrap check FAILED: \`cargo xtask --help\` without the eBPF toolchain:" >&2
    grep -v '^ *[0-9]*: \|^ *at ' "$work/log" | tail -n 25 >&2
    exit 1
fi
grep -q '^Usage: ' "$work/help"
# The command a new machine runs first (same binary, no rebuild).
cargo xtask setup --help | grep -q '^Usage: xtask setup'
echo "bootstrap check passed: xtask's graph leaves bpf-object off, and \`cargo xtask --help\` and \`setup --help\` built and ran without the eBPF toolchain in $((SECONDS - start)) s"
