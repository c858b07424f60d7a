#!/usr/bin/env bash
# Build one hpcdl Apptainer image, unprivileged, and write its sha256 beside it. Called by the rules of
# workflow/rules/containers.smk (`snakemake build_images`); usable by hand:
#
#   containers/build-image.sh DEF OUT.sif [KEY=VALUE ...] [-- INPUT ...]
#
#   DEF        containers/hpcdl-base.def or containers/hpcdl.def
#   OUT.sif    the image; written as OUT.sif.partial and renamed when complete, then OUT.sif.sha256
#              ("<sha256>  OUT.sif", the format of sha256sum -c) next to it
#   KEY=VALUE  build arguments (apptainer build --build-arg), e.g. FLAVOUR=gpu
#   INPUT ...  files whose content decides the image (the def, requirements, sources): the cache key
#
# What it passes into the build, so that no package host is written in a def:
#   DEBIAN_MIRROR / DEBIAN_SECURITY_MIRROR  from this machine's apt configuration (apt-get indextargets), unless
#                                           set in the environment;
#   pip's configuration                     `pip config list` of this machine (index-url, extra-index-url,
#                                           find-links, constraint, ...) as /mnt/pip.conf; the local folders it
#                                           names are bound read-only under /mnt/host (a local wheel mirror is
#                                           then used instead of downloading gigabytes), local files copied in.
# Environment:
#   APPTAINER         the apptainer binary (default: apptainer on PATH)
#   HPCDL_CACHE       a wheel cache shared with scripts/build-horovod.sh (bound read-write; default: none, so
#                     Horovod is compiled inside the build)
#   HPCDL_MKSQUASHFS_ARGS  compression of the image (default "-comp lz4": an unprivileged Apptainer decompresses
#                     through squashfuse every page of torch's libraries a stage touches, at every stage start,
#                     and lz4 decompresses several times faster than zstd: the stages that import torch start
#                     1-2 s sooner than from zstd level 3 (README, Measured, P8), for an image 18% larger (3.9 vs
#                     3.3 GB) that takes a little longer to write. Readable by squashfuse and by
#                     kernels >= 3.19. "-comp zstd -Xcompression-level 3" for the smaller image; "-comp gzip"
#                     for older kernels with a setuid Apptainer.)
#   HPCDL_IMAGE_CACHE a folder of finished images keyed by sha256(inputs + build arguments + compression); a hit
#                     is copied instead of rebuilt (CI). Default: none.
# Non-root users build with --fakeroot (needs /etc/subuid and /etc/subgid entries); root builds without it.
set -euo pipefail

usage() { sed -n '2,/^set -e/{/^#/p}' "$0" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
DEF=$1 OUT=$2; shift 2
BUILD_ARGS=() INPUTS=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --) shift; INPUTS=("$@"); break ;;
        *=*) BUILD_ARGS+=("$1"); shift ;;
        *) echo "build-image: not KEY=VALUE: $1" >&2; usage ;;
    esac
done
[[ -f $DEF ]] || { echo "build-image: no such definition file: $DEF" >&2; exit 1; }
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"   # %files paths in the defs are relative to the repository root
APPTAINER=${APPTAINER:-apptainer}
command -v "$APPTAINER" >/dev/null || { echo "build-image: apptainer not found (set APPTAINER or install it; README: Containers)" >&2; exit 1; }
log() { echo "[build-image $(date +%T)] $*"; }

MKSQUASHFS_ARGS=${HPCDL_MKSQUASHFS_ARGS:--comp lz4}

# --- the cache key: every input's content, the build arguments, the compression, the apptainer version ----------
key=$( { for f in "$DEF" "${INPUTS[@]}"; do
             if [[ -d $f ]]; then (cd "$f" && find . -type f ! -path '*/__pycache__/*' -print0 | LC_ALL=C sort -z | xargs -0 sha256sum);
             else sha256sum "$f"; fi
         done
         printf '%s\n' "${BUILD_ARGS[@]}" "$MKSQUASHFS_ARGS" "$("$APPTAINER" --version)"; } | sha256sum | cut -c1-24)
name=$(basename "$OUT" .sif)
sha256_of() {  # the hex digest of a file: OpenSSL's when there is one (SHA-NI: 2.5 s for a 3.3 GB image where
    # coreutils' sha256sum, which has no such code path in Debian 12, takes 10.5 s), else sha256sum's
    if command -v openssl >/dev/null; then openssl dgst -sha256 -r "$1" | cut -d' ' -f1; else sha256sum "$1" | cut -d' ' -f1; fi
}
finish_image() {  # OUT.partial -> OUT, then OUT.sha256 (sha256sum format, name relative), each by rename
    mv -f "$OUT.partial" "$OUT"
    local digest; digest=$(sha256_of "$OUT")
    [[ $digest =~ ^[0-9a-f]{64}$ ]] || { echo "build-image: could not compute the sha256 of $OUT" >&2; exit 1; }
    printf '%s  %s\n' "$digest" "$(basename "$OUT")" > "$OUT.sha256.partial" && mv -f "$OUT.sha256.partial" "$OUT.sha256"
}
if [[ -n ${HPCDL_IMAGE_CACHE:-} && -f $HPCDL_IMAGE_CACHE/$name-$key.sif ]]; then
    log "image cache hit: $HPCDL_IMAGE_CACHE/$name-$key.sif"
    cp "$HPCDL_IMAGE_CACHE/$name-$key.sif" "$OUT.partial"
    finish_image
    exit 0
