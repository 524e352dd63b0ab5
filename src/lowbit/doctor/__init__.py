"""``lowbit doctor``: an artifact checked against the engines that will run it (rules as data, real loads)."""

from lowbit.doctor.check import ENGINES, Report, doctor, layer_errors
from lowbit.doctor.rules import Finding

__all__ = ["ENGINES", "Finding", "Report", "doctor", "layer_errors"]
