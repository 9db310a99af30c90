"""The ``certseg`` command line: ``certify`` and ``serve``, and the option declarations and one-line failure path
``certseg-bench`` and ``certseg-export`` share. Only entry points import this package."""
