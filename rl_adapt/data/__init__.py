"""Data model and readers/writers for echocardiography images and label maps."""
from rl_adapt.data.case import LABELS, Case

__all__ = ["Case", "LABELS"]
