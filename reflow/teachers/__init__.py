"""Teachers: map noise z0 to samples z1 (diffusers DDPM and text-to-image checkpoints, our flows), all through
one interface, ``Teacher``; ``load_teacher`` opens a folder as the right one."""

from reflow.teachers.base import Teacher
from reflow.teachers.ddpm import DiffusersTeacher
from reflow.teachers.flow import FlowTeacher
from reflow.teachers.load import load_teacher
from reflow.teachers.scheduler import SchedulerTeacher
from reflow.teachers.text import TextToImageTeacher

__all__ = ["DiffusersTeacher", "FlowTeacher", "SchedulerTeacher", "Teacher", "TextToImageTeacher", "load_teacher"]
