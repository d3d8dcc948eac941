"""Helpers shared by several stages: params, runtime, outputs, ultralytics glue."""
