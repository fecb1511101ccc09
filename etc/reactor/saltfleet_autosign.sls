{#- salt/auth: a minion whose key is pending, or whose id's key is rejected,
    sent its autosign grains (master setting auth_events_autosign_grains:
    [pend, reject]). A cloud-init host sends the instance id salt-cloud
    launched it as; fleet.admit accepts the key only if that instance's ticket
    names this minion id, and sets aside a key that claims an id reserved for
    another instance (with or without an instance id). A rejected key without
    an instance id can replace nothing: no runner for it. Every value comes
    from the minion, so it reaches the runner JSON-quoted, as data. -#}
{%- set grains = data.get('autosign_grains') %}
{%- set instance_id = grains.get('saltfleet_instance_id') if grains is mapping else none %}
{%- if data.get('act') == 'pend' or (data.get('act') == 'reject' and instance_id) %}
saltfleet_admit:
  runner.fleet.admit:
    - args:
      - minion_id: {{ data.get('id') | json }}
      - instance_id: {{ instance_id | json }}
      - pub: {{ data.get('pub') | json }}
      - act: {{ data.get('act') | json }}
{%- endif %}
