"""minigenrecal: GenRecal (Lee et al., arXiv 2506.15681) on a small, readable PyTorch core.

The method is the package's top level (recalibrator, losses, chunked, stages, loop); the rooms around it (data,
models, evaluation, scale, study, teach, cli) import it, never the other way. The names below are the public list
that notebooks and course material import from here.
"""
from minigenrecal.data.llava import SampleError, read_llava_json
from minigenrecal.data.pairs import encode_pairs
from minigenrecal.data.synthetic import Sample, make_split
from minigenrecal.evaluation.exact_match import exact_match
from minigenrecal.loop import Callback, PairData, run_stages, train_stage
from minigenrecal.losses import TeacherOut, head_losses, kl_from_logits
from minigenrecal.models.presets import get_preset
from minigenrecal.models.vlm import VLMView
from minigenrecal.recalibrator import Recalibrator, count_parameters
from minigenrecal.stages import StageConfig, set_trainable, stage_loss, teacher_forward
from minigenrecal.study.pipeline import run_genrecal

__version__ = "0.1.0"
__all__ = ["Recalibrator", "count_parameters", "StageConfig", "stage_loss", "teacher_forward", "set_trainable",
           "TeacherOut", "head_losses", "kl_from_logits", "train_stage", "run_stages", "Callback", "PairData",
           "VLMView", "Sample", "SampleError", "make_split", "read_llava_json", "encode_pairs", "run_genrecal",
           "get_preset", "exact_match"]
