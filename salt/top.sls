base:
  '*':
    - common
    - fleet
