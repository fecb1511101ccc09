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
# the host through the metadata service. The minion generates its own key, and
# the master accepts it because the instance id this script reads from the
# metadata service (grain saltfleet_instance_id, sent via autosign_grains) is one
# the master's own salt-cloud launched (see _utils/saltfleet_cloud.py).
#
# Where the instance id comes from (SALTFLEET_METADATA):
#   ec2        EC2's metadata service, IMDSv2 (a session token, then the id).
#   openstack  The config drive first (Rackspace has one and no metadata service):
#              the filesystem labelled config-2, mounted read-only in a temporary
#              directory, openstack/latest/meta_data.json's "uuid"; then the
#              OpenStack metadata service at the same path.
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
#   SALTFLEET_INSTANCE_ID   skip the metadata service and use this id
#   SALTFLEET_INSTALL       auto: install salt-minion if missing; skip   (default auto)
#   SALTFLEET_PIP_INDEX_URL a PyPI mirror for the install              (default PyPI)
#   SALTFLEET_START         yes: sync saltfleet's modules (salt-call saltutil.sync_all)
#                           and (re)start salt-minion; no                (default yes)
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

log() { echo "saltfleet user-data: $*" >&2; }
die() { log "$*"; exit 1; }

fetch() {  # fetch URL [curl options...]: the body on stdout, retried while the network comes up
    url=$1; shift
    curl -fsS --retry 10 --retry-delay 2 --retry-connrefused --max-time 10 "$@" "$url"
}

uuid_of() {  # the "uuid" of an OpenStack meta_data.json on stdin
    python3 -c 'import json, sys; print(json.load(sys.stdin)["uuid"])'
}

config_drive_id() {  # the instance uuid from the config drive; fails when there is none
    if [ -d "$SALTFLEET_CONFIG_DRIVE" ]; then
        uuid_of < "$SALTFLEET_CONFIG_DRIVE/openstack/latest/meta_data.json"
        return
    fi
    [ -b "$SALTFLEET_CONFIG_DRIVE" ] || return 1
    mnt=$(mktemp -d)
    rc=1
    if mount -o ro "$SALTFLEET_CONFIG_DRIVE" "$mnt"; then
        uuid_of < "$mnt/openstack/latest/meta_data.json" && rc=0
        umount "$mnt" || log "could not unmount the config drive from $mnt"
    fi
    rmdir "$mnt" 2>/dev/null || true
    return $rc
}

instance_id() {
    if [ -n "${SALTFLEET_INSTANCE_ID:-}" ]; then
        echo "$SALTFLEET_INSTANCE_ID"
        return
    fi
    case "$SALTFLEET_METADATA" in
        ec2)  # IMDSv2: a session token first, then the id
            token=$(fetch "$SALTFLEET_METADATA_URL/latest/api/token" -X PUT \
                -H "X-aws-ec2-metadata-token-ttl-seconds: 300")
            fetch "$SALTFLEET_METADATA_URL/latest/meta-data/instance-id" -H "X-aws-ec2-metadata-token: $token"
            ;;
        openstack)
            if config_drive_id; then
                return
            fi
            log "no config drive at $SALTFLEET_CONFIG_DRIVE; asking $SALTFLEET_METADATA_URL"
            fetch "$SALTFLEET_METADATA_URL/openstack/latest/meta_data.json" | uuid_of
            ;;
        *) die "SALTFLEET_METADATA=$SALTFLEET_METADATA: expected ec2 or openstack" ;;
    esac
}

ID=$(instance_id) || die "cannot read the instance id from $SALTFLEET_METADATA_URL ($SALTFLEET_METADATA)"
[ -n "$ID" ] || die "the metadata service returned an empty instance id"
case "$ID" in
    *[!A-Za-z0-9._-]*) die "unexpected instance id from the metadata service: $ID" ;;
esac

etc="${SALTFLEET_ROOT%/}/etc/salt"
umask 022
mkdir -p "$etc/minion.d"
printf '%s\n' "$SALTFLEET_MINION_ID" > "$etc/minion_id"
printf '%s\n' "$SALTFLEET_MINION_CONFIG" > "$etc/minion.d/saltfleet.conf"
# A static grain, so it is there at the first authentication (autosign_grains).
printf 'saltfleet_instance_id: %s\n' "$ID" > "$etc/grains"
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

if [ "$SALTFLEET_START" = yes ]; then
    # saltfleet's modules, states and utils, once: the minion config turns
    # autoload_dynamic_modules off, so state.apply does not sync them itself.
    # salt-call runs before the daemon, so the two never race to generate the key;
    # its first authentication is the one the autosign ticket accepts.
    if ! timeout 600 salt-call --retcode-passthrough --out=quiet saltutil.sync_all; then
        log "saltutil.sync_all failed; run it from the master: salt $SALTFLEET_MINION_ID saltutil.sync_all"
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl daemon-reload
        systemctl enable salt-minion
        systemctl restart salt-minion
    else
        service salt-minion restart
    fi
fi
