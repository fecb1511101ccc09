# What every host reports to the master's mine, read by `salt-run fleet.inventory`:
# its deployments' programs (deployment.status) and a heartbeat carrying its
# interval in seconds. A minion whose mine is older than 2.5 intervals (plus 5 s)
# is down, so a stopped host shows down within about 2.5 minutes. Each beat
# forks a job process on the host and a mine write on the master: at 30 s, 50
# hosts sharing a machine spent most of a core on it.
{%- set heartbeat = 60 %}
mine_functions:
  deployment.status: []
  saltfleet.heartbeat:
    - mine_function: test.echo
    - '{{ heartbeat }}'
schedule:
  saltfleet-heartbeat:
    function: mine.update
    seconds: {{ heartbeat }}
    run_on_start: true
    maxrunning: 1
    return_job: false
