# shellcheck shell=bash
# Recipe-keyed cache of built guest images, sourced by scripts/build-*-image.sh.
#
# An image is built once per recipe and reused by every checkout on the machine:
#
#   $SQLITE_SIM_IMAGE_CACHE            default ${XDG_CACHE_HOME:-$HOME/.cache}/sqlite-sim/images
#     NAME-KEY/                        one complete build: its files (read-only), INPUTS, BUILD-INFO
#     .locks/NAME-KEY.lock             flock: one build of a key at a time; readers hold it shared
#     .build-NAME-KEY.XXXXXX/          a build in progress (renamed to NAME-KEY/ when complete)
#     .apt-lists-updated               when these scripts last ran apt-get update
#
# KEY is the first 16 hex digits of the SHA-256 of INPUTS: the SHA-256 of each recipe file (the
# build script and this file), the versions of the host tools that shape the output, and the
# exact Debian packages the build downloads (file name, size, SHA-256), resolved from the local
# apt lists before anything is downloaded. A new kernel in the lists therefore means a new key.
# An entry exists under its final name only once complete (atomic rename), so a crash leaves at
# most a .build-* directory, which the next build of that key removes.
#
# Variables: SQLITE_SIM_IMAGE_CACHE (the directory), SQLITE_SIM_IMAGE_CACHE_KEEP (entries kept per
# image, newest first by last use; default 3), SQLITE_SIM_APT_MAX_AGE (seconds after which the
# apt lists are refreshed before resolving packages; default 86400; 0 = always).

IMAGE_CACHE="${SQLITE_SIM_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sqlite-sim/images}"
IMAGE_CACHE_LIB="${BASH_SOURCE[0]}"

ic_log() { echo "image-cache: $*" >&2; }

# Refresh the apt lists when this cache last did so more than SQLITE_SIM_APT_MAX_AGE ago, so the
# packages resolved for a key are the archive's current ones (security updates included).
ic_apt_lists() {
    local stamp="$IMAGE_CACHE/.apt-lists-updated" max="${SQLITE_SIM_APT_MAX_AGE:-86400}" age
    mkdir -p "$IMAGE_CACHE"
    if [ -e "$stamp" ]; then
        age=$(($(date +%s) - $(stat -c %Y "$stamp")))
        [ "$age" -lt "$max" ] && return 0
    fi
    ic_log "refreshing the apt lists (apt-get update)"
    if apt-get update -qq; then
        touch "$stamp"
    else
        ic_log "warning: apt-get update failed; resolving from the lists as they are"
    fi
}

# ic_debs PKG[=VERSION]... : one line per package the build will download,
# "FILENAME SIZE SHA256:HASH", from the local lists. Fails if any cannot be resolved.
ic_debs() {
    local out
    out="$(apt-get download --print-uris "$@")" || return 1
    [ "$(printf '%s\n' "$out" | grep -c .)" = "$#" ] || {
        ic_log "apt-get resolved $(printf '%s\n' "$out" | grep -c .) of $# packages: $*"
        return 1
    }
    printf '%s\n' "$out" | awk '{print $2, $3, $4}' | LC_ALL=C sort
}

# ic_check_debs LINES DIR : every .deb in DIR is one of LINES (from ic_debs), byte for byte.
ic_check_debs() {
    local lines="$1" dir="$2" f want got
    for f in "$dir"/*.deb; do
        want="$(printf '%s\n' "$lines" | awk -v f="${f##*/}" '$1 == f {print $3}')"
        got="SHA256:$(sha256sum "$f" | cut -d' ' -f1)"
        if [ -z "$want" ] || [ "$want" != "$got" ]; then
            ic_log "downloaded ${f##*/} is not the package the key was computed from"
            return 1
        fi
    done
}

# ic_tools PKG... : "tool PKG VERSION" lines for host packages whose programs shape the output.
ic_tools() {
    dpkg-query -W -f='tool ${Package} ${Version}\n' "$@" 2>/dev/null | LC_ALL=C sort
}

# ic_key < INPUTS : the key of a recipe.
ic_key() { sha256sum | cut -c1-16; }

# ic_recipe FILE... : "recipe NAME SHA256" lines for the recipe files (this library included).
ic_recipe() {
    local f
    for f in "$@" "$IMAGE_CACHE_LIB"; do
        printf 'recipe %s %s\n' "${f##*/}" "$(sha256sum "$f" | cut -d' ' -f1)"
    done
}

# ic_lock NAME-KEY MODE : take the key's lock (MODE -x or -s) on file descriptor IC_LOCK_FD.
ic_lock() {
    mkdir -p "$IMAGE_CACHE/.locks"
    exec {IC_LOCK_FD}>>"$IMAGE_CACHE/.locks/$1.lock"
    if ! flock -n "$2" "$IC_LOCK_FD"; then
        ic_log "waiting for another build of $1"
        flock "$2" "$IC_LOCK_FD"
    fi
}

ic_unlock() { exec {IC_LOCK_FD}>&-; }

