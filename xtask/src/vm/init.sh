#!/bin/busybox sh
# PID 1 of the kernel-matrix guest (xtask/src/vm): prepares what a node gives
# the agent (proc, sys, cgroup2, bpffs, /var/run/netns on tmpfs), runs the plan
# in /vm/plan, reports on the serial console and powers off. The host reads
# only the lines that start with the marker; everything else is for people.
#
# busybox sh runs its own applets before PATH lookups, so host tools copied
# into the image (ip, setpriv, ...) are called by full path here; the tests
# exec them through PATH, where /usr/bin comes first.

/bin/busybox --install -s /bin
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root

MARK=@@redirector-vm@@
uptime_s() { cut -d' ' -f1 /proc/uptime; }
mark() { echo "$MARK $*"; }
halt() {
	sync
	poweroff -f
}
die() {
	mark "error $*"
	halt
}

mount -t proc proc /proc || die "mount proc"
mount -t sysfs sysfs /sys || die "mount sysfs"
mount -t devtmpfs devtmpfs /dev || die "mount devtmpfs"
mount -t tmpfs tmpfs /run || die "mount /run"
# /tmp stays the initramfs's own (writable) directory: a tmpfs there would
# hide a payload from a work tree under /tmp.
mkdir -p /run/netns
mount -t cgroup2 cgroup2 /sys/fs/cgroup || die "mount cgroup2"
mount -t bpf bpf /sys/fs/bpf || die "mount bpffs"

. /vm/plan || die "no /vm/plan"
for m in $MODULES; do
	insmod "$m" || die "insmod $m"
done
/usr/bin/ip link set lo up || die "lo up"
hostname "$(cat /etc/hostname)"
export REDIRECTOR_BIN
cd "$ROOT" || die "cd $ROOT"
mark "booted $(uptime_s)"

# A test binary: libtest output goes straight to the console.
run_tests() {
	for t in $TESTS; do
		name=${t%%=*}
		bin=${t#*=}
		mark "begin $name $(uptime_s)"
		"$bin" --test-threads=1 ${FILTER:+"$FILTER"}
		mark "end $name $? $(uptime_s)"
	done
}

# Ids of loaded programs named like ours, and our pins: what a refusal must
# not leave behind. Program fds close asynchronously after a process exits,
# so this waits up to 5 s for them to go.
leftovers() {
	for _ in 1 2 3 4 5 6 7 8 9 10; do
		progs=$(/usr/bin/bpftool prog show 2>/dev/null | grep -c 'name redir_')
		pins=$(ls /sys/fs/bpf | grep -c redirector)
		[ "$progs" = 0 ] && [ "$pins" = 0 ] && break
		sleep 0.5
	done
	mark "leftover $progs $pins"
}

# One refusal attempt: `run ARGS` under block NAME. Only stderr goes in the
# block (the refusal must be one line there); stdout follows in NAME-stdout.
# A kernel that unexpectedly runs the agent gets SIGTERM after 20 s.
refuse() {
	name=$1
	shift
	mark "begin $name $(uptime_s)"
	timeout 20 "$REDIRECTOR_BIN" run --metrics-addr 127.0.0.1:0 "$@" \
		>/tmp/run.out 2>/tmp/run.err
	rc=$?
	cat /tmp/run.err
	mark "end $name $rc $(uptime_s)"
	mark "begin $name-stdout $(uptime_s)"
	cat /tmp/run.out
	mark "end $name-stdout 0 $(uptime_s)"
	leftovers
	# Not a clean refusal: once more with the agent's debug log (verifier
	# output included) for whoever reads the console.
	if [ "$rc" != 3 ]; then
		mark "begin $name-debug $(uptime_s)"
		RUST_LOG=debug timeout 20 "$REDIRECTOR_BIN" run \
			--metrics-addr 127.0.0.1:0 "$@" 2>&1 | grep -v 'aya_obj::relocation'
		mark "end $name-debug 0 $(uptime_s)"
		leftovers
	fi
}

# Below the minimum kernel: `check` and `run` (a namespace given, and
# discovery) must refuse.
run_refusal() {
	/usr/bin/ip netns add refused || die "ip netns add"
	mark "begin check $(uptime_s)"
	"$REDIRECTOR_BIN" check
	mark "end check $? $(uptime_s)"
	refuse run --netns /var/run/netns/refused
	refuse run-discover --discover
}

case "$MODE" in
tests) run_tests ;;
refusal) run_refusal ;;
*) die "unknown MODE $MODE" ;;
esac
mark "done $(uptime_s)"
halt