fi

# --- package sources of this machine --------------------------------------------------------------------------
mirror_of() {  # the first apt source of a Debian 12 suite, e.g. bookworm -> http://<mirror>/debian/
    apt-get indextargets --format '$(RELEASE) $(REPO_URI)' 'Identifier: Packages' 2>/dev/null | awk -v s="$1" '$1 == s {print $2; exit}'
}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-$(mirror_of bookworm)}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR-$(mirror_of bookworm-security)}
[[ -n $DEBIAN_MIRROR ]] || { echo "build-image: no Debian 12 (bookworm) source in apt's configuration; set DEBIAN_MIRROR=<URL of a Debian mirror>" >&2; exit 1; }

# Everything the build needs from this machine is bound under /mnt (present, empty, in every Debian rootfs, so no
# mount point is left behind in the image): /mnt/pip.conf, /mnt/files/ (copied files), /mnt/host/<path> (local
# package folders, read-only), /mnt/cache (HPCDL_CACHE).
STAGE=$(mktemp -d "${TMPDIR:-/tmp}/hpcdl-build.XXXXXX")
trap 'rm -rf "$STAGE" "$OUT.partial"' EXIT
BINDS=(--bind "$STAGE:/mnt")
bind_host_dir() {  # bind_host_dir DIR -> prints where DIR is seen inside the build
    mkdir -p "$STAGE/host$1"
    BINDS+=(--bind "$1:/mnt/host$1:ro")
}
PIP=(); if [[ -x $ROOT/.venv/bin/python ]]; then PIP=("$ROOT/.venv/bin/python" -m pip); elif command -v python3 >/dev/null; then PIP=(python3 -m pip); fi
if ((${#PIP[@]})); then
    # `pip config list` prints global.key='value' (config files) and :env:.key='value' (PIP_* variables, which
    # win). Local paths are rewritten to where the build sees them: folders (find-links, a file:// index) are
    # bound read-only, an index with its parent (PEP 503 pages of a local mirror often link to ../../files);
    # files (a constraints file, a CA bundle) are copied.
    mkdir -p "$STAGE/files"
    echo "[global]" > "$STAGE/pip.conf"
    n=0
    while read -r setting value; do
        words=()
        for word in $value; do
            path=${word#file://}
            if [[ $path == /* && -d $path ]]; then
                path=$(realpath "$path"); top=$path
                [[ $setting == *index-url ]] && top=$(dirname "$path")
                already=0; for b in "${BINDS[@]}"; do [[ $b == "$top:/mnt/host$top:ro" ]] && already=1; done
                ((already)) || bind_host_dir "$top"
                word=${word%%/*}; [[ $word == file: ]] && word=file:///mnt/host$path || word=/mnt/host$path
            elif [[ $path == /* && -f $path ]]; then
                n=$((n + 1)); cp "$path" "$STAGE/files/$n-$(basename "$path")"
                word=/mnt/files/$n-$(basename "$path")
            fi
            words+=("$word")
        done
        echo "$setting = ${words[*]}" >> "$STAGE/pip.conf"
    done < <("${PIP[@]}" config list 2>/dev/null | sed -n "s/^\(global\|:env:\)\.\([a-z-]*\)='\(.*\)'$/\2 \3/p" | tac | awk '!seen[$1]++')
    log "pip settings passed in: $(sed -n "s/ = .*//p" "$STAGE/pip.conf" | tr "\n" " ")"
fi
if [[ -n ${HPCDL_CACHE:-} ]]; then
    mkdir -p "$HPCDL_CACHE" "$STAGE/cache"
    BINDS+=(--bind "$HPCDL_CACHE:/mnt/cache")
fi

ARGS=()   # the mirrors only for a def that bootstraps Debian (apptainer refuses unused build arguments)
if grep -q '{{ *DEBIAN_MIRROR *}}' "$DEF"; then
    ARGS+=(--build-arg "DEBIAN_MIRROR=$DEBIAN_MIRROR" --build-arg "DEBIAN_SECURITY_MIRROR=$DEBIAN_SECURITY_MIRROR")
fi
for arg in "${BUILD_ARGS[@]}"; do ARGS+=(--build-arg "$arg"); done
FAKEROOT=(); [[ $(id -u) -ne 0 ]] && FAKEROOT=(--fakeroot)
mkdir -p "$(dirname "$OUT")"
log "$("$APPTAINER" --version): building $OUT from $DEF (${BUILD_ARGS[*]:-no build arguments})"
t0=$SECONDS
"$APPTAINER" build "${FAKEROOT[@]}" --force --mksquashfs-args "$MKSQUASHFS_ARGS" \
    "${BINDS[@]}" "${ARGS[@]}" "$OUT.partial" "$DEF"
log "built in $((SECONDS - t0)) s: $(du -h "$OUT.partial" | cut -f1)"
finish_image
log "sha256: $(cut -d' ' -f1 "$OUT.sha256")"
if [[ -n ${HPCDL_IMAGE_CACHE:-} ]]; then
    mkdir -p "$HPCDL_IMAGE_CACHE"
    cp "$OUT" "$HPCDL_IMAGE_CACHE/$name-$key.sif.partial" && mv -f "$HPCDL_IMAGE_CACHE/$name-$key.sif.partial" "$HPCDL_IMAGE_CACHE/$name-$key.sif"
    log "stored in the image cache as $name-$key.sif"
fi
