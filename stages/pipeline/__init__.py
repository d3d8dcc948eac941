"""The pipeline's plumbing: entry points, params validation, the runtime environment, atomic
outputs, the environment record, image loading and shared plots. Imports nothing of the method
or of ultralytics."""
