# Sourced by the scripts that need Debian packages. `apt_install PKG...` installs the
# ones not installed yet (as root, or through sudo), refreshing the package lists once
# if the first attempt fails; without dpkg it does nothing (install them yourself).

apt_install() {
  command -v dpkg >/dev/null 2>&1 || return 0
  local missing=() p
  for p in "$@"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== installing ${missing[*]} (apt)"
  local sudo=()
  [ "$(id -u)" = 0 ] || sudo=(sudo)
  "${sudo[@]}" apt-get install -y -q "${missing[@]}" ||
    { "${sudo[@]}" apt-get update -q && "${sudo[@]}" apt-get install -y -q "${missing[@]}"; }
}
