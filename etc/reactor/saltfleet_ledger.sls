{#- salt/job/*/ret/*: a minion returned a job. The deploy ledger records the
    returns of host-level deploys (deployment.update_code, deployment.rollback)
    as they arrive, so they outlive the job cache (keep_jobs_seconds);
    fleet.record adds the job's user from the master's job cache. Every other
    return renders to nothing here. The values come from the minion, so they
    reach the runner JSON-quoted, as data. -#}
{%- if data.get('fun') in ('deployment.update_code', 'deployment.rollback') %}
saltfleet_ledger_record:
  runner.fleet.record:
    - args:
      - jid: {{ data.get('jid') | json }}
      - minion: {{ data.get('id') | json }}
      - fun: {{ data.get('fun') | json }}
      - fun_args: {{ data.get('fun_args') | json }}
      - ret: {{ data.get('return') | json }}
      - retcode: {{ data.get('retcode', 0) | json }}
{%- endif %}
