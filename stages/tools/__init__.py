"""Commands around the pipeline (not DVC stages), run on demand: `python -m stages.tools.<name>`."""
