#!/usr/bin/env bash
# Prepares a SoftHSM2 development token for hsmkeyd under .dev/ in the repo root.
#
#   ./softhsm-setup.sh              set up (idempotent: re-running keeps token and keys)
#   ./softhsm-setup.sh --reset      delete .dev/ first and start from scratch
#   ./softhsm-setup.sh --deps-only  only install softhsm2/opensc if missing
#
# Never prints PINs and never passes them through environment variables.
set -euo pipefail

MODULE=/usr/lib/softhsm/libsofthsm2.so
TOKEN_LABEL=hsmkeyd-dev

die() { printf 'softhsm-setup: %s\n' "$*" >&2; exit 1; }
info() { printf '%s\n' "$*"; }

usage() {
  sed -n '2,7s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

reset=0
deps_only=0
for arg in "$@"; do
  case "$arg" in
    --reset) reset=1 ;;
    --deps-only) deps_only=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $arg (see --help)" ;;
  esac
done

as_root() {
  if [ "$(id -u)" -eq 0 ]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "need root (or sudo) to run: $*"
  fi
}

# --- 1. dependencies -------------------------------------------------------
if ! command -v softhsm2-util >/dev/null 2>&1 || ! command -v pkcs11-tool >/dev/null 2>&1; then
  info "Installing softhsm2 and opensc with apt-get..."
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q softhsm2 opensc
fi
if [ "$deps_only" -eq 1 ]; then
  exit 0
fi
[ -e "$MODULE" ] || die "PKCS#11 module $MODULE not found (is softhsm2 installed?)"

# --- 2. locations ----------------------------------------------------------
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)"
DEV="$ROOT/.dev"
CONF="$DEV/softhsm2.conf"
TOKENS="$DEV/tokens"
PIN="$DEV/pin"
SO_PIN="$DEV/so-pin"
ENCEDO_PASS="$DEV/encedo-passphrase"
CONFIG="$DEV/hsmkeyd.toml"
SOCK="$DEV/hsmkeyd.sock"

