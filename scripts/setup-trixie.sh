#!/usr/bin/env bash
# The Debian 13 (trixie) pieces the runtime tests need, which Debian 12 does not ship:
#   ctd-decoder (imgcrypt 1.1.11: containerd's ocicrypt stream processor), skopeo 1.18 and
#   podman 5.4 (ocicrypt 1.1, `--decryption-key`), netavark (podman 5's network helper) and
#   the CRI's api.proto (golang-github-kubernetes-cri-api-dev, the reference for harness/cri).
# Fetched with `apt-get download` through a private APT configuration (the system's own sources
# and package database are never changed) from the mirror the system's sources already use,
# unpacked with `dpkg-deb -x` into $KEYLEASE_TRIXIE_CACHE (default /var/cache/keylease-trixie).
# ctd-decoder runs on Debian 12's libc as it is; skopeo, podman and netavark need trixie's libc
# (GLIBC_2.38/2.39), so bin/ holds them with their ELF interpreter and RPATH pointing into the
# unpacked tree (patchelf). Run through the loader instead (`ld-linux-x86-64.so.2 --library-path
# ...`), skopeo works but podman 5 cannot store a layer: containers/storage re-executes
# /proc/self/exe, which is then the loader ("unpacking failed (error: exit status 127; output: /:
# error while loading shared libraries: /: cannot read file data: Error 21)").
#
# The tree lives in a directory named after this recipe (the package list and the patch step);
# `current` points at it. A second run with the same recipe does nothing and downloads nothing.
set -euo pipefail

CACHE=${KEYLEASE_TRIXIE_CACHE:-/var/cache/keylease-trixie}
SUITE=trixie
PACKAGES=(imgcrypt skopeo podman netavark golang-github-kubernetes-cri-api-dev
          libc6 libgpgme11t64 libassuan9 libgpg-error0 libsqlite3-0 libseccomp2 libsubid5)
PATCHED=(usr/bin/skopeo usr/bin/podman usr/lib/podman/netavark)
RECIPE="$SUITE main ${PACKAGES[*]} patchelf:${PATCHED[*]} v2"
key=$(printf '%s' "$RECIPE" | sha256sum | cut -c1-16)
dest="$CACHE/$key"

if [[ -f "$dest/ready" && "$(readlink "$CACHE/current" 2>/dev/null)" == "$key" ]]; then
  exit 0
fi

if ! command -v patchelf >/dev/null; then
  echo "setup-trixie: patchelf is missing (apt-get install patchelf; scripts/setup.sh does)" >&2
  exit 1
fi
if [[ $(dpkg --print-architecture) != amd64 ]]; then
  echo "setup-trixie: only amd64 is supported (the libraries are taken from x86_64-linux-gnu)" >&2
  exit 1
fi

# The Debian mirror the system's own sources use for bookworm (deb822 or one-line format).
mirror=$(apt-get indextargets --format '$(REPO_URI)' 'Release: bookworm' 'Created-By: Packages' \
           | head -n1)
if [[ -z "$mirror" ]]; then
  echo "setup-trixie: no bookworm source configured in APT; cannot tell which Debian mirror to use" >&2
  exit 1
fi

echo "setup-trixie: fetching ${PACKAGES[*]} from $mirror ($SUITE) into $dest" >&2
mkdir -p "$CACHE"
work=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'rm -rf "$work"' EXIT
chmod 0755 "$work"
apt_dir="$work/apt"
mkdir -p "$apt_dir/etc/apt/sources.list.d" "$apt_dir/etc/apt/apt.conf.d" \
         "$apt_dir/etc/apt/preferences.d" "$apt_dir/var/lib/apt/lists/partial" \
         "$apt_dir/var/cache/apt/archives/partial" "$work/debs" "$work/root" "$work/bin"
touch "$apt_dir/status"
cat > "$apt_dir/etc/apt/sources.list.d/$SUITE.sources" <<EOF
Types: deb
URIs: $mirror
Suites: $SUITE
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
apt_opts=(-o "Dir=$apt_dir" -o "Dir::State::status=$apt_dir/status"
          -o "Dir::Etc::SourceParts=$apt_dir/etc/apt/sources.list.d"
          -o "Dir::Etc::SourceList=$apt_dir/etc/apt/sources.list"
          -o "Dir::Etc::Parts=$apt_dir/etc/apt/apt.conf.d"
          -o "Dir::Etc::PreferencesParts=$apt_dir/etc/apt/preferences.d"
          -o "Acquire::Languages=none")
if id _apt >/dev/null 2>&1; then
  chown -R _apt "$apt_dir/var/lib/apt/lists" "$work/debs"  # apt downloads as _apt (sandbox)
fi
apt-get "${apt_opts[@]}" -qq update
(cd "$work/debs" && apt-get "${apt_opts[@]}" -qq download "${PACKAGES[@]}")

for deb in "$work"/debs/*.deb; do
  dpkg-deb -x "$deb" "$work/root"
  dpkg-deb --show --showformat='${Package} ${Version}\n' "$deb" >> "$work/versions"
done

lib="$dest/root/usr/lib/x86_64-linux-gnu"  # where the tree will live once moved into place
mv "$work/root/usr/bin/ctd-decoder" "$work/bin/"
for path in "${PATCHED[@]}"; do
  mv "$work/root/$path" "$work/bin/"
  patchelf --set-interpreter "$lib/ld-linux-x86-64.so.2" --force-rpath --set-rpath "$lib" \
    "$work/bin/$(basename "$path")"
done
rm -rf "$apt_dir" "$work/debs"

rm -rf "$dest"
mv "$work" "$dest"
trap - EXIT
for tool in ctd-decoder skopeo podman netavark; do
  if ! "$dest/bin/$tool" --help >/dev/null 2>&1; then
    echo "setup-trixie: $dest/bin/$tool does not run:" >&2
    "$dest/bin/$tool" --help >&2 || true
    exit 1
  fi
done
touch "$dest/ready"
ln -sfn "$key" "$CACHE/current.tmp" && mv -T "$CACHE/current.tmp" "$CACHE/current"
find "$CACHE" -mindepth 1 -maxdepth 1 ! -name "$key" ! -name current -exec rm -rf {} +
sed 's/^/setup-trixie:   /' "$dest/versions" >&2
