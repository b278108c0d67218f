"""The ascent-steps study: grid, runs, resume, report."""

from .grid import PRESETS, TASKS, MethodSpec, RunSpec, StudyConfig, TaskSpec, parse_method

__all__ = ["PRESETS", "TASKS", "MethodSpec", "RunSpec", "StudyConfig", "TaskSpec", "parse_method"]
