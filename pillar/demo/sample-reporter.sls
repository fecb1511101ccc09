# The same app as a second deployment, its program given in pillar instead of
# a template.
{%- set demo = opts['saltfleet_demo'] %}
deployments:
  sample-reporter:
    repo: {{ demo.app_repo | json }}
    rev: {{ demo.app_rev | json }}
    env:
      SAMPLEAPP_DATA: {{ demo.broker | json }}
    programs:
      reporter:
        command: celery -A sampleapp worker -Q weekly_reports -c 1 -n reporter@%%h --loglevel=INFO
        stopwaitsecs: 60
