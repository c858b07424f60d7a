#!/usr/bin/env bash
# Install Apptainer 1.4.5 on a Debian 12 host, for the container tests (tests/test_containers.py) and for anyone
# who wants to run the images on a Debian 12 machine. Run as root; idempotent. Clusters have their own Apptainer:
# this is not needed there.
#
#   tests/apptainer/install-apptainer.sh [PREFIX] [--link]
#     PREFIX   default /opt/hpcdl-apptainer/1.4.5; the binary is PREFIX/usr/bin/apptainer
#     --link   also link /usr/local/bin/apptainer to it (for users; the tests put PREFIX/usr/bin on PATH instead,
#              so that they change nothing outside PREFIX)
#
# Debian 12 has no Apptainer package. Debian's unstable suite has 1.4.5, built against glibc 2.38 (Debian 12
# has 2.36). So, without touching the host's libc or dpkg's database:
#   1. download apptainer (unstable) and libc6 (Debian 13, trixie) with a private apt configuration, from the
#      mirror the host's apt already uses (apt-get indextargets; no host name is written here). The mirror's
#      unstable Release file is stale, hence Acquire::Check-Valid-Until=false for this private list only;
#   2. unpack both under PREFIX with `dpkg -x` (a `dpkg -i --force-depends` would leave an unmet libc6 dependency
#      in dpkg's database and break every later apt-get install);
#   3. point apptainer's two ELF programs (bin/apptainer and the `starter` it executes) at that libc with
#      patchelf: --set-interpreter to its ld-linux, --set-rpath to its lib dir, then the host's for the rest
#      (libseccomp, libsqlite3). --force-rpath writes DT_RPATH, which wins over LD_LIBRARY_PATH (DT_RUNPATH does
#      not): apptainer re-runs itself with LD_LIBRARY_PATH=<host lib dirs> to sandbox unsquashfs when it
#      extracts an image (`Bootstrap: localimage`), and would then load the host's older libc;
#   4. Apptainer is relocatable when not installed setuid: it finds its config relative to its binary
#      (PREFIX/usr/etc/apptainer, from the starter PREFIX/usr/lib/etc/apptainer), so two symlinks point there;
#   5. (with --link) link /usr/local/bin/apptainer; install what it runs (squashfuse and fuse2fs to mount images unprivileged,
#      uidmap for --fakeroot builds, squashfs-tools to build, debootstrap for `Bootstrap: debootstrap`), and make
#      /dev/fuse usable by unprivileged users (containers run as a normal user).
# Users who build need /etc/subuid and /etc/subgid entries (tests/test_containers.py adds its user's).
set -euo pipefail

VERSION=1.4.5
PREFIX=/opt/hpcdl-apptainer/$VERSION LINK=0
for arg in "$@"; do
    case $arg in
        --link) LINK=1 ;;
        -*) echo "install-apptainer: unknown option $arg" >&2; exit 2 ;;
        *) PREFIX=$arg ;;
    esac
done
mkdir -p "$(dirname "$PREFIX")" && PREFIX=$(cd "$(dirname "$PREFIX")" && pwd -P)/$(basename "$PREFIX")
[[ $(id -u) -eq 0 ]] || { echo "install-apptainer: run as root" >&2; exit 1; }
log() { echo "[install-apptainer $(date +%T)] $*"; }

export DEBIAN_FRONTEND=noninteractive
NEEDED=(patchelf squashfuse fuse2fs uidmap squashfs-tools debootstrap libseccomp2 libsqlite3-0 ca-certificates)
missing=()
for package in "${NEEDED[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
    log "apt-get install ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" > /dev/null
fi

# (the check runs it as apptainer runs itself to unpack images: with the host libraries first on LD_LIBRARY_PATH)
if [[ ! -x $PREFIX/usr/bin/apptainer ]] || ! LD_LIBRARY_PATH=/lib/x86_64-linux-gnu "$PREFIX/usr/bin/apptainer" --version 2>/dev/null | grep -q "$VERSION"; then
    MIRROR=$(apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' | awk '$1 == "bookworm" {print $2; exit}')
    [[ -n $MIRROR ]] || { echo "install-apptainer: no Debian 12 (bookworm) source in apt's configuration" >&2; exit 1; }
    APT=$(mktemp -d); trap 'rm -rf "$APT"' EXIT
    mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial"
    printf 'deb %s unstable main\ndeb %s trixie main\n' "$MIRROR" "$MIRROR" > "$APT/sources.list"
    OPTS=(-o "Dir::Etc::SourceList=$APT/sources.list" -o Dir::Etc::SourceParts=/dev/null -o "Dir::State::Lists=$APT/lists"
          -o "Dir::Cache=$APT/cache" -o Acquire::Check-Valid-Until=false -o APT::Sandbox::User=root)
    log "downloading apptainer ($VERSION, unstable) and libc6 (trixie)"
    apt-get "${OPTS[@]}" update -qq
    (cd "$APT" && apt-get "${OPTS[@]}" download -qq "apptainer=$VERSION-*" libc6/trixie)
    rm -rf "$PREFIX.partial" && mkdir -p "$PREFIX.partial/glibc"
    dpkg -x "$APT"/apptainer_*.deb "$PREFIX.partial"
    dpkg -x "$APT"/libc6_*.deb "$PREFIX.partial/glibc"

    LIBC=$PREFIX/glibc/usr/lib/x86_64-linux-gnu   # final location: patchelf records absolute paths
    for program in "$PREFIX.partial/usr/bin/apptainer" "$PREFIX.partial/usr/lib/x86_64-linux-gnu/apptainer/bin/starter"; do
        patchelf --set-interpreter "$LIBC/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$LIBC:/lib/x86_64-linux-gnu:/usr/lib/x86_64-linux-gnu" "$program"
    done
    ln -s ../etc "$PREFIX.partial/usr/etc"       # seen from bin/apptainer
    ln -s ../var "$PREFIX.partial/usr/var"
    ln -s ../etc "$PREFIX.partial/usr/lib/etc"   # seen from lib/x86_64-linux-gnu/apptainer/bin/starter
    ln -s ../var "$PREFIX.partial/usr/lib/var"
    rm -rf "$PREFIX" && mv "$PREFIX.partial" "$PREFIX"
fi
if ((LINK)); then ln -sfn "$PREFIX/usr/bin/apptainer" /usr/local/bin/apptainer; fi
[[ -c /dev/fuse ]] || { echo "install-apptainer: /dev/fuse is missing: unprivileged containers cannot mount images" >&2; exit 1; }
if ((LINK)); then chmod 0666 /dev/fuse; fi   # containers run as normal users (the tests do this themselves, and undo it)
log "$("$PREFIX/usr/bin/apptainer" --version) at $PREFIX$( ((LINK)) && echo " (/usr/local/bin/apptainer)")"