# ic_ensure NAME KEY INPUTS FORCE BUILD_FUNCTION
# Makes sure the entry NAME-KEY exists, building it with "BUILD_FUNCTION DIR" (run in a subshell
# under the caller's set -e; it writes its files into DIR and may set its own EXIT trap) unless
# it is already cached and FORCE is 0. Sets an EXIT trap of its own while building. On return the entry's
# lock is held shared (so pruning by other builds leaves it alone) until ic_unlock, and
# IC_ENTRY is its directory.
ic_ensure() {
    local name="$1" key="$2" inputs="$3" force="$4" build="$5" tmp start old
    IC_ENTRY="$IMAGE_CACHE/$name-$key"
    ic_lock "$name-$key" -x
    # Holding the exclusive lock: any .build-* of this key is left by a crashed build.
    rm -rf "$IMAGE_CACHE/.build-$name-$key".*
    if [ -d "$IC_ENTRY" ] && [ "$force" = 0 ]; then
        ic_log "cached: $IC_ENTRY"
    else
        tmp="$(mktemp -d "$IMAGE_CACHE/.build-$name-$key.XXXXXX")"
        chmod 755 "$tmp"
        ic_log "building $name (key $key) in $tmp"
        start=$(date +%s)
        # A plain statement, so the caller's errexit applies inside the build (in an `if` or
        # `||` it would be ignored); a failed build ends the script, and the trap removes $tmp.
        IC_BUILDING="$tmp"
        trap 'rm -rf "${IC_BUILDING:-/nonexistent}"' EXIT
        ("$build" "$tmp")
        printf '%s\n' "$inputs" >"$tmp/INPUTS"
        printf 'built %s on %s in %s s\n' "$(date -u +%FT%TZ)" "$(uname -n)" \
            "$(($(date +%s) - start))" >"$tmp/BUILD-INFO"
        # Read-only, as a reminder: the base files are never to be written.
        chmod -R a-w "$tmp"
        chmod u+w "$tmp"
        sync -f "$tmp"
        if [ -d "$IC_ENTRY" ]; then
            old="$IMAGE_CACHE/.trash-$name-$key.$$"
            mv -T "$IC_ENTRY" "$old"
            mv -T "$tmp" "$IC_ENTRY"
            rm -rf "$old"
        else
            mv -T "$tmp" "$IC_ENTRY"
        fi
        IC_BUILDING=""
        ic_log "stored $IC_ENTRY"
    fi
    touch "$IC_ENTRY" # last use, for pruning
    flock -s "$IC_LOCK_FD"
    ic_prune "$name" "$key"
}

# ic_prune NAME KEY : keep the newest SQLITE_SIM_IMAGE_CACHE_KEEP entries of NAME (by last use),
# never KEY itself nor an entry some other process holds locked. Also removes what crashed
# builds and prunes of NAME left behind (.build-* whose key nobody holds, .trash-*).
ic_prune() {
    local name="$1" key="$2" keep="${SQLITE_SIM_IMAGE_CACHE_KEEP:-3}" n=0 d base fd
    for d in "$IMAGE_CACHE/.build-$name-"*.*; do
        [ -d "$d" ] || continue
        base="${d##*/.build-}"
        exec {fd}>>"$IMAGE_CACHE/.locks/${base%.*}.lock"
        flock -n -x "$fd" && rm -rf "$d"
        exec {fd}>&-
    done
    for d in "$IMAGE_CACHE/.trash-$name-"*; do
        [ -d "$d" ] || continue
        chmod -R u+w "$d" && rm -rf "$d"
    done
    while IFS= read -r d; do
        base="${d##*/}"
        n=$((n + 1))
        [ "$base" = "$name-$key" ] && continue
        [ "$n" -le "$keep" ] && continue
        exec {fd}>>"$IMAGE_CACHE/.locks/$base.lock"
        if flock -n -x "$fd"; then
            # Rename first: a half-deleted entry must not look complete.
            if mv -T "$d" "$IMAGE_CACHE/.trash-$base.$$" 2>/dev/null; then
                chmod -R u+w "$IMAGE_CACHE/.trash-$base.$$"
                rm -rf "$IMAGE_CACHE/.trash-$base.$$"
                ic_log "pruned $base"
            fi
        fi
        exec {fd}>&-
    done < <(for d in "$IMAGE_CACHE/$name-"*; do
                 [[ -d "$d" && "${d##*/}" =~ ^$name-[0-9a-f]{16}$ ]] && stat -c '%Y %n' "$d"
             done | sort -rn | cut -d' ' -f2-)
}

# ic_install ENTRY STAMP SRC:DEST... : copy entry files to their destinations (a fresh copy,
# reflinked where the file system can, never a hardlink into the cache), each through a temporary
# name and a rename, then write the stamp (the entry's name) that ic_current checks.
ic_install() {
    local entry="$1" stamp="$2" pair src dst
    shift 2
    for pair in "$@"; do
        src="$entry/${pair%%:*}"
        dst="${pair#*:}"
        mkdir -p "$(dirname "$dst")"
        cp --reflink=auto "$src" "$dst.tmp.$$"
        chmod 644 "$dst.tmp.$$"
        mv -f "$dst.tmp.$$" "$dst"
    done
    printf '%s\n' "${entry##*/}" >"$stamp.tmp.$$"
    mv -f "$stamp.tmp.$$" "$stamp"
}

# ic_current STAMP NAME-KEY DEST... : the destinations hold that entry already (stamp matches,
# every file exists and, if the entry is still cached, has its size).
ic_current() {
    local stamp="$1" id="$2" dst
    shift 2
    [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$id" ] || return 1
    for dst in "$@"; do
        [ -s "${dst#*:}" ] || return 1
        if [ -e "$IMAGE_CACHE/$id/${dst%%:*}" ] &&
            [ "$(stat -c %s "$IMAGE_CACHE/$id/${dst%%:*}")" != "$(stat -c %s "${dst#*:}")" ]; then
            return 1
        fi
    done
}
