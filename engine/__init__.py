"""certseg.engine: certification core, sampling contract, pipeline stages, models and runtimes."""
