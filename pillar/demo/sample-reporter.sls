# The same app as a second deployment, its programs given in pillar instead
# of a template: a worker of its own queue, and the beat that sends the
# fetchers a quick task every second on each platform queue (the steady
# traffic a canary analysis watches).
{%- set demo = opts['saltfleet_demo'] %}
deployments:
  sample-reporter:
    repo: {{ demo.app_repo | json }}
    rev: {{ demo.app_rev | json }}
    env:
      SAMPLEAPP_BROKER: {{ demo.broker_url | json }}
      SAMPLEAPP_DATA: {{ demo.app_data | json }}
      SAMPLEAPP_BEAT_QUEUES: sample-fetcher.instagram,sample-fetcher.twitter
      SAMPLEAPP_BEAT_SECONDS: "1"
    programs:
      reporter:
        command: celery -A sampleapp worker -Q weekly_reports -c 1 -n reporter@%%h --loglevel=INFO
        stopwaitsecs: 60
      beat:
        command: celery -A sampleapp beat --loglevel=INFO
        stopwaitsecs: 10
