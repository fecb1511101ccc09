{#- One deployment.present per deployment that pillar assigns to this minion,
    one deployment.absent per deployment installed here that pillar dropped.
    Deployments converge in parallel and independently: one failing does not
    stop the others. The states read their settings from pillar themselves,
    so secrets never appear in this file's rendered output. #}
{%- set wanted = pillar.get('deployments') or {} %}
{%- set wanted = wanted if wanted is mapping else {} %}
{%- for name in wanted %}

{{ ('saltfleet-deployment-' ~ name) | json }}:
  deployment.present:
    - name: {{ name | json }}
    - parallel: true
{%- endfor %}
{%- for name in salt['deployment.list']() if name not in wanted %}

{{ ('saltfleet-deployment-' ~ name ~ '-removed') | json }}:
  deployment.absent:
    - name: {{ name | json }}
{%- endfor %}
