"""Process runtime: where blocking work runs (``threads``: bottom layer, imported anywhere) and
what each process builds from its config (``process``: imported by process entry points only)."""
