{#- One deployment.absent per deployment installed here that pillar dropped
    (first, so a renamed deployment frees its files before the new name
    claims them), then one deployment.present per deployment pillar assigns
    to this minion. Deployments converge independently: one failing does
    not stop the others. Then, if any changed, the master is
    told what this host now runs. The states read their settings from
    pillar themselves, so secrets never appear in this file's rendered output. #}
{%- set wanted = pillar.get('deployments') %}
{%- if wanted is not none and wanted is not mapping %}

{#- Not a mapping: nothing is assumed dropped; say what is wrong instead. #}
saltfleet-pillar-invalid:
  deployment.pillar_valid:
    - name: saltfleet
{%- else %}
{%- set wanted = wanted or {} %}
{%- set states = [] %}
{%- for name in salt['deployment.list']() if name not in wanted %}
{%- do states.append('saltfleet-deployment-' ~ name ~ '-removed') %}

{{ ('saltfleet-deployment-' ~ name ~ '-removed') | json }}:
  deployment.absent:
    - name: {{ name | json }}
{%- endfor %}
{#- A deployment that may build something (new here, another repo, rev or
    commit than it serves) converges in a process of its own, beside the
    others; one that serves what pillar asks is checked in this one (a
    process costs more than that check): deployment.settled, the predicate
    the state's own plan uses. #}
{%- for name in wanted %}
{%- do states.append('saltfleet-deployment-' ~ name) %}

{{ ('saltfleet-deployment-' ~ name) | json }}:
  deployment.present:
    - name: {{ name | json }}
    - parallel: {{ (not salt['deployment.settled'](name)) | json }}
{%- endfor %}
{%- if states %}

{#- Once all of them ran: the master learns at once what changed (mine, grains). #}
saltfleet-report:
  deployment.reported:
    - name: saltfleet
    - onchanges:
{%- for id in states %}
      - deployment: {{ id | json }}
{%- endfor %}
{%- endif %}
{%- endif %}
