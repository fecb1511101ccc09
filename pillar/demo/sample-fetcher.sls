# The sample Celery app as a fetcher: one worker per platform queue, from the
# template deployments/sample-fetcher/files/supervisord.conf.jinja.
{%- set demo = opts['saltfleet_demo'] %}
deployments:
  sample-fetcher:
    repo: {{ demo.app_repo | json }}
    rev: {{ demo.app_rev | json }}
    requirements: requirements.txt
    env:
      # The broker and result store are folders: no server to run.
      SAMPLEAPP_DATA: {{ demo.broker | json }}
    context:
      platforms: [instagram, twitter]
