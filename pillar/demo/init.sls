# Settings shared by the demo's workers. The deployments converge under each
# minion's root_dir (its sandbox in .demo/minions/), as the user who ran
# `make demo`, with the repository's uv cache so a venv builds in a second.
# Their supervisord sockets go where the local provider keeps the instance's
# sockets (<run_dir>/<minion id>/), a short path whatever the checkout's.
{%- set demo = opts['saltfleet_demo'] %}
saltfleet:
  user: {{ demo.user | json }}
  uv_cache: {{ demo.uv_cache | json }}
  run_dir: {{ (demo.run_dir ~ '/' ~ opts.id ~ '/deployments') | json }}
  keep_releases: 2
