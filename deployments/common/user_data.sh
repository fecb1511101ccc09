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
# Knobs for tests and baked images (environment only):
#   SALTFLEET_ROOT          write under this prefix instead of /          (default /)
#   SALTFLEET_METADATA_URL  metadata service       (default http://169.254.169.254)
#   SALTFLEET_INSTANCE_ID   skip the metadata service and use this id
#   SALTFLEET_INSTALL       auto: install salt-minion if missing; skip   (default auto)
#   SALTFLEET_START         yes: (re)start salt-minion; no               (default yes)
set -eu

# @saltfleet-settings@
: "${SALTFLEET_MINION_ID:?set SALTFLEET_MINION_ID to the minion id}"
: "${SALTFLEET_MINION_CONFIG:?set SALTFLEET_MINION_CONFIG to the minion config (YAML)}"
SALTFLEET_METADATA=${SALTFLEET_METADATA:-ec2}
SALTFLEET_SALT_VERSION=${SALTFLEET_SALT_VERSION:-3008.4}
SALTFLEET_ROOT=${SALTFLEET_ROOT:-/}
SALTFLEET_METADATA_URL=${SALTFLEET_METADATA_URL:-http://169.254.169.254}
SALTFLEET_INSTALL=${SALTFLEET_INSTALL:-auto}
SALTFLEET_START=${SALTFLEET_START:-yes}

log() { echo "saltfleet user-data: $*" >&2; }
die() { log "$*"; exit 1; }

fetch() {  # fetch URL [curl options...]: the body on stdout, retried while the network comes up
    url=$1; shift
    curl -fsS --retry 10 --retry-delay 2 --retry-connrefused --max-time 10 "$@" "$url"
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
            fetch "$SALTFLEET_METADATA_URL/openstack/latest/meta_data.json" |
                python3 -c 'import json, sys; print(json.load(sys.stdin)["uuid"])'
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

if [ "$SALTFLEET_INSTALL" = auto ] && ! command -v salt-minion >/dev/null 2>&1; then
    log "installing salt-minion $SALTFLEET_SALT_VERSION"
    script=$(mktemp)
    fetch https://github.com/saltstack/salt-bootstrap/releases/latest/download/bootstrap-salt.sh > "$script"
    # -X: do not start the daemon before its config is complete; we start it below.
    sh "$script" -X stable "$SALTFLEET_SALT_VERSION"
    rm -f "$script"
fi

if [ "$SALTFLEET_START" = yes ]; then
    if command -v systemctl >/dev/null 2>&1; then
        systemctl enable salt-minion
        systemctl restart salt-minion
    else
        service salt-minion restart
    fi
fi
