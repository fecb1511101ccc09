{#- salt/auth: a minion whose key is pending sent its autosign grains (master
    setting auth_events_autosign_grains: [pend]). A cloud-init host sends the
    instance id salt-cloud launched it as; fleet.admit accepts the key only if
    that instance's ticket names this minion id. Every value comes from the
    minion, so it reaches the runner JSON-quoted, as data. -#}
{%- set grains = data.get('autosign_grains') %}
{%- if data.get('act') == 'pend' and grains is mapping and grains.get('saltfleet_instance_id') %}
saltfleet_admit:
  runner.fleet.admit:
    - args:
      - minion_id: {{ data.get('id') | json }}
      - instance_id: {{ grains.get('saltfleet_instance_id') | json }}
      - pub: {{ data.get('pub') | json }}
{%- endif %}
