"""Fuzzing the checkpoint reader: mutated checkpoints must be read whole or refused cleanly.

Not part of the default test run (the file name does not start with ``test_``). Run for a few
minutes with::

    FUZZ_EXAMPLES=3000 python -m pytest tests/fuzz_checkpoint.py -q

A mutated checkpoint must either fail with :class:`share_convert.errors.ShareError` (one line)
or read as the original did: every tensor it returns is checked against the manifest's SHA-256.
Any other exception is a crash and fails the run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from share_convert import ConsolidationConfig
from share_convert.checkpoint import Checkpoint
from share_convert.engine import merge
from share_convert.errors import ShareError
from share_convert.io import extract, open_adapters

from .fuzz_reader import mutate, mutations

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))

mutation = mutations(20000)  # a checkpoint's header (with its manifest) is longer than an adapter's


@pytest.fixture(scope="module")
def original(tmp_path_factory, real) -> bytes:
    out = tmp_path_factory.mktemp("ckpt") / "c.safetensors"
    merge(open_adapters([str(real / "bert-tiny")]), out, ConsolidationConfig(k=4, private_rank=1))
    return out.read_bytes()


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_checkpoints_are_read_or_refused_cleanly(original, ops):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "c.safetensors"
        path.write_bytes(bytes(mutate(bytearray(original), ops)))
        try:
            ckpt = Checkpoint(path)
            ckpt.verify_all()
            for task in ckpt.tasks:
                extract(ckpt, task, Path(tmp) / task)
        except ShareError as e:
            assert "\n" not in e.one_line()
