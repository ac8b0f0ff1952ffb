"""transformers' progress bars and advisory warnings, off while tiltlm loads, saves and builds models.

Loading a 52-tensor model prints a "Loading weights" bar, saving one a "Writing model shards" bar, and
fitting a testbed warns about attention masks and loss types it does not need: noise for a library user
(the README's Python API example) and for the CLI alike. ``quiet_transformers()`` turns them off for the
duration of a call and restores the caller's settings after, so code that configures transformers
itself is left alone; set ``TRANSFORMERS_VERBOSITY`` (e.g. ``info``) to keep transformers' own output.
Errors still surface: only warnings and below, and progress bars, are silenced.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


@contextmanager
def quiet_transformers():
    if "TRANSFORMERS_VERBOSITY" in os.environ and os.environ["TRANSFORMERS_VERBOSITY"] != "error":
        yield  # the user asked for transformers' output
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
