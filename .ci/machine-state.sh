#!/usr/bin/env bash
# What a test run may change on this machine and must leave as it found it (.ci/run compares the output before and
# after the test suite): users, the modes of the folders the tests open up, /etc/subuid and /etc/subgid, /dev/fuse,
# /etc/slurm (what no package installed there), /etc/hosts, and daemons that tests start. Installed Debian packages
# are not listed: the tests install what they need when it is missing (idempotent), as a user's set-up would, and
# never remove it.
set -uo pipefail
# Regular users only (uid 1000-59999, Debian policy 9.2.2: what adduser gives people): the tests' own user is one;
# system users (below 1000, or 64000-64999 like `slurm`) come with the packages the tests install and stay with them.
echo "users: $(getent passwd | awk -F: '$3 >= 1000 && $3 < 60000 {print $1}' | sort | tr '\n' ' ')"
for path in / /root /work /var/tmp /dev/fuse /etc/subuid /etc/subgid; do
    [[ -e $path ]] && echo "mode $path: $(stat -c '%a %U:%G' "$path")" || echo "mode $path: absent"
done
for file in /etc/subuid /etc/subgid /etc/hosts; do
    echo "$file: $(sha256sum < "$file" 2>/dev/null | cut -c1-16 || echo absent)"
done
# What the tests write into /etc/slurm (and must remove); the files Debian's Slurm packages put there come with the
# packages (a fresh machine has no /etc/slurm until the tests install them) and stay, like the packages.
echo "/etc/slurm: $(for entry in $(ls -A /etc/slurm 2>/dev/null); do
    dpkg -S "/etc/slurm/$entry" >/dev/null 2>&1 || echo "$entry"; done | tr '\n' ' ')"
# One name per pgrep: a pattern longer than 15 characters (the kernel's process-name length) never matches.
echo "daemons: $(for name in slurmctld slurmd slurmstepd munged postgres; do pgrep -x "$name"; done | wc -l)"
echo "mlflow servers: $(pgrep -f 'mlflow server|hpcdl.tracking_server' | wc -l)"
