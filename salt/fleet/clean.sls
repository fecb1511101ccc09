{#- Remove every deployment saltfleet installed on this minion (not purged:
    releases stay on disk unless pillar saltfleet:purge_removed is true). #}
{%- for name in salt['deployment.list']() %}

{{ ('saltfleet-deployment-' ~ name ~ '-clean') | json }}:
  deployment.absent:
    - name: {{ name | json }}
{%- endfor %}
