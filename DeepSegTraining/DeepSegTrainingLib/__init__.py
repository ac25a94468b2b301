"""Slicer glue for DeepSegTraining: runs training subprocesses and reads their events."""
