# Settings shared by the demo's workers. The deployments converge under each
# minion's root_dir (its sandbox in .demo/minions/), as the user who ran
# `make demo`, with the repository's uv cache so a venv builds in a second.
{%- set demo = opts['saltfleet_demo'] %}
saltfleet:
  user: {{ demo.user | json }}
  uv_cache: {{ demo.uv_cache | json }}
  keep_releases: 2
