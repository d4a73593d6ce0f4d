"""Fuzzing the adapter reader: mutated real adapter files must be read or refused cleanly.

Not part of the default test run (the file name does not start with ``test_``). Run for a few
minutes with::

    FUZZ_EXAMPLES=20000 python -m pytest tests/fuzz_reader.py -q

Any exception other than :class:`share_convert.errors.ShareError` is a crash and fails the run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from share_convert.errors import ShareError
from share_convert.io import AdapterSource

SEEDS = [  # in the real adapters' folder (the ``real`` fixture)
    "gpt2-c_attn/winkitee__peft-lora-gpt2",
    "bert-tiny/YeshwanthrajG__bert-tiny-checkpoint-7500",
    "gpt2-c_attn/gsj-rifat__tmp",
]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))


def mutations(header_bytes: int) -> st.SearchStrategy:
    """Byte flips, truncations and insertions anywhere, and overwrites in the first ``header_bytes``."""
    return st.one_of(
        st.tuples(st.just("flip"), st.integers(0, 10**7), st.integers(1, 255)),
        st.tuples(st.just("truncate"), st.integers(0, 10**7), st.just(0)),
        st.tuples(st.just("insert"), st.integers(0, 10**7), st.integers(0, 255)),
        st.tuples(st.just("header"), st.integers(0, header_bytes), st.integers(0, 255)),
    )


mutation = mutations(4096)


def mutate(data: bytearray, ops) -> bytearray:
    for kind, pos, value in ops:
        if not data:
            break
        if kind == "flip":
            data[pos % len(data)] ^= value
        elif kind == "truncate":
            del data[pos % len(data) :]
        elif kind == "insert":
            data.insert(pos % (len(data) + 1), value)
        else:  # concentrate on the header, where parsers are most fragile
            data[min(pos, len(data) - 1)] = value
    return data


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(SEEDS), st.lists(mutation, min_size=1, max_size=4), st.booleans())
def test_mutated_adapters_are_read_or_refused_cleanly(real, seed, ops, mutate_config):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "a"
        shutil.copytree(real / seed, folder)
        target = folder / (
            "adapter_config.json"
            if mutate_config
            else next(p.name for p in folder.iterdir() if p.name.startswith("adapter_model"))
        )
        target.write_bytes(bytes(mutate(bytearray(target.read_bytes()), ops)))
        try:
            src = AdapterSource(folder)
            for module in src.modules:
                src.read_module(module)
            src.read_heads()
        except ShareError as e:
            assert "\n" not in e.one_line()
