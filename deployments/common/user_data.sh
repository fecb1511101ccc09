#!/bin/sh
# saltfleet's first-boot entry point (cloud-init user-data), run as root.
#
# It only installs and configures salt-minion; salt then converges the host to
# its pillar (`salt '*' state.apply`). salt-cloud's saltfleet drivers render it
# with the settings below filled in (profile `bootstrap: cloud-init`); it can also
# be run by hand with the settings in the environment:
#
#   SALTFLEET_MINION_ID=worker-7 SALTFLEET_MINION_CONFIG="$(printf 'master: salt.example.com\n')" \
#       sh deployments/common/user_data.sh
#
# No key and no secret belongs here: user-data is readable by every process on
# the host through the metadata service. The minion generates its own key; its
# first authentication leaves it pending and sends the instance id this script
# reads from the metadata service (grain saltfleet_instance_id, autosign_grains),
# and the master's fleet.admit accepts the key if salt-cloud's ticket for that
# instance names this minion id (see _utils/saltfleet_cloud_minion.py). The script
# asks again until it is accepted.
#
# Where the instance id and addresses come from (SALTFLEET_METADATA):
#   ec2        EC2's metadata service, IMDSv2 (a session token, then
#              instance-id, local-ipv4 and public-ipv4).
#   openstack  The config drive first (Rackspace has one and no metadata service):
#              the filesystem labelled config-2, mounted read-only in a temporary
#              directory, openstack/latest/meta_data.json's "uuid" and the
#              ip_address entries of network_data.json (global ones are public);
#              then the OpenStack metadata service at the same paths.
# They complete the grain saltfleet_cloud (SALTFLEET_CLOUD, from salt-cloud),
# written with saltfleet_instance_id to the static grains file.
#
# How salt-minion is installed (when missing): pip, into its own venv
# /opt/saltfleet/salt-<version>, pinned to exactly SALTFLEET_SALT_VERSION (the
# master's version, salt_version in the profile), with a systemd unit. Not
# salt-bootstrap: its `latest` script ran unpinned as root, and even a pinned
# release breaks when the package repositories it knows move (they did in
# 2024), while a Salt release on PyPI never changes. It is also how saltfleet's
# own master and every test and demo minion install Salt. Needs python3 (3.10+)
# with venv; the script installs python3-venv with apt-get, dnf or yum if missing.
# To upgrade, change salt_version (all hosts) and re-provision or pip-install it.
#
# Knobs for tests and baked images (environment only):
#   SALTFLEET_ROOT          write under this prefix instead of /          (default /)
#   SALTFLEET_METADATA_URL  metadata service       (default http://169.254.169.254)
#   SALTFLEET_CONFIG_DRIVE  config drive: a block device to mount, or a directory
#                           holding openstack/latest/meta_data.json
#                                               (default /dev/disk/by-label/config-2)
#   SALTFLEET_INSTANCE_ID   skip the metadata service and use this id (no addresses)
#   SALTFLEET_INSTALL       auto: install salt-minion if missing; skip   (default auto)
#   SALTFLEET_PIP_INDEX_URL a PyPI mirror for the install              (default PyPI)
#   SALTFLEET_START         yes: wait until the master accepts the key, sync
#                           saltfleet's modules (salt-call saltutil.sync_all) and
#                           (re)start salt-minion; sync: all but the restart
#                           (an image whose init starts salt-minion); no (default yes)
#   SALTFLEET_ACCEPT_WAIT   seconds between two authentications while the key
#                           is pending                                    (default 10)
#   SALTFLEET_ACCEPT_TRIES  how many before giving up (the ticket lasts 30 min) (default 90)
set -eu

