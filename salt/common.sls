# What every saltfleet host gets: the shared sysfiles (deployments/common/sysfiles/).
saltfleet-common-sysfiles:
  deployment.sysfiles:
    - name: common
