# What every host reports to the master's mine, read by `salt-run fleet.inventory`:
# its deployments' programs (deployment.status) and a heartbeat carrying its
# interval in seconds. A minion whose mine is older than 2.5 intervals is down.
{%- set heartbeat = 30 %}
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
