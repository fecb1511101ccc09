# The sample Celery app as a fetcher on every demo worker: one worker per
# platform queue, from the template deployments/sample-fetcher/files/supervisord.conf.jinja.
{%- set demo = opts['saltfleet_demo'] %}
deployments:
  sample-fetcher:
    repo: {{ demo.app_repo | json }}
    rev: {{ demo.app_rev | json }}
    requirements: requirements.txt
    env:
      # The demo's private RabbitMQ; results and execution records in a folder.
      SAMPLEAPP_BROKER: {{ demo.broker_url | json }}
      SAMPLEAPP_DATA: {{ demo.app_data | json }}
    context:
      platforms: [instagram, twitter]
      # The sandboxes share this machine's hostname: the minion id tells their Celery nodes apart.
      node_host: {{ opts['id'] | json }}