# @saltfleet-settings@
: "${SALTFLEET_MINION_ID:?set SALTFLEET_MINION_ID to the minion id}"
: "${SALTFLEET_MINION_CONFIG:?set SALTFLEET_MINION_CONFIG to the minion config (YAML)}"
SALTFLEET_METADATA=${SALTFLEET_METADATA:-ec2}
SALTFLEET_SALT_VERSION=${SALTFLEET_SALT_VERSION:-3008.4}
SALTFLEET_ROOT=${SALTFLEET_ROOT:-/}
SALTFLEET_METADATA_URL=${SALTFLEET_METADATA_URL:-http://169.254.169.254}
SALTFLEET_CONFIG_DRIVE=${SALTFLEET_CONFIG_DRIVE:-/dev/disk/by-label/config-2}
SALTFLEET_INSTALL=${SALTFLEET_INSTALL:-auto}
SALTFLEET_START=${SALTFLEET_START:-yes}
SALTFLEET_CLOUD=${SALTFLEET_CLOUD:-"{}"}
SALTFLEET_ACCEPT_WAIT=${SALTFLEET_ACCEPT_WAIT:-10}
SALTFLEET_ACCEPT_TRIES=${SALTFLEET_ACCEPT_TRIES:-90}

log() { echo "saltfleet user-data: $*" >&2; }
die() { log "$*"; exit 1; }

fetch() {  # fetch URL [curl options...]: the body on stdout, retried while the network comes up
    url=$1; shift
    curl -fsS --retry 10 --retry-delay 2 --retry-connrefused --max-time 10 "$@" "$url"
}

META=$(mktemp -d)
trap 'rm -rf "$META"' EXIT

openstack_files() {  # meta_data.json (and network_data.json if any) into $META; fails when there is none
    if [ -d "$SALTFLEET_CONFIG_DRIVE" ]; then
        cp "$SALTFLEET_CONFIG_DRIVE"/openstack/latest/*_data.json "$META"/ && [ -s "$META/meta_data.json" ]
        return
    fi
    if [ -b "$SALTFLEET_CONFIG_DRIVE" ]; then
        mnt=$(mktemp -d)
        rc=1
        if mount -o ro "$SALTFLEET_CONFIG_DRIVE" "$mnt"; then
            cp "$mnt"/openstack/latest/*_data.json "$META"/ && [ -s "$META/meta_data.json" ] && rc=0
            umount "$mnt" || log "could not unmount the config drive from $mnt"
        fi
        rmdir "$mnt" 2>/dev/null || true
        [ $rc = 0 ] && return
    fi
    log "no config drive at $SALTFLEET_CONFIG_DRIVE; asking $SALTFLEET_METADATA_URL"
    fetch "$SALTFLEET_METADATA_URL/openstack/latest/meta_data.json" > "$META/meta_data.json" || return 1
    fetch "$SALTFLEET_METADATA_URL/openstack/latest/network_data.json" > "$META/network_data.json" 2>/dev/null \
        || rm -f "$META/network_data.json"
}

facts() {  # the instance id into $META/id, its addresses (one a line) into $META/public and $META/private
    : > "$META/public"
    : > "$META/private"
    if [ -n "${SALTFLEET_INSTANCE_ID:-}" ]; then
        echo "$SALTFLEET_INSTANCE_ID" > "$META/id"
        return
    fi
    case "$SALTFLEET_METADATA" in
        ec2)  # IMDSv2: a session token first; an instance without a public address has no public-ipv4
            token=$(fetch "$SALTFLEET_METADATA_URL/latest/api/token" -X PUT \
                -H "X-aws-ec2-metadata-token-ttl-seconds: 300") || return 1
            for item in instance-id:id local-ipv4:private public-ipv4:public; do
                fetch "$SALTFLEET_METADATA_URL/latest/meta-data/${item%%:*}" -H "X-aws-ec2-metadata-token: $token" \
                    > "$META/${item#*:}" 2>/dev/null || [ "${item#*:}" != id ] || return 1
            done
            ;;
        openstack)
            openstack_files || return 1
            python3 - "$META" <<'PY'
import ipaddress, json, os, sys
meta = sys.argv[1]
with open(os.path.join(meta, "meta_data.json")) as handle:
    uuid = json.load(handle)["uuid"]
addresses = {"public": [], "private": []}
try:
    with open(os.path.join(meta, "network_data.json")) as handle:
        networks = json.load(handle).get("networks") or []
except (OSError, ValueError):
    networks = []
for network in networks:
    try:
        ip = ipaddress.ip_address(network.get("ip_address") or "")
    except ValueError:
        continue
    addresses["public" if ip.is_global else "private"].append(str(ip))
for name, value in (("id", [uuid]), *addresses.items()):
    with open(os.path.join(meta, name), "w") as handle:
        handle.write("".join(f"{item}\n" for item in value))
PY
            ;;
        *) die "SALTFLEET_METADATA=$SALTFLEET_METADATA: expected ec2 or openstack" ;;
    esac
}

facts || die "cannot read the instance id from $SALTFLEET_METADATA_URL ($SALTFLEET_METADATA)"
ID=$(cat "$META/id")
[ -n "$ID" ] || die "the metadata service returned an empty instance id"
case "$ID" in
    *[!A-Za-z0-9._-]*) die "unexpected instance id from the metadata service: $ID" ;;
esac
for kind in public private; do
    while read -r ip; do
        case "$ip" in
            *[!0-9A-Fa-f.:]*) die "unexpected $kind address from the metadata service: $ip" ;;
        esac
    done < "$META/$kind"
done

etc="${SALTFLEET_ROOT%/}/etc/salt"
umask 022
mkdir -p "$etc/minion.d"
printf '%s\n' "$SALTFLEET_MINION_ID" > "$etc/minion_id"
printf '%s\n' "$SALTFLEET_MINION_CONFIG" > "$etc/minion.d/saltfleet.conf"
# Salt reads the grains file beside the main config file, and without one
# (pip installs none) it assumes /etc/salt/minion: give it one where we write.
[ -e "$etc/minion" ] || : > "$etc/minion"
# Static grains, so the instance id is there at the first authentication (autosign_grains).
python3 - "$ID" "$META" "$SALTFLEET_CLOUD" > "$etc/grains" <<'PY'
import json, os, sys
instance_id, meta, cloud = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
def lines(name):
    with open(os.path.join(meta, name)) as handle:
        return [line.strip() for line in handle if line.strip()]
cloud.update(instance_id=instance_id, public_ips=lines("public"), private_ips=lines("private"))
print(json.dumps({"saltfleet_instance_id": instance_id, "saltfleet_cloud": cloud}, indent=2, sort_keys=True))
PY
log "minion $SALTFLEET_MINION_ID (instance $ID) configured in $etc"

install_salt() {  # salt-minion ==SALTFLEET_SALT_VERSION from PyPI in its own venv, and its systemd unit
    case "$SALTFLEET_SALT_VERSION" in
        *[!0-9.]*|'') die "SALTFLEET_SALT_VERSION=$SALTFLEET_SALT_VERSION: expected a release such as 3008.4" ;;
    esac
    venv="${SALTFLEET_ROOT%/}/opt/saltfleet/salt-$SALTFLEET_SALT_VERSION"
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        if command -v apt-get >/dev/null 2>&1; then
            apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -qy python3-venv
        elif command -v dnf >/dev/null 2>&1; then
            dnf install -qy python3
        elif command -v yum >/dev/null 2>&1; then
            yum install -qy python3
        fi
    fi
    python3 -m venv "$venv" || die "cannot create a Python venv at $venv (python3 with venv is needed)"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check \
        ${SALTFLEET_PIP_INDEX_URL:+--index-url "$SALTFLEET_PIP_INDEX_URL"} \
        "salt==$SALTFLEET_SALT_VERSION" || die "pip could not install salt==$SALTFLEET_SALT_VERSION"
    mkdir -p "${SALTFLEET_ROOT%/}/usr/local/bin" "${SALTFLEET_ROOT%/}/etc/systemd/system"
    ln -sf "$venv/bin/salt-minion" "$venv/bin/salt-call" "${SALTFLEET_ROOT%/}/usr/local/bin/"
    cat > "${SALTFLEET_ROOT%/}/etc/systemd/system/salt-minion.service" <<UNIT
[Unit]
Description=Salt minion (saltfleet, salt $SALTFLEET_SALT_VERSION)
After=network-online.target
Wants=network-online.target

[Service]
Type=notify
NotifyAccess=all
ExecStart=$venv/bin/salt-minion
KillMode=process
Restart=on-failure
LimitNOFILE=8192

[Install]
WantedBy=multi-user.target
UNIT
}

if [ "$SALTFLEET_INSTALL" = auto ] && ! command -v salt-minion >/dev/null 2>&1; then
    log "installing salt-minion $SALTFLEET_SALT_VERSION (pip, in a venv)"
    install_salt
fi

finger() {  # the key's fingerprint as the master's `salt-key -f` shows it: SHA-256 of the key as sent
    python3 - "$1" <<'PY' 2>/dev/null || echo unknown
import hashlib, sys
with open(sys.argv[1], "rb") as handle:
    digest = hashlib.sha256(handle.read().strip()).hexdigest()
print(":".join(digest[i:i + 2] for i in range(0, len(digest), 2)))
PY
}

if [ "$SALTFLEET_START" = yes ] || [ "$SALTFLEET_START" = sync ]; then
    # salt-call runs before the daemon, so the two never race to generate the key.
    # A pending key makes salt-call give up at once: ask again while fleet.admit
    # decides (it runs on the pend event the first try fires).
    tries=0
    until salt-call -c "$etc" --out=quiet test.ping >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" = 1 ]; then
            # On the console (cloud-init's output), so the operator can tell this host's key from
            # another one held under the same id: `salt-key -f <id>` on the master prints the same.
            log "minion $SALTFLEET_MINION_ID (instance $ID) waits for the master to accept its key, fingerprint $(finger "$etc/pki/minion/minion.pub")"
        fi
        if [ "$tries" -ge "$SALTFLEET_ACCEPT_TRIES" ]; then
            die "the master did not accept the key of $SALTFLEET_MINION_ID (instance $ID); on the master: salt-key -L, and the fleet.admit lines of its log"
        fi
        sleep "$SALTFLEET_ACCEPT_WAIT"
    done
    log "the master accepted minion $SALTFLEET_MINION_ID"
    # saltfleet's modules, states and utils, once: the minion config turns
    # autoload_dynamic_modules off, so state.apply does not sync them itself.
    if ! timeout 600 salt-call -c "$etc" --retcode-passthrough --out=quiet saltutil.sync_all; then
        log "saltutil.sync_all failed; run it from the master: salt $SALTFLEET_MINION_ID saltutil.sync_all"
    fi
fi

if [ "$SALTFLEET_START" = yes ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        systemctl enable salt-minion
        systemctl restart salt-minion
    else
        service salt-minion restart
    fi
fi
