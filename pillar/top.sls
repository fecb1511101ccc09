# Which minion gets what. Deployments are assigned by minion id: the id is the
# only identity a host cannot choose for itself (grains can be spoofed), and
# deployment pillar carries secrets.
base:
  '*':
    - fleet
{%- if opts.get('saltfleet_demo') %}
  # `make demo`'s local fleet: its master config (.demo/etc/salt/master) sets
  # saltfleet_demo; a real master's does not, so these never apply there.
  'demo-worker-*':
    - demo
  # The two workers `make demo` makes (a demo-worker-3 of the README's runs nothing).
  'demo-worker-1,demo-worker-2':
    - match: list
    - demo.sample-fetcher
  'demo-worker-2':
    - demo.sample-reporter
{%- endif %}
