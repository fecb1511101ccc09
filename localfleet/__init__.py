"""A fleet on this machine: a salt-master and local minions for `make demo`, bench and tests."""