# Values go into TOML strings unescaped: refuse anything that would need escaping.
check_plain() {
  case "$2" in
    *[\"\\]* | *$'\n'*) die "$1 contains a double quote, backslash or newline, which this script does not escape: $2" ;;
  esac
}
check_plain "repository path" "$ROOT"

# The principal is the invoking user (the one behind sudo, if any).
if [ -n "${SUDO_UID:-}" ] && [ -n "${SUDO_USER:-}" ]; then
  user_uid="$SUDO_UID"
  user_name="$SUDO_USER"
else
  user_uid="$(id -u)"
  user_name="$(id -un)"
fi
check_plain "user name" "$user_name"

cd "$ROOT"

if [ "$reset" -eq 1 ] && [ -e "$DEV" ]; then
  info "Removing $DEV (--reset)"
  rm -rf -- "$DEV"
fi

# The daemon refuses a socket directory writable by group or others.
[ -d "$DEV" ] || mkdir -m 0700 "$DEV"
chmod 0700 "$DEV"
[ -d "$TOKENS" ] || mkdir -m 0700 "$TOKENS"

# --- 3. SoftHSM configuration ----------------------------------------------
conf_text="# Written by softhsm-setup.sh.
directories.tokendir = $TOKENS
objectstore.backend = file
log.level = ERROR"
if [ ! -f "$CONF" ] || [ "$(cat "$CONF")" != "$conf_text" ]; then
  printf '%s\n' "$conf_text" >"$CONF"
fi
export SOFTHSM2_CONF="$CONF"

# --- 4. token --------------------------------------------------------------
if softhsm2-util --show-slots 2>/dev/null |
  grep -Eq "^[[:space:]]*Label:[[:space:]]+${TOKEN_LABEL}[[:space:]]*\$"; then
  [ -s "$PIN" ] || die "token $TOKEN_LABEL exists but $PIN is missing; run with --reset to start over"
  info "Token $TOKEN_LABEL already exists in $TOKENS"
else
  info "Initializing token $TOKEN_LABEL in $TOKENS"
  so_pin="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  user_pin="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  if [ "${#so_pin}" -ne 32 ] || [ "${#user_pin}" -ne 32 ]; then
    die "could not read random PINs from /dev/urandom"
  fi
  rm -f -- "$PIN" "$SO_PIN"
  (
    umask 077
    printf '%s\n' "$user_pin" >"$PIN"
    printf '%s\n' "$so_pin" >"$SO_PIN"
  )
  # softhsm2-util only takes PINs as arguments, so they are briefly visible in
  # the process list. Acceptable for a throw-away development token only.
  softhsm2-util --init-token --free --label "$TOKEN_LABEL" \
    --so-pin "$so_pin" --pin "$user_pin" >/dev/null
  unset so_pin user_pin
fi

# --- 4b. the Encedo login's dev passphrase (user "dev"), kept across runs --------
if [ ! -s "$ENCEDO_PASS" ]; then
  passphrase="$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')"
  [ "${#passphrase}" -eq 32 ] || die "could not read a random passphrase from /dev/urandom"
  (
    umask 077
    printf '%s\n' "$passphrase" >"$ENCEDO_PASS"
  )
  unset passphrase
fi
chmod 0600 "$ENCEDO_PASS"

# --- 5. demo keys ----------------------------------------------------------
cargo build --quiet --manifest-path "$ROOT/Cargo.toml" --bin hsmkeyd-devtoken --bin hsmkeyd-devcert
tool="${CARGO_TARGET_DIR:-$ROOT/target}/debug/hsmkeyd-devtoken"
demo_out="$("$tool" --module "$MODULE" --token-label "$TOKEN_LABEL" --pin-file "$PIN" demo)"
aes_kid="$(awk '$2 == "demo-aes" { print $1 }' <<<"$demo_out")"

# --- 6. development TLS: a throw-away CA and a localhost certificate ---------
"${CARGO_TARGET_DIR:-$ROOT/target}/debug/hsmkeyd-devcert" --out "$DEV/tls" >/dev/null

# --- 7. daemon configuration (always rewritten) ----------------------------
tmp_config="$(mktemp "$DEV/.hsmkeyd.toml.XXXXXX")"
cat >"$tmp_config" <<EOF
# Development config written by softhsm-setup.sh; rewritten on every run.
[pkcs11]
module = "$MODULE"
token_label = "$TOKEN_LABEL"
pin_file = "$PIN"

[pkcs11.module_env]
SOFTHSM2_CONF = "$CONF"

[unix]
path = "$SOCK"
mode = "0660"

# Development only: audit entries as JSON lines on stderr, so the daemon runs where no
# journald listens. Production uses the default, sink = "journald".
[audit]
sink = "stderr-json"

# HTTPS on loopback with the development CA's certificate (.dev/tls/ca.pem for clients).
[tls]
listen = "127.0.0.1:8443"
cert = "$DEV/tls/cert.pem"
key = "$DEV/tls/key.pem"

[keys]
roles = ["ops", "payments"]
unique_labels = true

[[principals]]
name = "$user_name"
uids = [$user_uid]
scopes = ["keymgmt:list", "keymgmt:get", "keymgmt:upd", "keymgmt:gen", "keymgmt:del", "auth:token"]
roles = ["ops", "payments"]

# The Encedo HEM login (GET/POST /api/auth/token on the HTTPS port): user "dev" logs in
# with the passphrase in .dev/encedo-passphrase, one scope per token.
[[encedo.users]]
name = "dev"
scopes = ["keymgmt:list", "keymgmt:search", "keymgmt:get", "keymgmt:upd", "keymgmt:gen", "keymgmt:del"]
roles = ["ops", "payments"]
passphrase_file = "$ENCEDO_PASS"
EOF
chmod 0600 "$tmp_config" # mktemp creates it 0600 already; be explicit
mv -f -- "$tmp_config" "$CONFIG"

# --- 8. .gitignore ---------------------------------------------------------
gitignore="$ROOT/.gitignore"
for line in .dev/ /target; do
  if ! { [ -f "$gitignore" ] && grep -qxF -- "$line" "$gitignore"; }; then
    # Keep existing lines; add a newline first if the file lacks a final one.
    if [ -s "$gitignore" ] && [ -n "$(tail -c 1 "$gitignore")" ]; then
      printf '\n' >>"$gitignore"
    fi
    printf '%s\n' "$line" >>"$gitignore"
  fi
done

# Under sudo, hand .dev/ back to the invoking user so they can run the daemon.
if [ -n "${SUDO_UID:-}" ] && [ "$SUDO_UID" != 0 ]; then
  chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$DEV"
fi

# --- 9. summary (no PINs) --------------------------------------------------
info ""
info "Demo keys on token $TOKEN_LABEL (kid  label  status):"
while IFS= read -r line; do info "  $line"; done <<<"$demo_out"
info ""
info "Daemon config: .dev/hsmkeyd.toml (principal $user_name, uid $user_uid)"
info ""
info "Run the daemon (from $ROOT):"
info "  cargo run --release --bin hsmkeyd -- --config .dev/hsmkeyd.toml"
info ""
info "Then, in another terminal:"
info "  curl --unix-socket .dev/hsmkeyd.sock http://localhost/v1/keys"
info "  curl --unix-socket .dev/hsmkeyd.sock -X PATCH -H 'Content-Type: application/json' -d '{\"label\":\"renamed\"}' http://localhost/v1/keys/${aes_kid:-<kid>}"
info ""
info "Over HTTPS with a bearer token minted on the Unix socket:"
# shellcheck disable=SC2016 # printed for the user to run, not expanded here
info '  TOKEN=$(curl -s --unix-socket .dev/hsmkeyd.sock -H "Content-Type: application/json" -d '"'"'{"scopes":["keymgmt:list"],"ttl_s":600}'"'"' http://localhost/v1/auth/token | jq -r .token)'
# shellcheck disable=SC2016
info '  curl --cacert .dev/tls/ca.pem -H "Authorization: Bearer $TOKEN" https://localhost:8443/v1/keys'
info ""
info "Or log in as the Encedo appliance's clients do (user dev, .dev/encedo-passphrase):"
info "  see README.md, \"Logging in as the appliance's clients do\""
info ""
info "Look at the token independently of the daemon:"
# shellcheck disable=SC2016 # printed for the user to run, not expanded here
info '  SOFTHSM2_CONF=.dev/softhsm2.conf pkcs11-tool --module /usr/lib/softhsm/libsofthsm2.so -O --login --pin "$(cat .dev/pin)"'
