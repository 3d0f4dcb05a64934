"""minigenrecal: GenRecal (Lee et al., arXiv 2506.15681) on a small, readable PyTorch core."""
import os as _os

import torch as _torch

if not _torch.cuda.is_available():  # accelerate imports DeepSpeed when it is installed; without a GPU it would
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")  # warn on every run that it fell back to the CPU
from .data import Sample, make_split, read_llava_json
from .losses import TeacherOut, head_losses, kl_from_logits
from .recalibrator import Recalibrator, count_parameters
from .stages import StageConfig, stage_loss, teacher_forward, train_stage
from .vlm import SampleError, VLMView

__version__ = "0.1.0"
__all__ = ["Sample", "make_split", "read_llava_json", "TeacherOut", "head_losses", "kl_from_logits", "Recalibrator",
           "count_parameters", "StageConfig", "stage_loss", "teacher_forward", "train_stage", "SampleError", "VLMView"]
