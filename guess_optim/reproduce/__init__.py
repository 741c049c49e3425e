"""Reproduction of the experiments of Singhal et al., "How to Guess a Gradient" (arXiv 2312.04709).

One module per experiment, each with a config dataclass (validated in ``__post_init__``; every field is also a
command-line flag) and a ``run_*`` function returning a JSON-ready record and, given ``out_dir``, writing
``<name>.json`` and ``<name>.png``:

==================  =================================================  ==========================
command             paper                                              function
==================  =================================================  ==========================
``cosine``          Fig. 1 left, §3                                    :func:`run_cosine`
``one-step``        Fig. 1 right, §3                                   :func:`run_one_step`
``table1``          Table 1 / Fig. 2                                   :func:`run_table1`
``bias``            Fig. 3, A.1, A.4 (matched-cosine oracle)           :func:`run_bias`
``self-sharpening`` Fig. 4, A.4                                        :func:`run_self_sharpening`
``downstream-depth`` Fig. 5, A.1                                       :func:`run_downstream_depth`
``subspace``        Fig. 6 right / Fig. 7, A.2                         :func:`run_subspace`
``sweep``           Fig. 8, A.3                                        :func:`run_sweep`
``follow-up``       Wang, Markou, Campbell 2025 (after the paper)      :func:`run_follow_up`
==================  =================================================  ==========================

Command line: ``python -m guess_optim.reproduce <command> [--flags] --out-dir DIR`` (:func:`main`), also
``guess-optim reproduce <command>``; ``guess-optim cosine`` is the ``cosine`` experiment. It prints the experiment's
main numbers as a text table and the files it wrote. The defaults are reduced sizes that run in minutes on two CPU
cores on the embedded ``mnist-5k``; RESULTS.md lists the paper-size flags.
"""

from ._common import effective_rank
from .bias import BiasConfig, matched_cosine_guess, run_bias
from .cosine import CosineConfig, run_cosine
from .downstream import DownstreamDepthConfig, run_downstream_depth
from .follow_up import FollowUpConfig, run_follow_up
from .one_step import OneStepConfig, loss_reduction, run_one_step
from .runner import EXPERIMENTS, build_parser, main
from .sharpening import SelfSharpeningConfig, run_self_sharpening
from .subspace import SubspaceConfig, projection_cosine, run_subspace
from .sweep import SweepConfig, run_sweep
from .table1 import Table1Config, run_table1

__all__ = [
    "EXPERIMENTS",
    "BiasConfig",
    "CosineConfig",
    "DownstreamDepthConfig",
    "FollowUpConfig",
    "OneStepConfig",
    "SelfSharpeningConfig",
    "SubspaceConfig",
    "SweepConfig",
    "Table1Config",
    "build_parser",
    "effective_rank",
    "loss_reduction",
    "main",
    "matched_cosine_guess",
    "projection_cosine",
    "run_bias",
    "run_cosine",
    "run_downstream_depth",
    "run_follow_up",
    "run_one_step",
    "run_self_sharpening",
    "run_subspace",
    "run_sweep",
    "run_table1",
]
